-- What writes the feature and what it writes (feature-lineage): the heads, neurons, embeddings
-- and upstream features feeding it, and the output tokens it promotes or suppresses (dla), with
-- the token's text where the run has token strings.
WITH edges AS (
    SELECT step, method, src_type AS kind, src_id AS id,
           CASE WHEN src_type = 'feature' AND method <> 'dla'
                THEN 'feature of ' || json_extract_string(pruning, '$.upstream') END AS detail,
           weight, rank
    FROM lineage_edges
    WHERE basis = $basis AND dst_type = 'feature' AND dst_id = $feature::VARCHAR
    UNION ALL
    SELECT e.step, e.method, 'promotes token', e.dst_id, s.token_text, e.weight, e.rank
    FROM lineage_edges AS e
    LEFT JOIN token_strings AS s ON s.run = $run AND s.token_id = TRY_CAST(e.dst_id AS BIGINT)
    WHERE e.basis = $basis AND e.src_type = 'feature' AND e.src_id = $feature::VARCHAR
      AND e.dst_type = 'token'
)
SELECT step, method, kind, id, detail, round(weight, 5) AS weight, rank
FROM edges
ORDER BY step, method, kind, rank
