-- sort_by: run, step
-- progress_measures: the grokking experiment's progress measures (Nanda et al., 2023), one row per
-- checkpoint of a modular-addition run (featurestore experiment grokking).
CREATE TABLE progress_measures (
    run VARCHAR NOT NULL,
    step BIGINT NOT NULL,
    train_loss DOUBLE NOT NULL,
    test_loss DOUBLE NOT NULL,
    train_accuracy DOUBLE NOT NULL,
    test_accuracy DOUBLE NOT NULL,
    restricted_loss DOUBLE NOT NULL,
    excluded_loss DOUBLE NOT NULL,
    key_frequencies INTEGER[] NOT NULL,
    key_frequency_share DOUBLE NOT NULL,
    frequency_shares DOUBLE[] NOT NULL,
    PRIMARY KEY (run, step)
);
COMMENT ON TABLE progress_measures IS 'Per checkpoint of a modular-addition run: loss and accuracy on the trained and held-out pairs, restricted and excluded loss, and the Fourier decomposition of the token embedding.';
COMMENT ON COLUMN progress_measures.run IS 'The run (runs.run), trained by featurestore experiment grokking.';
COMMENT ON COLUMN progress_measures.step IS 'Checkpoint step (checkpoints.step).';
COMMENT ON COLUMN progress_measures.train_loss IS 'Cross-entropy of the answer on the trained pairs (nats).';
COMMENT ON COLUMN progress_measures.test_loss IS 'Cross-entropy of the answer on the held-out pairs (nats).';
COMMENT ON COLUMN progress_measures.train_accuracy IS 'Share of the trained pairs answered correctly.';
COMMENT ON COLUMN progress_measures.test_accuracy IS 'Share of the held-out pairs answered correctly.';
COMMENT ON COLUMN progress_measures.restricted_loss IS 'Train loss of the answer logits kept only along cos and sin of w_k(a + b - c) for the key frequencies k (and the constant): how well the Fourier algorithm alone answers.';
COMMENT ON COLUMN progress_measures.excluded_loss IS 'Train loss of the answer logits with those key-frequency directions removed: how well the model answers without the Fourier algorithm (memorisation).';
COMMENT ON COLUMN progress_measures.key_frequencies IS 'The run''s key frequencies k (w_k = 2 pi k / p): the fewest frequencies holding 80% of the non-constant share of the last checkpoint''s embedding, at most 8. The same on every row of a run.';
COMMENT ON COLUMN progress_measures.key_frequency_share IS 'Share of the embedding''s non-constant squared norm in the key frequencies at this checkpoint.';
COMMENT ON COLUMN progress_measures.frequency_shares IS 'Share of the token embedding''s squared norm (rows 0..p-1) in each frequency of the real Fourier basis over Z_p: element 1 the constant, element k + 1 frequency k (cos and sin together); sums to 1.';
