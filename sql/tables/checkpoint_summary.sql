-- checkpoint_summary: how well a shared basis describes each checkpoint.
CREATE TABLE checkpoint_summary (
    basis VARCHAR NOT NULL,
    step BIGINT NOT NULL,
    n_tokens BIGINT NOT NULL,
    explained_variance DOUBLE NOT NULL,
    relative_reconstruction_error DOUBLE NOT NULL,
    l0 DOUBLE NOT NULL,
    active_fraction DOUBLE NOT NULL,
    dead_fraction DOUBLE NOT NULL,
    PRIMARY KEY (basis, step)
);
COMMENT ON TABLE checkpoint_summary IS 'One row per (shared basis, checkpoint): reconstruction quality and sparsity of the basis at that checkpoint.';
COMMENT ON COLUMN checkpoint_summary.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN checkpoint_summary.step IS 'Checkpoint step.';
COMMENT ON COLUMN checkpoint_summary.n_tokens IS 'Tokens encoded.';
COMMENT ON COLUMN checkpoint_summary.explained_variance IS '1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the checkpoint''s tokens.';
COMMENT ON COLUMN checkpoint_summary.relative_reconstruction_error IS 'Mean over tokens of ||x - x_hat|| / ||x||.';
COMMENT ON COLUMN checkpoint_summary.l0 IS 'Mean number of active features per token.';
COMMENT ON COLUMN checkpoint_summary.active_fraction IS 'l0 / number of features.';
COMMENT ON COLUMN checkpoint_summary.dead_fraction IS 'Share of features never active at this checkpoint.';
