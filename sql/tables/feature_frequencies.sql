-- sort_by: basis, feature_id
-- feature_frequencies: which frequency each feature of a modular-addition basis follows.
CREATE TABLE feature_frequencies (
    basis VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    step BIGINT NOT NULL,
    n_active INTEGER NOT NULL,
    answer_profile DOUBLE[] NOT NULL,
    answer_variance_share DOUBLE,
    dominant_frequency INTEGER,
    dominant_share DOUBLE,
    follows_frequency BOOLEAN NOT NULL,
    answer_feature BOOLEAN NOT NULL,
    key_frequency BOOLEAN NOT NULL,
    PRIMARY KEY (basis, feature_id)
);
COMMENT ON TABLE feature_frequencies IS 'Per feature of a shared basis on a modular-addition run: its activation at the answer position (''='') over every problem at one checkpoint, as a function of the answer, and the Fourier frequency that function follows (featurestore feature-frequencies).';
COMMENT ON COLUMN feature_frequencies.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN feature_frequencies.feature_id IS 'Feature index in the basis.';
COMMENT ON COLUMN feature_frequencies.step IS 'The checkpoint whose activations were read (by default the basis''s last).';
COMMENT ON COLUMN feature_frequencies.n_active IS 'Problems (a, b) on which the feature fires at the answer position.';
COMMENT ON COLUMN feature_frequencies.answer_profile IS 'Mean activation at the answer position over the problems with answer c = (a + b) mod p: element c + 1 for answer c.';
COMMENT ON COLUMN feature_frequencies.answer_variance_share IS 'Share of the activation''s variance over all p^2 problems explained by the answer alone (between-answer variance / total variance); NULL for a feature that never fires.';
COMMENT ON COLUMN feature_frequencies.dominant_frequency IS 'The non-constant frequency k holding the largest share of answer_profile''s squared norm (fourier_shares); NULL for a feature that never fires.';
COMMENT ON COLUMN feature_frequencies.dominant_share IS 'That frequency''s share of answer_profile''s non-constant squared norm (1: a pure wave of frequency k).';
COMMENT ON COLUMN feature_frequencies.follows_frequency IS 'Whether the feature follows one frequency: its dominant frequency holds at least half of answer_profile''s non-constant squared norm (dominant_share >= 0.5).';
COMMENT ON COLUMN feature_frequencies.answer_feature IS 'Whether the feature looks the answer up: it follows no one frequency, yet the answer alone explains at least 90% of its variance (answer_variance_share >= 0.9).';
COMMENT ON COLUMN feature_frequencies.key_frequency IS 'Whether the feature follows one of the run''s key frequencies (progress_measures.key_frequencies): follows_frequency and dominant_frequency a key frequency.';
