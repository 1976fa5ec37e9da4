-- The distribution of the feature's non-zero activations at one checkpoint
-- (feature_activations), in $bins equal bins from 0 to its largest activation there.
WITH values AS (
    SELECT value FROM feature_activations
    WHERE basis = $basis AND step = $step AND feature_id = $feature
), top AS (
    SELECT max(value) AS top FROM values
)
SELECT least(floor(value / top * $bins), $bins - 1)::INTEGER AS bin,
       round(any_value(top) * bin / $bins, 5) AS bin_start,
       round(any_value(top) * (bin + 1) / $bins, 5) AS bin_end,
       count(*) AS n_tokens
FROM values, top
GROUP BY bin
ORDER BY bin
