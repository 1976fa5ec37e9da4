-- feature_compare(basis_name, source_step, target_step): every feature of a shared basis with how
-- it changed from one checkpoint to another: activation rate (difference and smoothed log ratio),
-- mean activation, energy, the cosine of its refitted directions, the rate change per token
-- split, and its rank by each change (1 = largest |change|, ties by feature_id). The rows
-- `featurestore feature-compare` stores in `diffs` (less created_at), computed on the fly:
--   SELECT * FROM feature_compare('demo-l2', 0, 1800) ORDER BY rank_by_rate_change LIMIT 20;
CREATE OR REPLACE MACRO feature_compare(basis_name, source_step, target_step) AS TABLE
WITH pairs AS (
    SELECT
        s.feature_id,
        s.activation_rate AS source_activation_rate,
        t.activation_rate AS target_activation_rate,
        t.activation_rate - s.activation_rate AS activation_rate_change,
        -- Pseudo-count of one token (at the coarser checkpoint): a feature silent at one end gets
        -- a finite ratio, and silent -> one token is ln 2 rather than ln(infinity).
        ln((t.activation_rate + 1.0 / least(s.n_tokens, t.n_tokens))
           / (s.activation_rate + 1.0 / least(s.n_tokens, t.n_tokens))) AS log_rate_ratio,
        t.mean_activation - s.mean_activation AS mean_activation_change,
        t.energy - s.energy AS energy_change
    FROM trajectories AS s
    JOIN trajectories AS t ON t.basis = s.basis AND t.feature_id = s.feature_id
    WHERE s.basis = basis_name AND s.step = source_step AND t.step = target_step
),
cosines AS (
    -- A direction with norm 0 is undefined (the feature never fired there): no cosine.
    SELECT
        s.feature_id,
        list_cosine_similarity(CAST(s.direction AS DOUBLE[]), CAST(t.direction AS DOUBLE[]))
            AS direction_cosine
    FROM feature_directions AS s
    JOIN feature_directions AS t ON t.basis = s.basis AND t.feature_id = s.feature_id
    WHERE s.basis = basis_name AND s.step = source_step AND t.step = target_step
      AND s.norm > 0 AND t.norm > 0
),
splits AS (
    SELECT
        s.feature_id,
        MAP(list(s.split ORDER BY s.split),
            list(t.activation_rate - s.activation_rate ORDER BY s.split)) AS split_rate_changes
    FROM split_profiles AS s
    JOIN split_profiles AS t
        ON t.basis = s.basis AND t.feature_id = s.feature_id AND t.split = s.split
    WHERE s.basis = basis_name AND s.step = source_step AND t.step = target_step
    GROUP BY s.feature_id
)
SELECT
    CAST(basis_name AS VARCHAR) AS basis,
    CAST(source_step AS BIGINT) AS source_step,
    CAST(target_step AS BIGINT) AS target_step,
    p.feature_id,
    p.source_activation_rate,
    p.target_activation_rate,
    p.activation_rate_change,
    p.log_rate_ratio,
    p.mean_activation_change,
    p.energy_change,
    c.direction_cosine,
    coalesce(sp.split_rate_changes, CAST(MAP {} AS MAP(VARCHAR, DOUBLE))) AS split_rate_changes,
    CAST(row_number() OVER (ORDER BY abs(p.activation_rate_change) DESC, p.feature_id)
         AS INTEGER) AS rank_by_rate_change,
    CAST(row_number() OVER (ORDER BY abs(p.log_rate_ratio) DESC, p.feature_id)
         AS INTEGER) AS rank_by_log_ratio,
    CAST(row_number() OVER (ORDER BY abs(p.mean_activation_change) DESC, p.feature_id)
         AS INTEGER) AS rank_by_mean_change,
    CAST(row_number() OVER (ORDER BY abs(p.energy_change) DESC, p.feature_id)
         AS INTEGER) AS rank_by_energy_change
FROM pairs AS p
LEFT JOIN cosines AS c USING (feature_id)
LEFT JOIN splits AS sp USING (feature_id)
ORDER BY p.feature_id;
