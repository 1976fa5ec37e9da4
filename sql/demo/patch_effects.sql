-- Demo summary: the 8 loss patches of the patched basis's feature sets with the largest change,
-- beside the change its reconstruction alone causes (patches). Parameters: $patch_basis.
SELECT feature_set, split, round(clean, 3) AS clean_loss, round(delta, 3) AS delta,
       round(recon_rel_error, 3) AS recon_error, round(spliced_loss_delta, 3) AS spliced_delta
FROM patches WHERE basis = $patch_basis AND metric = 'loss'
ORDER BY abs(delta) DESC LIMIT 8
