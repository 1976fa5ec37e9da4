-- The feature at every swept checkpoint: how often and how strongly it fires, its share of the
-- reconstruction, and how far its direction has moved (drift: the running sum of
-- 1 - cosine with the previous checkpoint's direction).
SELECT step, round(activation_rate, 6) AS activation_rate,
       round(mean_active_activation, 4) AS mean_active_activation,
       round(energy, 6) AS energy,
       round(direction_cosine_previous, 4) AS direction_cosine_previous,
       round(sum(coalesce(1 - direction_cosine_previous, 0)) OVER (ORDER BY step), 4) AS drift
FROM trajectories
WHERE basis = $basis AND feature_id = $feature
ORDER BY step
