-- Demo summary: the activation sets collected per run and stage: how many, their steps, tokens,
-- width and mean norm scale (activation_sets). No parameters.
SELECT run, stage, count(*) AS sets, min(step) AS first_step, max(step) AS last_step,
       any_value(n_tokens) AS tokens, any_value(d_model) AS d_model,
       round(avg(norm_scale), 4) AS mean_norm_scale
FROM activation_sets GROUP BY run, stage ORDER BY run, stage
