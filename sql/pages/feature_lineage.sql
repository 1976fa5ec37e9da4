-- What writes the feature and what it writes (feature-lineage): the heads, neurons, embeddings
-- and upstream features feeding it, and the output tokens it promotes or suppresses (dla), with
-- the token's text where the run has token strings.
SELECT e.step, e.method,
       CASE WHEN e.dst_type = 'token' THEN 'promotes token' ELSE e.src_type END AS kind,
       CASE WHEN e.dst_type = 'token' THEN e.dst_id ELSE e.src_id END AS id,
       CASE WHEN e.dst_type = 'token' THEN s.token_text
            WHEN e.src_type = 'feature' AND e.method <> 'dla'
                THEN 'feature of ' || json_extract_string(e.pruning, '$.upstream') END AS detail,
       round(e.weight, 5) AS weight, e.rank
FROM lineage_edges AS e
LEFT JOIN token_strings AS s
       ON e.dst_type = 'token' AND s.run = $run AND s.token_id = TRY_CAST(e.dst_id AS BIGINT)
WHERE e.basis = $basis
  AND ((e.dst_type = 'feature' AND e.dst_id = $feature::VARCHAR)
       OR (e.dst_type = 'token' AND e.src_type = 'feature' AND e.src_id = $feature::VARCHAR))
ORDER BY e.step, e.method, kind, e.rank
