-- The exclusive latents of a two-source crosscoder, most frequent first, with latent scaling of
-- the other source (the reference source's own ratio is NaN): nu_error above $flag_nu flags
-- Complete Shrinkage (the concept is left in the other source's error), nu_recon above it
-- Latent Decoupling (other latents rebuild it there).
WITH other AS (
    SELECT feature_id, class, relative_decoder_norm, frequency, reference_source,
           list_max(list_filter(nu_error, v -> NOT isnan(v))) AS nu_error_other,
           list_max(list_filter(nu_recon, v -> NOT isnan(v))) AS nu_recon_other
    FROM model_diff
    WHERE basis = $basis AND class LIKE '%-exclusive'
)
SELECT feature_id, class, round(relative_decoder_norm, 4) AS relative_decoder_norm,
       round(frequency, 5) AS frequency, reference_source,
       round(nu_error_other, 3) AS nu_error_other, round(nu_recon_other, 3) AS nu_recon_other,
       coalesce(nu_error_other > $flag_nu, false) AS complete_shrinkage,
       coalesce(nu_recon_other > $flag_nu, false) AS latent_decoupling
FROM other
ORDER BY frequency DESC, feature_id
