-- Grokking report, Progress measures: the paper's measures at each checkpoint of the run
-- (progress_measures). Parameters: $run.
SELECT step, round(train_accuracy, 3) AS train_acc,
       round(test_accuracy, 3) AS test_acc, round(train_loss, 4) AS train_loss,
       round(test_loss, 3) AS test_loss,
       round(restricted_loss, 3) AS restricted_loss,
       round(excluded_loss, 3) AS excluded_loss,
       round(key_frequency_share, 3) AS key_frequency_share
FROM progress_measures WHERE run = $run ORDER BY step
