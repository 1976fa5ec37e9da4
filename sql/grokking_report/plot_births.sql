-- Grokking report's births plot: features born at each checkpoint per basis of the run and what
-- they follow, under one births rule (frequency_births). Parameters: $run and the rule: $metric,
-- $presence, $threshold, $persistence, $stable_eps, $stable_cos.
SELECT basis, birth_step + 1 AS step_plus_1, follows, count(*) AS features
FROM frequency_births
WHERE run = $run AND birth_step IS NOT NULL AND metric = $metric AND presence = $presence
  AND threshold = $threshold AND persistence = $persistence AND stable_eps = $stable_eps
  AND stable_cos = $stable_cos
GROUP BY ALL ORDER BY ALL
