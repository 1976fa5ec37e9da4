-- split_profiles: each feature's activity per token split at each checkpoint.
CREATE TABLE split_profiles (
    basis VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    step BIGINT NOT NULL,
    split VARCHAR NOT NULL,
    n_tokens BIGINT NOT NULL,
    activation_rate DOUBLE NOT NULL,
    mean_activation DOUBLE NOT NULL,
    PRIMARY KEY (basis, feature_id, step, split)
);
COMMENT ON TABLE split_profiles IS 'One row per (shared basis, feature, checkpoint, token split): where a feature fires, e.g. only on induction sequences.';
COMMENT ON COLUMN split_profiles.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN split_profiles.feature_id IS 'Feature index in the basis.';
COMMENT ON COLUMN split_profiles.step IS 'Checkpoint step.';
COMMENT ON COLUMN split_profiles.split IS 'Token split (the activation set''s split column).';
COMMENT ON COLUMN split_profiles.n_tokens IS 'Tokens of this split encoded.';
COMMENT ON COLUMN split_profiles.activation_rate IS 'Share of the split''s tokens on which the feature is active.';
COMMENT ON COLUMN split_profiles.mean_activation IS 'Mean activation over the split''s tokens (zeros included).';
