-- Report (model diff), Contexts of the most exclusive latents: the top $contexts contexts of each
-- of the most_exclusive_latents (the macro), with what each writes into each source
-- (crosscoder_examples). Parameters: $basis, $most_exclusive, $contexts.
SELECT m.toward, m.class, e.feature_id, e.rank, round(e.value, 3) AS value,
       e.source_values, e.source_inputs, e.split,
       example_context(e.context_text, e.context_token_ids, e.position,
                       e.context_start) AS context
FROM most_exclusive_latents($basis, $most_exclusive) m
JOIN crosscoder_examples e USING (feature_id)
WHERE e.basis = $basis AND e.rank <= $contexts
ORDER BY m.toward, abs(m.relative_decoder_norm - 0.5) DESC, e.feature_id, e.rank
