-- sort_by: basis
-- answer_feature_frequencies: per modular-addition basis, how its answer features lie in the
-- residual stream as a function of the answer (featurestore feature-frequencies).
CREATE TABLE answer_feature_frequencies (
    basis VARCHAR NOT NULL,
    step BIGINT NOT NULL,
    n_answer_features INTEGER NOT NULL,
    answers_covered INTEGER NOT NULL,
    frequency_shares DOUBLE[] NOT NULL,
    key_frequency_share DOUBLE NOT NULL,
    key_frequencies INTEGER[] NOT NULL,
    PRIMARY KEY (basis)
);
COMMENT ON TABLE answer_feature_frequencies IS 'Per shared basis of a modular-addition run: the features that look the answer up (the answer alone explains >= 90% of their variance at ''='' and they follow no one frequency), their unit decoder directions averaged per answer, and how that function of the answer splits by Fourier frequency. Features built on the Fourier algorithm put most of it in the key frequencies.';
COMMENT ON COLUMN answer_feature_frequencies.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN answer_feature_frequencies.step IS 'The checkpoint whose activations sorted the features (feature_frequencies.step).';
COMMENT ON COLUMN answer_feature_frequencies.n_answer_features IS 'Features that look the answer up; each is assigned the answer it fires most on.';
COMMENT ON COLUMN answer_feature_frequencies.answers_covered IS 'Answers (of p) with at least one such feature.';
COMMENT ON COLUMN answer_feature_frequencies.frequency_shares IS 'Share of the per-answer mean decoder directions'' squared norm in each frequency over the answer: element 1 the constant, element k + 1 frequency k; sums to 1.';
COMMENT ON COLUMN answer_feature_frequencies.key_frequency_share IS 'Share of the non-constant part in the run''s key frequencies (uniform over frequencies would be their count / ((p - 1) / 2)).';
COMMENT ON COLUMN answer_feature_frequencies.key_frequencies IS 'The run''s key frequencies (progress_measures.key_frequencies).';
