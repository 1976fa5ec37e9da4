-- Report (model diff), Latent classes: the latents of a two-source crosscoder per class, with
-- their mean decoder cosine and frequency (model_diff_summary). Parameters: $basis.
SELECT class, n_features, round(mean_decoder_cosine, 3) AS mean_decoder_cosine,
       round(mean_frequency, 4) AS mean_frequency
FROM model_diff_summary WHERE basis = $basis ORDER BY class
