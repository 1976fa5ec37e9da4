-- The feature between two checkpoints: activity, share of the reconstruction and direction at
-- each, and the change (as the diffs table of feature-compare defines it, for any pair).
WITH pair AS (
    SELECT max(activation_rate) FILTER (step = $source) AS source_rate,
           max(activation_rate) FILTER (step = $target) AS target_rate,
           max(mean_activation) FILTER (step = $source) AS source_mean,
           max(mean_activation) FILTER (step = $target) AS target_mean,
           max(energy) FILTER (step = $source) AS source_energy,
           max(energy) FILTER (step = $target) AS target_energy,
           least(max(n_tokens) FILTER (step = $source),
                 max(n_tokens) FILTER (step = $target)) AS n_tokens
    FROM trajectories
    WHERE basis = $basis AND feature_id = $feature AND step IN ($source, $target)
), directions AS (
    SELECT list_cosine_similarity(any_value(direction) FILTER (step = $source),
                                  any_value(direction) FILTER (step = $target)) AS cosine
    FROM feature_directions
    WHERE basis = $basis AND feature_id = $feature AND step IN ($source, $target)
)
SELECT $source AS source_step, $target AS target_step,
       round(source_rate, 6) AS source_rate, round(target_rate, 6) AS target_rate,
       round(target_rate - source_rate, 6) AS rate_change,
       round(ln((target_rate + 1.0 / n_tokens) / (source_rate + 1.0 / n_tokens)), 4)
           AS log_rate_ratio,
       round(target_mean - source_mean, 6) AS mean_activation_change,
       round(target_energy - source_energy, 6) AS energy_change,
       round(directions.cosine, 4) AS direction_cosine
FROM pair, directions
WHERE n_tokens IS NOT NULL
