-- Report (model diff), Training: the crosscoder's last logged value of each training metric
-- (training_metrics). Parameters: $basis.
SELECT metric, round(value, 4) AS value, step, tokens FROM training_metrics
WHERE basis = $basis
QUALIFY step = max(step) OVER (PARTITION BY metric)
ORDER BY metric
