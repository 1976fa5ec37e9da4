-- Grokking report's trajectories plot: the energy at every checkpoint of the $top_features most
-- energetic features of the run that follow a frequency or look the answer up (frequency_births
-- under one births rule). Parameters: $run, $top_features and the rule: $metric, $presence,
-- $threshold, $persistence, $stable_eps, $stable_cos.
WITH chosen AS (
    SELECT f.basis, f.feature_id, any_value(f.follows) AS follows
    FROM frequency_births f JOIN trajectories t USING (basis, feature_id)
    WHERE f.run = $run AND f.follows NOT IN ('other', 'not at =') AND metric = $metric
      AND presence = $presence AND threshold = $threshold AND persistence = $persistence
      AND stable_eps = $stable_eps AND stable_cos = $stable_cos
    GROUP BY ALL ORDER BY max(t.energy) DESC LIMIT $top_features)
SELECT c.basis || ' #' || c.feature_id || ' (' || c.follows || ')' AS feature,
       t.step + 1 AS step_plus_1, t.energy
FROM chosen c JOIN trajectories t USING (basis, feature_id)
ORDER BY feature, t.step
