-- One feature's row: decoder norms, how often it fires on the evaluation tokens, and (two
-- sources) its model-diff geometry.
SELECT f.feature_id, md.class, list_transform(f.decoder_norms, v -> round(v, 4)) AS decoder_norms,
       round(f.relative_decoder_norm, 4) AS relative_decoder_norm,
       round(f.decoder_cosine, 4) AS decoder_cosine, round(f.frequency, 5) AS frequency,
       round(f.max_activation, 4) AS max_activation, f.dead, f.designated_shared,
       f.reference_source, list_transform(f.nu_error, v -> round(v, 3)) AS nu_error,
       list_transform(f.nu_recon, v -> round(v, 3)) AS nu_recon
FROM features AS f
LEFT JOIN model_diff AS md USING (basis, feature_id)
WHERE f.basis = $basis AND f.feature_id = $feature
