-- Demo summary: the fit quality of every shared basis at its first, middle and last swept
-- checkpoint (checkpoint_summary). No parameters.
SELECT basis, step, round(explained_variance, 3) AS explained_variance,
       round(l0, 1) AS l0, round(dead_fraction, 3) AS dead_fraction
FROM checkpoint_summary
QUALIFY row_number() OVER (PARTITION BY basis ORDER BY step)
    IN (1, (count(*) OVER (PARTITION BY basis) + 1) // 2, count(*) OVER (PARTITION BY basis))
ORDER BY basis, step
