-- feature-birth-analyze: the temporary table all_births, the feature_births rule applied to the
-- real checkpoint order (ordering 0) and to every permutation of it in one call; the job's other
-- queries read it. Parameters: $basis, $metric, $threshold, $persistence, $stable_eps,
-- $stable_cos, $presence, $orders (the permutations, each a list of checkpoint positions).
CREATE TEMP TABLE all_births AS
SELECT * FROM feature_births($basis, $metric, $threshold, $persistence, $stable_eps, $stable_cos,
                             presence := $presence, permutations := $orders)
