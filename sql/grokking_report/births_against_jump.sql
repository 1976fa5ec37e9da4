-- Grokking report, Births against the jump: per basis of the run and what its features follow,
-- how many were born, and how many before test accuracy jumped, under one births rule
-- (frequency_births). Parameters: $run and the rule: $metric, $presence, $threshold,
-- $persistence, $stable_eps, $stable_cos.
SELECT basis, follows, count(*) AS features, count(birth_step) AS born,
       count(*) FILTER (WHERE born_before_jump) AS born_before_jump,
       round(count(*) FILTER (WHERE born_before_jump) / count(birth_step), 3)
           AS share_before_jump,
       count(*) FILTER (WHERE present_at_init) AS present_at_init,
       median(birth_step) AS median_birth_step, any_value(jump_step) AS jump_step
FROM frequency_births WHERE run = $run AND metric = $metric AND presence = $presence
  AND threshold = $threshold AND persistence = $persistence AND stable_eps = $stable_eps
  AND stable_cos = $stable_cos
GROUP BY basis, follows ORDER BY basis, follows
