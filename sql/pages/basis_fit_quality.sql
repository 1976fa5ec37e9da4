-- How well the basis reconstructs each checkpoint of its run (feature-trajectory-sweep).
SELECT step, n_tokens, round(explained_variance, 4) AS explained_variance,
       round(relative_reconstruction_error, 4) AS relative_error, round(l0, 2) AS l0,
       round(dead_fraction, 4) AS dead_fraction
FROM checkpoint_summary
WHERE basis = $basis
ORDER BY step
