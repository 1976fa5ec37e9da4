-- The feature's birth, stabilisation and death under one births rule (feature-birth-analyze).
SELECT first_present_step, birth_step, birth_censored, present_at_init, stabilization_step,
       death_step, death_censored, round(drift, 4) AS drift, feature_threshold
FROM births
WHERE basis = $basis AND feature_id = $feature AND metric = $metric AND presence = $presence
  AND threshold = $threshold AND persistence = $persistence AND stable_eps = $stable_eps
  AND stable_cos = $stable_cos
