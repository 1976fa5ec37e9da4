-- The features of the same basis whose decoder directions are closest to this one's (cosine,
-- first source), with how often they fire.
WITH this AS (
    SELECT direction FROM decoder_directions
    WHERE basis = $basis AND feature_id = $feature AND source_index = 0
)
SELECT d.feature_id, round(list_cosine_similarity(d.direction, this.direction), 4) AS cosine,
       round(f.frequency, 5) AS frequency
FROM decoder_directions AS d, this
JOIN features AS f ON f.basis = $basis AND f.feature_id = d.feature_id
WHERE d.basis = $basis AND d.source_index = 0 AND d.feature_id <> $feature
ORDER BY cosine DESC, d.feature_id
LIMIT $limit
