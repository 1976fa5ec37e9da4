-- feature_examples: the top activating contexts of every feature at every checkpoint.
CREATE TABLE feature_examples (
    basis VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    step BIGINT NOT NULL,
    rank INTEGER NOT NULL,
    value FLOAT NOT NULL,
    sequence_id BIGINT NOT NULL,
    position INTEGER NOT NULL,
    split VARCHAR NOT NULL,
    context_token_ids INTEGER[] NOT NULL,
    context_start INTEGER NOT NULL,
    token_text VARCHAR,
    context_text VARCHAR,
    PRIMARY KEY (basis, feature_id, step, rank)
);
COMMENT ON TABLE feature_examples IS 'The top activating tokens of each feature at each checkpoint, with the tokens around them.';
COMMENT ON COLUMN feature_examples.basis IS 'The shared basis (bases.name).';
COMMENT ON COLUMN feature_examples.feature_id IS 'Feature index in the basis.';
COMMENT ON COLUMN feature_examples.step IS 'Checkpoint step.';
COMMENT ON COLUMN feature_examples.rank IS '1 for the strongest activation, then 2, 3, ...';
COMMENT ON COLUMN feature_examples.value IS 'The activation.';
COMMENT ON COLUMN feature_examples.sequence_id IS 'Sequence of the activating token.';
COMMENT ON COLUMN feature_examples.position IS 'Position of the activating token in its sequence.';
COMMENT ON COLUMN feature_examples.split IS 'Token split of the sequence (e.g. induction).';
COMMENT ON COLUMN feature_examples.context_token_ids IS 'Token ids of the context window around the activating token (up to 8 before it, it, up to 4 after).';
COMMENT ON COLUMN feature_examples.context_start IS 'Position in the sequence of the first context token; the activating token is context_token_ids[position - context_start + 1].';
COMMENT ON COLUMN feature_examples.token_text IS 'The activating token as text (token_strings of the run); NULL when the run has no token strings.';
COMMENT ON COLUMN feature_examples.context_text IS 'The context window as text, the activating token marked as ⟦token⟧; NULL when the run has no token strings.';
