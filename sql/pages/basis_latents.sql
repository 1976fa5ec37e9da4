-- Every latent of a train-crosscoder basis: its model-diff class (two sources), decoder norms
-- and how often it fires.
SELECT f.feature_id, md.class, round(f.relative_decoder_norm, 4) AS relative_decoder_norm,
       round(f.decoder_cosine, 4) AS decoder_cosine, round(f.frequency, 5) AS frequency,
       round(f.max_activation, 4) AS max_activation, f.dead, f.designated_shared
FROM features AS f
LEFT JOIN model_diff AS md USING (basis, feature_id)
WHERE f.basis = $basis
