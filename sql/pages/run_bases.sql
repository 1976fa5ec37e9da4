-- The bases fitted on the run, or whose sources read its activation sets.
SELECT name AS basis, kind, arch, stage, d_hidden
FROM bases
WHERE run = $run OR list_contains(list_transform(sources, s -> s.run), $run)
ORDER BY name
