-- Every basis: what it was fitted on, its size and when. Shared bases (shared-feature-fit) have a
-- run and a stage; train-crosscoder bases read several activation sets (sources).
SELECT name AS basis, kind, arch, run, stage, n_sources,
       list_transform(sources, s -> s.label) AS sources, d_model, d_hidden, k,
       created_at::TIMESTAMP(0) AS created_at
FROM bases
ORDER BY name
