-- Report, Fit quality: how well a shared basis explains each checkpoint it was swept at, one row
-- per step (checkpoint_summary). Parameters: $basis.
SELECT step, round(explained_variance, 4) AS explained_variance,
       round(relative_reconstruction_error, 4) AS relative_error,
       round(l0, 1) AS l0, round(dead_fraction, 3) AS dead_fraction
FROM checkpoint_summary WHERE basis = $basis ORDER BY step
