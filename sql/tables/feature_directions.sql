-- feature_directions: each feature's direction at each checkpoint, refitted from that checkpoint's
-- codes, for drift and for cosines between checkpoints in SQL.
CREATE TABLE feature_directions (
    basis VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    step BIGINT NOT NULL,
    norm DOUBLE NOT NULL,
    direction FLOAT[] NOT NULL,
    PRIMARY KEY (basis, feature_id, step)
);
COMMENT ON TABLE feature_directions IS 'One row per (shared basis, feature, checkpoint): the feature''s decoder direction refitted by least squares on that checkpoint''s codes (x ~ f W + b), in the basis''s normalised units.';
COMMENT ON COLUMN feature_directions.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN feature_directions.feature_id IS 'Feature index in the basis.';
COMMENT ON COLUMN feature_directions.step IS 'Checkpoint step.';
COMMENT ON COLUMN feature_directions.norm IS 'Norm of the refitted vector; 0 when the feature never fired at this checkpoint (direction undefined).';
COMMENT ON COLUMN feature_directions.direction IS 'The refitted vector (length d_model); compare with list_cosine_similarity.';
