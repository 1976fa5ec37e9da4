-- Demo summary: per basis, the births under one births rule (censored ones apart), features
-- present at init, and the birth rate against the shuffled-order null's (birth_summary). One
-- rule only: birth_summary holds a row set per rule analysed, whose births would be summed.
-- Parameters: the rule: $metric, $presence, $threshold, $persistence, $stable_eps, $stable_cos.
SELECT basis,
       metric || ' >= ' || threshold || CASE WHEN presence = 'relative' THEN ' x peak' ELSE '' END
           || ', K = ' || persistence AS rule,
       sum(births) AS births, sum(censored_births) AS censored,
       any_value(n_present_at_init) AS present_at_init,
       round(any_value(birth_rate), 4) AS birth_rate,
       round(any_value(null_false_birth_rate), 4) AS null_false_birth_rate
FROM birth_summary
WHERE metric = $metric AND presence = $presence AND threshold = $threshold
  AND persistence = $persistence AND stable_eps = $stable_eps AND stable_cos = $stable_cos
GROUP BY basis, metric, presence, threshold, persistence, stable_eps, stable_cos
ORDER BY basis, rule
