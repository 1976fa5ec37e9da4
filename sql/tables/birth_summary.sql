-- birth_summary: births per step window against a shuffled-order null (feature-birth-analyze).
CREATE TABLE birth_summary (
    basis VARCHAR NOT NULL,
    metric VARCHAR NOT NULL,
    presence VARCHAR NOT NULL DEFAULT 'absolute',
    threshold DOUBLE NOT NULL,
    persistence INTEGER NOT NULL,
    stable_eps DOUBLE NOT NULL,
    stable_cos DOUBLE NOT NULL,
    window_start BIGINT NOT NULL,
    window_end BIGINT NOT NULL,
    births INTEGER NOT NULL,
    censored_births INTEGER,
    null_births_mean DOUBLE NOT NULL,
    null_censored_births_mean DOUBLE,
    null_births_sd DOUBLE,
    n_features INTEGER NOT NULL,
    n_present_at_init INTEGER NOT NULL,
    birth_rate DOUBLE NOT NULL,
    null_false_birth_rate DOUBLE NOT NULL,
    permutations INTEGER NOT NULL,
    seed BIGINT NOT NULL,
    seed_births_agreement DOUBLE,
    seed_matched_features INTEGER,
    PRIMARY KEY (basis, metric, presence, threshold, persistence, stable_eps, stable_cos, window_end)
);
COMMENT ON TABLE birth_summary IS 'One row per (shared basis, birth-rule parameters, pair of consecutive checkpoints): how many features were born in that step window, against the same rule applied with the checkpoint order shuffled.';
COMMENT ON COLUMN birth_summary.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN birth_summary.metric IS 'Trajectory column the rule reads (as births.metric).';
COMMENT ON COLUMN birth_summary.presence IS 'How T sets each feature''s threshold (as births.presence).';
COMMENT ON COLUMN birth_summary.threshold IS 'T of the rule (as births.threshold).';
COMMENT ON COLUMN birth_summary.persistence IS 'K of the rule (as births.persistence).';
COMMENT ON COLUMN birth_summary.stable_eps IS 'E of the rule (as births.stable_eps).';
COMMENT ON COLUMN birth_summary.stable_cos IS 'C of the rule (as births.stable_cos).';
COMMENT ON COLUMN birth_summary.window_start IS 'The checkpoint before the window (exclusive): the window is (window_start, window_end].';
COMMENT ON COLUMN birth_summary.window_end IS 'The checkpoint ending the window (inclusive); births with birth_step = window_end fall in it.';
COMMENT ON COLUMN birth_summary.births IS 'Features born in the window (real checkpoint order), censored births included.';
COMMENT ON COLUMN birth_summary.censored_births IS 'Of those, the censored births (births.birth_censored): only possible in the last K-1 windows. NULL on rows written before this column existed.';
COMMENT ON COLUMN birth_summary.null_births_mean IS 'Mean over the permutations of the features born in the window when each feature''s metric values are put in a shuffled checkpoint order.';
COMMENT ON COLUMN birth_summary.null_censored_births_mean IS 'Of null_births_mean, the censored births: the same rule finds them in shuffled orders too. NULL on rows written before this column existed.';
COMMENT ON COLUMN birth_summary.null_births_sd IS 'Standard deviation of that count over the permutations; NULL with one permutation.';
COMMENT ON COLUMN birth_summary.n_features IS 'Features of the basis with a trajectory.';
COMMENT ON COLUMN birth_summary.n_present_at_init IS 'Features present at the first checkpoint (real order), which are not births.';
COMMENT ON COLUMN birth_summary.birth_rate IS 'All births (real order) / n_features; the same on every row of a parameter set.';
COMMENT ON COLUMN birth_summary.null_false_birth_rate IS 'Mean births per permutation / n_features: how often the rule calls a birth when the order carries no signal. Same on every row of a parameter set.';
COMMENT ON COLUMN birth_summary.permutations IS 'Number of shuffled orders in the null.';
COMMENT ON COLUMN birth_summary.seed IS 'Seed of the numpy generator that drew the permutations.';
COMMENT ON COLUMN birth_summary.seed_births_agreement IS 'For a basis fitted with --seeds N > 1: of the features matched across seeds (decoder cosine >= 0.9 after a one-to-one assignment), the share whose birth agrees within one checkpoint under the same rule (both present at init, both never born, or born within one checkpoint of each other), over every other seed. NULL with one seed.';
COMMENT ON COLUMN birth_summary.seed_matched_features IS 'Matched feature pairs that seed_births_agreement is the share of, summed over the other seeds; NULL with one seed.';
