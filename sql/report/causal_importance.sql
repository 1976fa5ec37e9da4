-- Report, Causal importance: every loss patch of the basis's feature sets, largest change first,
-- beside the change the basis's reconstruction alone causes (patches). Parameters: $basis.
SELECT target_step, source_step, mode, feature_set, split,
       round(clean, 4) AS clean_loss, round(delta, 4) AS loss_delta,
       round(spliced_loss_delta, 4) AS spliced_loss_delta,
       round(recon_rel_error, 3) AS recon_rel_error,
       abs(delta) > abs(spliced_loss_delta) AS beyond_reconstruction
FROM patches WHERE basis = $basis AND metric = 'loss'
ORDER BY abs(delta) DESC
