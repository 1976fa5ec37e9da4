-- patches: what happens to the model when features of a shared basis are patched (feature-patch).
CREATE TABLE patches (
    basis VARCHAR NOT NULL,
    source_step BIGINT NOT NULL,
    target_step BIGINT NOT NULL,
    mode VARCHAR NOT NULL,
    scale DOUBLE,
    feature_set VARCHAR NOT NULL,
    feature_ids INTEGER[] NOT NULL,
    split VARCHAR NOT NULL,
    metric VARCHAR NOT NULL,
    clean DOUBLE NOT NULL,
    patched DOUBLE NOT NULL,
    delta DOUBLE NOT NULL,
    recon_rel_error DOUBLE NOT NULL,
    error_norm_share DOUBLE NOT NULL,
    spliced_loss_delta DOUBLE NOT NULL,
    n_tokens BIGINT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (basis, source_step, target_step, mode, feature_set, split, metric)
);
COMMENT ON TABLE patches IS 'One row per (shared basis, checkpoint pair, mode, feature set, token split, metric): the metric of the target checkpoint''s model run clean and with the feature set patched at the basis''s stage (x'' = x - decode(f_target[S]) + decode(f_new[S]), the error term x - x_hat kept), with the reconstruction error at the site so the effect can be judged against it. Written by feature-patch; re-running a (basis, source, target, mode) replaces its rows.';
COMMENT ON COLUMN patches.basis IS 'The shared basis (bases.name); its stage is the patched site.';
COMMENT ON COLUMN patches.source_step IS 'Checkpoint whose feature activations are patched in (mode patch); recorded for every mode.';
COMMENT ON COLUMN patches.target_step IS 'Checkpoint whose model is run and patched.';
COMMENT ON COLUMN patches.mode IS 'f_new: patch = the source checkpoint''s activations on the same tokens; zero = 0; mean = the feature''s mean activation at the target (trajectories.mean_activation); scale = the target''s activations times scale.';
COMMENT ON COLUMN patches.scale IS 'The factor of mode scale; NULL for the other modes.';
COMMENT ON COLUMN patches.feature_set IS 'The patched feature ids joined by commas, in ascending order: one feature alone, or the whole selection together.';
COMMENT ON COLUMN patches.feature_ids IS 'The patched feature ids as a list (basis feature indices).';
COMMENT ON COLUMN patches.split IS 'Token split the metric is measured on (a task sub-task for demo runs, the activation set''s split otherwise).';
COMMENT ON COLUMN patches.metric IS 'loss: mean next-token cross-entropy over all positions; accuracy: top-1 accuracy at graded positions; kl_divergence: mean KL(clean || patched) of the next-token distribution over all positions; logit_diff: at graded positions of demo tasks, the correct token''s logit minus the largest other logit.';
COMMENT ON COLUMN patches.clean IS 'The metric of the unpatched model (0 for kl_divergence).';
COMMENT ON COLUMN patches.patched IS 'The metric with the feature set patched.';
COMMENT ON COLUMN patches.delta IS 'patched - clean.';
COMMENT ON COLUMN patches.recon_rel_error IS 'Mean over the split''s tokens of ||x - x_hat|| / ||x|| at the site: how far the basis is from the activations it patches.';
COMMENT ON COLUMN patches.error_norm_share IS 'sum ||x - x_hat|| / sum ||x|| over the split''s tokens: the error term''s share of the site''s norm.';
COMMENT ON COLUMN patches.spliced_loss_delta IS 'Loss with the full reconstruction x_hat spliced in for x, minus the clean loss: an effect on loss much smaller than this is within what the approximation alone can explain.';
COMMENT ON COLUMN patches.n_tokens IS 'Tokens of the split the metrics average over (all positions; accuracy and logit_diff use the graded ones among them).';
COMMENT ON COLUMN patches.created_at IS 'When feature-patch wrote the row (UTC).';
