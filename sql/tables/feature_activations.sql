-- partition_by: basis, step
-- sort_by: feature_id, sequence_id, position
-- feature_activations: the sparse token-level code of every checkpoint in a shared basis.
CREATE TABLE feature_activations (
    basis VARCHAR NOT NULL,
    step BIGINT NOT NULL,
    feature_id INTEGER NOT NULL,
    sequence_id BIGINT NOT NULL,
    position INTEGER NOT NULL,
    value FLOAT NOT NULL
);
COMMENT ON TABLE feature_activations IS 'Every non-zero feature activation: one row per (basis, checkpoint, feature, token). One Parquet file per (basis, step) in tables/feature_activations/basis=<basis>/step=<step>/, so a query naming a basis and step opens only that file; rows sorted by feature_id, so one feature''s rows are found from row-group statistics.';
COMMENT ON COLUMN feature_activations.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN feature_activations.step IS 'Checkpoint step.';
COMMENT ON COLUMN feature_activations.feature_id IS 'Feature index in the basis.';
COMMENT ON COLUMN feature_activations.sequence_id IS 'Sequence of the token (as in the activation set).';
COMMENT ON COLUMN feature_activations.position IS 'Position of the token in its sequence.';
COMMENT ON COLUMN feature_activations.value IS 'The feature''s activation (> 0).';
