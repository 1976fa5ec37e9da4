-- One basis: how it was fitted, and how many rows each analysis has written for it.
SELECT b.name AS basis, b.kind, b.arch, b.run, b.stage, b.n_sources,
       list_transform(b.sources, s -> s.label) AS sources, b.d_model, b.d_hidden, b.k, b.steps,
       b.tokens, b.stability, b.created_at::TIMESTAMP(0) AS created_at,
       (SELECT count(*) FROM checkpoint_summary WHERE basis = $basis) AS swept_checkpoints,
       (SELECT count(*) FROM features WHERE basis = $basis AND dead) AS dead_features
FROM bases AS b
WHERE b.name = $basis
