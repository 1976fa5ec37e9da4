-- Report, Lineage: the strongest source of each method and source type writing each feature of
-- the basis, per step (lineage_edges, rank 1). Parameters: $basis.
SELECT step, dst_id AS feature, method, src_type, src_id, round(weight, 4) AS weight
FROM lineage_edges
WHERE basis = $basis AND rank = 1 AND dst_type = 'feature'
ORDER BY step, feature, method, src_type
