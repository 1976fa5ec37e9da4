-- Report (model diff), Most exclusive latents in each source: the $most_exclusive live latents
-- leaning furthest toward each source, with their statistics in every source
-- (crosscoder_latent_stats). The `most` CTE is the same in most_exclusive_contexts.sql: both
-- sections show the same latents. Parameters: $basis, $most_exclusive.
WITH most AS (
    SELECT d.feature_id, d.class, d.relative_decoder_norm,
           CASE WHEN d.relative_decoder_norm < 0.5 THEN b.sources[1].label
                ELSE b.sources[2].label END AS toward
    FROM model_diff d JOIN bases b ON b.name = d.basis
    WHERE d.basis = $basis AND d.class <> 'dead'
    QUALIFY row_number() OVER (PARTITION BY toward ORDER BY
        abs(d.relative_decoder_norm - 0.5) DESC, d.frequency DESC, d.feature_id)
        <= $most_exclusive)
SELECT m.toward, m.class, m.feature_id,
       round(m.relative_decoder_norm, 3) AS relative_norm,
       s.source, round(s.activation_rate, 4) AS activation_rate,
       round(s.mean_active_activation, 3) AS mean_active_activation,
       round(s.energy, 4) AS energy, round(s.mean_encoder_input, 3) AS encoder_input
FROM most m JOIN crosscoder_latent_stats s USING (feature_id)
WHERE s.basis = $basis
ORDER BY m.toward, abs(m.relative_decoder_norm - 0.5) DESC, m.feature_id, s.source_index
