-- Grokking experiment, its answer: the run's key frequencies and the steps of memorisation, the
-- jump and grokking (grokking_phases), its checkpoint count, and the last checkpoint's train and
-- test accuracy. Parameters: $run.
SELECT key_frequencies, memorised_step, jump_step, grokked_step,
       (SELECT count(*) FROM progress_measures WHERE run = $run) AS checkpoints,
       (SELECT arg_max(train_accuracy, step) FROM progress_measures WHERE run = $run)
           AS final_train_accuracy,
       final_test_accuracy
FROM grokking_phases WHERE run = $run
