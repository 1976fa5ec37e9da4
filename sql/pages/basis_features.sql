-- Every feature of a shared basis with its birth under one births rule, its activity at the last
-- swept checkpoint, its total drift, and the token split where it fires most.
WITH last AS (
    SELECT max(step) AS step FROM trajectories WHERE basis = $basis
), final AS (
    SELECT t.feature_id, t.activation_rate, t.energy,
           -- the split with the highest activation rate (ties: the split's name)
           (SELECT s.key FROM (SELECT unnest(map_entries(t.split_activation_rates)) AS s)
            ORDER BY s.value DESC, s.key LIMIT 1) AS top_split
    FROM trajectories AS t, last
    WHERE t.basis = $basis AND t.step = last.step
), born AS (
    SELECT feature_id, birth_step, birth_censored, present_at_init, stabilization_step,
           death_step, drift
    FROM births
    WHERE basis = $basis AND metric = $metric AND presence = $presence
      AND threshold = $threshold AND persistence = $persistence AND stable_eps = $stable_eps
      AND stable_cos = $stable_cos
)
SELECT f.feature_id, b.birth_step, b.birth_censored, b.present_at_init, b.stabilization_step,
       b.death_step, round(final.activation_rate, 5) AS final_rate,
       round(final.energy, 5) AS final_energy, round(b.drift, 4) AS drift, final.top_split,
       f.dead
FROM features AS f
LEFT JOIN born AS b USING (feature_id)
LEFT JOIN final USING (feature_id)
WHERE f.basis = $basis
