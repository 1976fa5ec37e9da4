-- A crosscoder latent in each of its sources: how often it fires there, its share of that
-- source's reconstruction and its decoder norm (crosscoder_latent_stats).
SELECT source, n_tokens, round(activation_rate, 5) AS activation_rate,
       round(mean_active_activation, 4) AS mean_active_activation, round(energy, 6) AS energy,
       round(decoder_norm, 4) AS decoder_norm, round(mean_encoder_input, 4) AS mean_encoder_input
FROM crosscoder_latent_stats
WHERE basis = $basis AND feature_id = $feature
ORDER BY source_index
