-- Demo summary: each run's accuracy on every token split but train and heldout at its last
-- checkpoint (checkpoint_metrics). No parameters.
SELECT run, split, round(accuracy, 3) AS accuracy FROM checkpoint_metrics
WHERE (run, step) IN (SELECT (run, max(step)) FROM checkpoints GROUP BY run)
  AND split NOT IN ('train', 'heldout')
ORDER BY run, split
