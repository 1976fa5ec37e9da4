-- Report (model diff), Most exclusive latents in each source: the $most_exclusive live latents
-- leaning furthest toward each source (the most_exclusive_latents macro), with their statistics
-- in every source (crosscoder_latent_stats). Parameters: $basis, $most_exclusive.
SELECT m.toward, m.class, m.feature_id,
       round(m.relative_decoder_norm, 3) AS relative_norm,
       s.source, round(s.activation_rate, 4) AS activation_rate,
       round(s.mean_active_activation, 3) AS mean_active_activation,
       round(s.energy, 4) AS energy, round(s.mean_encoder_input, 3) AS encoder_input
FROM most_exclusive_latents($basis, $most_exclusive) m
JOIN crosscoder_latent_stats s USING (feature_id)
WHERE s.basis = $basis
ORDER BY m.toward, abs(m.relative_decoder_norm - 0.5) DESC, m.feature_id, s.source_index
