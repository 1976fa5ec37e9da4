-- Report (model diff), Contexts of the most exclusive latents: the top $contexts contexts of the
-- latents of most_exclusive_latents.sql (the same `most` CTE), with what each writes into each
-- source (crosscoder_examples). Parameters: $basis, $most_exclusive, $contexts.
WITH most AS (
    SELECT d.feature_id, d.class, d.relative_decoder_norm,
           CASE WHEN d.relative_decoder_norm < 0.5 THEN b.sources[1].label
                ELSE b.sources[2].label END AS toward
    FROM model_diff d JOIN bases b ON b.name = d.basis
    WHERE d.basis = $basis AND d.class <> 'dead'
    QUALIFY row_number() OVER (PARTITION BY toward ORDER BY
        abs(d.relative_decoder_norm - 0.5) DESC, d.frequency DESC, d.feature_id)
        <= $most_exclusive)
SELECT m.toward, m.class, e.feature_id, e.rank, round(e.value, 3) AS value,
       e.source_values, e.source_inputs, e.split,
       example_context(e.context_text, e.context_token_ids, e.position,
                       e.context_start) AS context
FROM most m JOIN crosscoder_examples e USING (feature_id)
WHERE e.basis = $basis AND e.rank <= $contexts
ORDER BY m.toward, abs(m.relative_decoder_norm - 0.5) DESC, e.feature_id, e.rank
