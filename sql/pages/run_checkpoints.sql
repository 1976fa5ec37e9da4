-- The run's checkpoints with their train and heldout metrics.
SELECT step, tokens_seen, round(train_loss, 4) AS train_loss,
       round(train_accuracy, 4) AS train_accuracy, round(heldout_loss, 4) AS heldout_loss,
       round(heldout_accuracy, 4) AS heldout_accuracy
FROM checkpoints
WHERE run = $run
ORDER BY step
