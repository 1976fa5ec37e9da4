-- Demo summary: the latents of the model-diff crosscoder per class, with their mean decoder cosine
-- and frequency (model_diff_summary). Parameters: $diff_basis.
SELECT class, n_features, round(mean_decoder_cosine, 3) AS mean_cosine,
       round(mean_frequency, 4) AS mean_frequency
FROM model_diff_summary WHERE basis = $diff_basis ORDER BY class
