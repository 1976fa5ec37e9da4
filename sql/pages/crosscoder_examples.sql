-- A crosscoder latent's top activating tokens, with what it writes into each source and the
-- context as in feature_examples.
SELECT e.rank, round(e.value, 4) AS value, e.source_values, e.split, e.sequence_id, e.position,
       e.position - e.context_start + 1 AS marked,
       context_tokens(e.context_token_ids, $run) AS tokens
FROM crosscoder_examples AS e
WHERE e.basis = $basis AND e.feature_id = $feature
ORDER BY e.rank
