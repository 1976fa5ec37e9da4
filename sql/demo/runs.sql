-- Demo summary: every run with its checkpoints, final heldout metrics and activation sets
-- (run_summary). No parameters.
SELECT run, kind, parent_run, parent_step, n_checkpoints, last_step,
       round(final_heldout_loss, 3) AS heldout_loss,
       round(final_heldout_accuracy, 3) AS heldout_acc, n_activation_sets
FROM run_summary ORDER BY run
