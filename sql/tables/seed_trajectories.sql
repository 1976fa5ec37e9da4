-- seed_trajectories: the trajectories of a shared basis's other seeds (shared-feature-fit --seeds
-- N, then feature-trajectory-sweep), for checking that births do not depend on the seed.
CREATE TABLE seed_trajectories (
    basis VARCHAR NOT NULL,
    seed BIGINT NOT NULL,
    feature_id INTEGER NOT NULL,
    matched_feature_id INTEGER NOT NULL,
    match_cosine DOUBLE NOT NULL,
    step BIGINT NOT NULL,
    activation_rate DOUBLE NOT NULL,
    mean_activation DOUBLE NOT NULL,
    energy DOUBLE NOT NULL,
    PRIMARY KEY (basis, seed, feature_id, step)
);
COMMENT ON TABLE seed_trajectories IS 'One row per (shared basis, other seed, feature of that seed''s dictionary, checkpoint): the feature''s activation statistics when the checkpoint is encoded in the dictionary fitted with that seed, and the feature of the basis it matches.';
COMMENT ON COLUMN seed_trajectories.basis IS 'The shared basis (bases.name) whose other seed this is.';
COMMENT ON COLUMN seed_trajectories.seed IS 'The seed of this dictionary (one of bases.seeds, not the first).';
COMMENT ON COLUMN seed_trajectories.feature_id IS 'Feature index in the seed''s own dictionary.';
COMMENT ON COLUMN seed_trajectories.matched_feature_id IS 'The basis''s feature it is paired with by a one-to-one assignment (Hungarian) maximising decoder cosine.';
COMMENT ON COLUMN seed_trajectories.match_cosine IS 'Decoder cosine of the pair: above 0.9 the two count as the same feature.';
COMMENT ON COLUMN seed_trajectories.step IS 'Checkpoint step (as trajectories.step).';
COMMENT ON COLUMN seed_trajectories.activation_rate IS 'Share of tokens on which the feature is active (as trajectories.activation_rate).';
COMMENT ON COLUMN seed_trajectories.mean_activation IS 'Mean activation over all tokens (as trajectories.mean_activation).';
COMMENT ON COLUMN seed_trajectories.energy IS 'Share of the reconstruction''s energy (as trajectories.energy).';
