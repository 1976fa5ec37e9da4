-- Demo summary: the 8 most frequent latents of the model-diff crosscoder exclusive to either
-- source, with the base source's latent-scaling error ratio (model_diff). Parameters: $diff_basis.
SELECT feature_id, class, round(relative_decoder_norm, 3) AS rel_norm,
       round(frequency, 4) AS frequency, round(nu_error[1], 3) AS nu_error_base
FROM model_diff WHERE basis = $diff_basis AND class LIKE '%-exclusive'
ORDER BY frequency DESC LIMIT 8
