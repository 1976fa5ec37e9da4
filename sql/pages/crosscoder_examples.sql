-- A crosscoder latent's top activating tokens, with what it writes into each source and the
-- context as in feature_examples.
SELECT e.rank, round(e.value, 4) AS value, e.source_values, e.split, e.sequence_id, e.position,
       e.position - e.context_start + 1 AS marked,
       (SELECT list(coalesce(s.token_text, u.token_id::VARCHAR) ORDER BY u.i)
        FROM (SELECT unnest(e.context_token_ids) AS token_id,
                     generate_subscripts(e.context_token_ids, 1) AS i) AS u
        LEFT JOIN token_strings AS s ON s.run = $run AND s.token_id = u.token_id) AS tokens
FROM crosscoder_examples AS e
WHERE e.basis = $basis AND e.feature_id = $feature
ORDER BY e.rank
