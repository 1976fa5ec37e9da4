-- sort_by: basis, source_step, target_step, rank_by_rate_change
-- diffs: how every feature of a shared basis changed between two checkpoints (feature-compare).
CREATE TABLE diffs (
    basis VARCHAR NOT NULL,
    source_step BIGINT NOT NULL,
    target_step BIGINT NOT NULL,
    feature_id INTEGER NOT NULL,
    source_activation_rate DOUBLE NOT NULL,
    target_activation_rate DOUBLE NOT NULL,
    activation_rate_change DOUBLE NOT NULL,
    log_rate_ratio DOUBLE NOT NULL,
    mean_activation_change DOUBLE NOT NULL,
    energy_change DOUBLE NOT NULL,
    direction_cosine DOUBLE,
    split_rate_changes MAP(VARCHAR, DOUBLE) NOT NULL,
    rank_by_rate_change INTEGER NOT NULL,
    rank_by_log_ratio INTEGER NOT NULL,
    rank_by_mean_change INTEGER NOT NULL,
    rank_by_energy_change INTEGER NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (basis, source_step, target_step, feature_id)
);
COMMENT ON TABLE diffs IS 'One row per (shared basis, source checkpoint, target checkpoint, feature): the change of the feature''s activity, energy and direction from source to target, ranked. Written by feature-compare from the feature_compare macro.';
COMMENT ON COLUMN diffs.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN diffs.source_step IS 'Checkpoint compared from (--source).';
COMMENT ON COLUMN diffs.target_step IS 'Checkpoint compared to (--target).';
COMMENT ON COLUMN diffs.feature_id IS 'Feature index in the basis; features with a trajectory row at both checkpoints.';
COMMENT ON COLUMN diffs.source_activation_rate IS 'trajectories.activation_rate at the source checkpoint.';
COMMENT ON COLUMN diffs.target_activation_rate IS 'trajectories.activation_rate at the target checkpoint.';
COMMENT ON COLUMN diffs.activation_rate_change IS 'target_activation_rate - source_activation_rate.';
COMMENT ON COLUMN diffs.log_rate_ratio IS 'ln((r_t + a) / (r_s + a)) with pseudo-count a = 1 / min(n_tokens at source, n_tokens at target): one token of activity, so a feature silent at one checkpoint gets a finite ratio (silent -> one token is ln 2).';
COMMENT ON COLUMN diffs.mean_activation_change IS 'Change of trajectories.mean_activation (mean over all tokens), target - source.';
COMMENT ON COLUMN diffs.energy_change IS 'Change of trajectories.energy (share of the reconstructed variance), target - source.';
COMMENT ON COLUMN diffs.direction_cosine IS 'Cosine between the feature''s refitted directions (feature_directions) at the two checkpoints; NULL if either is missing or has norm 0 (feature silent, direction undefined).';
COMMENT ON COLUMN diffs.split_rate_changes IS 'Per token split present at both checkpoints in split_profiles: target - source activation rate, as a map split -> change (empty without split profiles).';
COMMENT ON COLUMN diffs.rank_by_rate_change IS 'Rank of |activation_rate_change| among the pair''s features: 1 = largest; ties by feature_id.';
COMMENT ON COLUMN diffs.rank_by_log_ratio IS 'Rank of |log_rate_ratio|: 1 = largest; ties by feature_id.';
COMMENT ON COLUMN diffs.rank_by_mean_change IS 'Rank of |mean_activation_change|: 1 = largest; ties by feature_id.';
COMMENT ON COLUMN diffs.rank_by_energy_change IS 'Rank of |energy_change|: 1 = largest; ties by feature_id.';
COMMENT ON COLUMN diffs.created_at IS 'When feature-compare wrote the row (UTC); rows older than the trajectories they came from are stale.';
