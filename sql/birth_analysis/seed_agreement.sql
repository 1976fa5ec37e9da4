-- feature-birth-analyze: how many of the feature pairs matched between the basis and its seed
-- $other (decoder cosine >= $cosine) have births that agree, and how many pairs there are, in one
-- row. The same rule runs on the other seed's trajectories; a pair agrees when both are present
-- at init, both are never born, or both are born within one checkpoint of each other: a birth's
-- place in the checkpoint order (not its step) is what "within one checkpoint" counts. Reads
-- all_births. Parameters: $basis, $metric, $presence, $threshold, $persistence, $stable_eps,
-- $stable_cos, $other, $cosine.
WITH positions AS (
    SELECT step, (row_number() OVER (ORDER BY step) - 1) AS position
    FROM (SELECT DISTINCT step FROM trajectories WHERE basis = $basis)
),
theirs AS (
    SELECT b.*, p.position AS birth_position
    FROM feature_births($basis, $metric, $threshold, $persistence, $stable_eps, $stable_cos,
                        presence := $presence, other_seed := $other) AS b
    LEFT JOIN positions AS p ON p.step = b.birth_step
),
ours AS (
    SELECT a.*, p.position AS birth_position
    FROM all_births AS a LEFT JOIN positions AS p ON p.step = a.birth_step
    WHERE a.ordering = 0
),
pairs AS (
    SELECT DISTINCT feature_id, matched_feature_id FROM seed_trajectories
    WHERE basis = $basis AND seed = $other AND match_cosine >= $cosine
)
SELECT count_if(
           (o.present_at_init AND t.present_at_init)
           OR (NOT o.present_at_init AND NOT t.present_at_init
               AND o.birth_step IS NULL AND t.birth_step IS NULL)
           OR (NOT o.present_at_init AND NOT t.present_at_init
               AND abs(o.birth_position - t.birth_position) <= 1)),
       count(*)
FROM pairs
JOIN theirs AS t ON t.feature_id = pairs.feature_id
JOIN ours AS o ON o.feature_id = pairs.matched_feature_id
