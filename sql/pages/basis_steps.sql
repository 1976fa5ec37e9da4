-- The checkpoints a shared basis was swept at (feature-trajectory-sweep writes one
-- checkpoint_summary row for each).
SELECT step FROM checkpoint_summary WHERE basis = $basis ORDER BY step
