-- Grokking experiment, per basis: for each kind of feature (frequency_births.follows: a key
-- frequency, another frequency, the answer, ...) how many there are, how many were born, how many before the jump, and
-- their median birth step, under one births rule (frequency_births). Parameters: $basis and the
-- rule: $metric, $presence, $threshold, $persistence, $stable_eps, $stable_cos.
SELECT follows, count(*) AS features, count(birth_step) AS born,
       count(*) FILTER (WHERE born_before_jump) AS born_before_jump,
       median(birth_step) AS median_birth_step
FROM frequency_births
WHERE basis = $basis AND metric = $metric AND presence = $presence AND threshold = $threshold
  AND persistence = $persistence AND stable_eps = $stable_eps AND stable_cos = $stable_cos
GROUP BY follows ORDER BY follows
