-- Demo summary: the 8 features born under one births rule that are most active at their basis's
-- last swept checkpoint, with the token split where they fire most (births, trajectories).
-- Parameters: the rule: $metric, $presence, $threshold, $persistence, $stable_eps, $stable_cos.
SELECT b.basis, b.feature_id, b.birth_step, b.birth_censored AS censored, b.stabilization_step,
       round(t.activation_rate, 3) AS final_rate,
       map_keys(t.split_activation_rates)[list_position(map_values(t.split_activation_rates),
           list_max(map_values(t.split_activation_rates)))] AS top_split
FROM births b JOIN trajectories t USING (basis, feature_id)
WHERE b.metric = $metric AND b.presence = $presence AND b.threshold = $threshold
  AND b.persistence = $persistence AND b.stable_eps = $stable_eps AND b.stable_cos = $stable_cos
  AND b.birth_step IS NOT NULL
  AND t.step = (SELECT max(step) FROM trajectories WHERE basis = b.basis)
ORDER BY t.activation_rate DESC LIMIT 8
