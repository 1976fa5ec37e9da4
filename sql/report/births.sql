-- Report, Births: per births rule stored for the basis and per step window, the births (censored
-- ones apart) against the shuffled-order null, with the first features born in the window (rows
-- of each rule stay apart: the join keys on every rule column). Parameters: $basis.
SELECT s.window_start, s.window_end, s.births, s.censored_births,
       round(s.null_births_mean, 2) AS null_births_mean,
       round(s.null_births_sd, 2) AS null_births_sd,
       round(s.null_censored_births_mean, 2) AS null_censored_births_mean,
       list(b.feature_id ORDER BY b.feature_id)
           FILTER (WHERE b.feature_id IS NOT NULL)[1:8] AS first_born_features,
       s.metric, s.presence, s.threshold, s.persistence
FROM birth_summary s LEFT JOIN births b
  ON b.basis = s.basis AND b.metric = s.metric AND b.presence = s.presence
 AND b.threshold = s.threshold AND b.persistence = s.persistence
 AND b.stable_eps = s.stable_eps AND b.stable_cos = s.stable_cos
 AND b.birth_step = s.window_end
WHERE s.basis = $basis GROUP BY ALL
ORDER BY s.metric, s.presence, s.threshold, s.persistence, s.window_end
