-- Grokking report's phases plot: the run's progress measures in long form, one row per
-- (measure, checkpoint) with step + 1 (the plot's log axis). Parameters: $run.
SELECT step + 1 AS step_plus_1, measure, value FROM (
    UNPIVOT (SELECT step, train_accuracy, test_accuracy, train_loss, test_loss,
                    restricted_loss, excluded_loss, key_frequency_share
             FROM progress_measures WHERE run = $run)
    ON COLUMNS(* EXCLUDE step) INTO NAME measure VALUE value)
ORDER BY measure, step
