-- trajectories: one row per feature of a shared basis per checkpoint: how strongly and how often
-- the feature is present at that point of training.
CREATE TABLE trajectories (
    basis VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    step BIGINT NOT NULL,
    n_tokens BIGINT NOT NULL,
    activation_rate DOUBLE NOT NULL,
    mean_activation DOUBLE NOT NULL,
    mean_active_activation DOUBLE,
    max_activation DOUBLE NOT NULL,
    energy DOUBLE NOT NULL,
    split_activation_rates MAP(VARCHAR, DOUBLE) NOT NULL,
    direction_cosine_previous DOUBLE,
    direction_cosine_final DOUBLE,
    decoder_norm DOUBLE,
    PRIMARY KEY (basis, feature_id, step)
);
COMMENT ON TABLE trajectories IS 'One row per (shared basis, feature, checkpoint): activation statistics of the feature at that checkpoint, its share of the reconstruction, and how far its direction has moved.';
COMMENT ON COLUMN trajectories.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN trajectories.feature_id IS 'Feature (latent) index in the basis: the same feature at every checkpoint.';
COMMENT ON COLUMN trajectories.step IS 'Checkpoint step (checkpoints.step of the basis''s run).';
COMMENT ON COLUMN trajectories.n_tokens IS 'Tokens encoded at this checkpoint.';
COMMENT ON COLUMN trajectories.activation_rate IS 'Share of tokens on which the feature is active (> 0).';
COMMENT ON COLUMN trajectories.mean_activation IS 'Mean activation over all tokens (zeros included).';
COMMENT ON COLUMN trajectories.mean_active_activation IS 'Mean activation over the tokens where it is active; NULL if never active.';
COMMENT ON COLUMN trajectories.max_activation IS 'Largest activation at this checkpoint (0 if never active).';
COMMENT ON COLUMN trajectories.energy IS 'The feature''s share of the reconstructed variance at this checkpoint: sum over tokens of ||f_i d_i||^2 divided by the same sum over all features.';
COMMENT ON COLUMN trajectories.split_activation_rates IS 'Activation rate per token split (e.g. induction, modular), as a map split -> rate.';
COMMENT ON COLUMN trajectories.direction_cosine_previous IS 'Cosine between the feature''s refitted direction here and at the previous checkpoint; NULL at the first checkpoint or where either direction is undefined (feature silent).';
COMMENT ON COLUMN trajectories.direction_cosine_final IS 'Cosine between the feature''s refitted direction here and at the last checkpoint swept; NULL where either is undefined.';
COMMENT ON COLUMN trajectories.decoder_norm IS 'Crosscoder-kind bases: the norm of the feature''s decoder slice for this checkpoint (a presence signal); NULL for pooled bases.';
