-- Patch effects of every feature set holding the feature (feature-patch): the metric with the
-- set patched against the clean run, beside the error the basis's reconstruction alone causes.
SELECT source_step, target_step, mode, scale, feature_set, split, metric,
       round(clean, 5) AS clean, round(patched, 5) AS patched, round(delta, 5) AS delta,
       round(spliced_loss_delta, 5) AS spliced_loss_delta, n_tokens
FROM patches
WHERE basis = $basis AND list_contains(feature_ids, $feature)
ORDER BY len(feature_ids), feature_set, target_step, source_step, mode, split, metric
