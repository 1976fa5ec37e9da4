-- sort_by: basis, metric, presence, threshold, persistence, stable_eps, stable_cos, birth_step, feature_id
-- births: when each feature of a shared basis is born, stabilises and dies (feature-birth-analyze).
CREATE TABLE births (
    basis VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    metric VARCHAR NOT NULL,
    presence VARCHAR NOT NULL DEFAULT 'absolute',
    threshold DOUBLE NOT NULL,
    persistence INTEGER NOT NULL,
    stable_eps DOUBLE NOT NULL,
    stable_cos DOUBLE NOT NULL,
    feature_threshold DOUBLE,
    first_present_step BIGINT,
    birth_step BIGINT,
    birth_censored BOOLEAN,
    stabilization_step BIGINT,
    death_step BIGINT,
    death_censored BOOLEAN,
    drift DOUBLE,
    present_at_init BOOLEAN NOT NULL,
    PRIMARY KEY (basis, metric, presence, threshold, persistence, stable_eps, stable_cos, feature_id)
);
COMMENT ON TABLE births IS 'One row per (shared basis, feature, birth-rule parameters): the checkpoints at which the feature is born, stabilises and dies under the rule of sql/macros/feature_births.sql, applied to the checkpoints in step order.';
COMMENT ON COLUMN births.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN births.feature_id IS 'Feature index in the basis (trajectories.feature_id).';
COMMENT ON COLUMN births.metric IS 'Trajectory column the rule reads: activation_rate, mean_activation, energy or decoder_norm.';
COMMENT ON COLUMN births.presence IS 'How T sets each feature''s threshold: absolute (T itself) or relative (T times the feature''s own peak of the metric over the checkpoints). Rows written before this column existed are absolute.';
COMMENT ON COLUMN births.threshold IS 'T: with presence absolute the feature is present at a checkpoint when the metric is >= T; with presence relative, when it is >= T times the feature''s peak.';
COMMENT ON COLUMN births.feature_threshold IS 'The threshold applied to this feature (T, or T times its peak); a feature is present where the metric is >= it and > 0. NULL on rows written before this column existed.';
COMMENT ON COLUMN births.persistence IS 'K: a birth (death) needs the metric >= T (< T) at K consecutive checkpoints, the first one included.';
COMMENT ON COLUMN births.stable_eps IS 'E: stable means |metric - final metric| <= E * |final metric| at every later checkpoint.';
COMMENT ON COLUMN births.stable_cos IS 'C: stable also means direction_cosine_final >= C at every later checkpoint (NULL fails but at the final checkpoint).';
COMMENT ON COLUMN births.first_present_step IS 'First checkpoint at which the feature is present at all (the first checkpoint if present at init); NULL if never, or on rows written before this column existed.';
COMMENT ON COLUMN births.birth_step IS 'First checkpoint from which the feature is present for K checkpoints, or at every checkpoint to the last when fewer than K are left (a censored birth), having been absent at every checkpoint before it; NULL if never, if present at init, or if it blinked on before its sustained onset (see first_present_step).';
COMMENT ON COLUMN births.birth_censored IS 'True when the birth falls in the last K-1 checkpoints: present at every checkpoint from it to the last, but fewer than K could be observed. NULL when there is no birth, or on rows written before this column existed.';
COMMENT ON COLUMN births.stabilization_step IS 'First checkpoint at or after birth (or the first checkpoint, if present at init) from which the feature stays stable; the last checkpoint if it only is there; NULL if never born nor present at init.';
COMMENT ON COLUMN births.death_step IS 'First checkpoint after birth (or after the first, if present at init) from which the feature is absent for K checkpoints, or at every checkpoint to the last when fewer than K are left (a censored death); NULL if it never dies.';
COMMENT ON COLUMN births.death_censored IS 'True when the death falls in the last K-1 checkpoints, so its persistence could not be observed in full. NULL when there is no death, or on rows written before this column existed.';
COMMENT ON COLUMN births.drift IS 'Sum over the trajectory of 1 - direction_cosine_previous (NULL cosines skipped; NULL if none): how far the direction moved in total.';
COMMENT ON COLUMN births.present_at_init IS 'Present at the first checkpoint: present from the start, so not a birth.';
