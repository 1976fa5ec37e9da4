-- Latents per model-diff class of a two-source crosscoder.
SELECT class, n_features, round(mean_decoder_cosine, 4) AS mean_decoder_cosine,
       round(mean_frequency, 5) AS mean_frequency
FROM model_diff_summary
WHERE basis = $basis
ORDER BY class
