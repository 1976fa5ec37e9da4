-- feature-birth-analyze: the other seeds a basis was fitted with, one row each (none for a basis
-- fitted with one seed). Parameters: $basis.
SELECT DISTINCT seed FROM seed_trajectories WHERE basis = $basis ORDER BY seed
