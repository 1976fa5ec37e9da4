-- The feature's top activating tokens at one checkpoint, each with its context as a list of
-- token texts (the run's token_strings; token ids where it has none) and the position of the
-- activating token in that list (1-based).
SELECT e.rank, round(e.value, 4) AS value, e.split, e.sequence_id, e.position,
       e.position - e.context_start + 1 AS marked,
       context_tokens(e.context_token_ids, $run) AS tokens
FROM feature_examples AS e
WHERE e.basis = $basis AND e.feature_id = $feature AND e.step = $step
ORDER BY e.rank
