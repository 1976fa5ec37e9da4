-- Every run with its checkpoints, final heldout metrics and collected stages.
SELECT run, kind, parent_run, parent_step, n_checkpoints, last_step,
       round(final_heldout_loss, 4) AS heldout_loss,
       round(final_heldout_accuracy, 4) AS heldout_accuracy, stages
FROM run_summary
ORDER BY run
