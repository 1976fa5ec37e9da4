-- Report, Top examples: the top $contexts contexts at the last checkpoint of the $highlighted
-- highlighted features (those whose own patch moved the loss most, then the most energetic),
-- the activating token marked (feature_examples). Parameters: $basis, $highlighted, $contexts.
WITH last AS (
    SELECT max(step) AS step FROM feature_examples WHERE basis = $basis),
patched AS (
    SELECT feature_ids[1] AS feature_id, max(abs(delta)) AS effect FROM patches
    WHERE basis = $basis AND metric = 'loss' AND len(feature_ids) = 1 GROUP BY ALL),
highlighted AS (
    SELECT t.feature_id FROM trajectories t LEFT JOIN patched p USING (feature_id)
    WHERE t.basis = $basis AND t.step = (SELECT step FROM last)
    ORDER BY p.effect DESC NULLS LAST, t.energy DESC, t.feature_id LIMIT $highlighted)
SELECT e.feature_id, e.step, e.rank, round(e.value, 3) AS value, e.split,
       example_context(e.context_text, e.context_token_ids, e.position,
                       e.context_start) AS context
FROM feature_examples e JOIN highlighted USING (feature_id)
WHERE e.basis = $basis AND e.step = (SELECT step FROM last) AND e.rank <= $contexts
ORDER BY e.feature_id, e.rank
