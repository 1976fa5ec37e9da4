-- feature-birth-analyze: the `births` rows, the real order's rows of all_births with the rule's
-- parameters that key them. Parameters: $basis, $metric, $presence, $threshold, $persistence,
-- $stable_eps, $stable_cos.
SELECT $basis AS basis, feature_id, $metric AS metric, $presence AS presence,
       $threshold AS threshold, $persistence AS persistence, $stable_eps AS stable_eps,
       $stable_cos AS stable_cos, feature_threshold, first_present_step, birth_step,
       birth_censored,
       stabilization_step, death_step, death_censored, drift, present_at_init
FROM all_births
WHERE ordering = 0
ORDER BY feature_id
