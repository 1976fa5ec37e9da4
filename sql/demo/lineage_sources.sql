-- Demo summary: the head and the neuron writing most into each feature of the patched basis
-- (direct feature attribution, lineage_edges rank 1). Parameters: $patch_basis.
SELECT dst_id AS feature, src_type, src_id, round(weight, 4) AS weight
FROM lineage_edges
WHERE basis = $patch_basis AND method = 'dfa' AND rank = 1
  AND src_type IN ('attention_head', 'mlp_neuron')
ORDER BY feature, src_type
