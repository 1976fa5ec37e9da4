-- The features of the same basis whose decoder directions are closest to this one's (cosine,
-- first source), with how often they fire.
WITH this AS (
    SELECT direction FROM decoder_directions
    WHERE basis = $basis AND feature_id = $feature AND source_index = 0
), nearest AS (
    SELECT d.feature_id, list_cosine_similarity(d.direction, this.direction) AS cosine
    FROM decoder_directions AS d, this
    WHERE d.basis = $basis AND d.source_index = 0 AND d.feature_id <> $feature
    ORDER BY cosine DESC, d.feature_id
    LIMIT $limit
)
SELECT n.feature_id, round(n.cosine, 4) AS cosine, round(f.frequency, 5) AS frequency
FROM nearest AS n
JOIN features AS f ON f.basis = $basis AND f.feature_id = n.feature_id
ORDER BY n.cosine DESC, n.feature_id
