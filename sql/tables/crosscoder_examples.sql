-- crosscoder_examples: the top activating contexts of every latent of a train-crosscoder basis,
-- with what the latent writes into each source there (crosscoder-sweep).
CREATE TABLE crosscoder_examples (
    basis VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    value FLOAT NOT NULL,
    source_values MAP(VARCHAR, DOUBLE) NOT NULL,
    source_inputs MAP(VARCHAR, DOUBLE) NOT NULL,
    sequence_id BIGINT NOT NULL,
    position INTEGER NOT NULL,
    split VARCHAR NOT NULL,
    context_token_ids INTEGER[] NOT NULL,
    context_start INTEGER NOT NULL,
    token_text VARCHAR,
    context_text VARCHAR,
    PRIMARY KEY (basis, feature_id, rank)
);
COMMENT ON TABLE crosscoder_examples IS 'The top activating tokens of each latent of a train-crosscoder basis, with the tokens around them. The sources are aligned (the same tokens in every model), so one context serves all of them; source_values and source_inputs say, per source, what the latent writes there and how much that source''s activations drive it.';
COMMENT ON COLUMN crosscoder_examples.basis IS 'The basis (bases.name) trained by train-crosscoder.';
COMMENT ON COLUMN crosscoder_examples.feature_id IS 'Latent index in the basis (model_diff.feature_id).';
COMMENT ON COLUMN crosscoder_examples.rank IS '1 for the largest latent value, then 2, 3, ... (ties: the earlier token first).';
COMMENT ON COLUMN crosscoder_examples.value IS 'The latent value (the joint code, normalised units) at this token.';
COMMENT ON COLUMN crosscoder_examples.source_values IS 'Source label -> latent value x the latent''s decoder norm for that source: what it writes into that source here (crosscoder_latent_stats units).';
COMMENT ON COLUMN crosscoder_examples.source_inputs IS 'Source label -> that source''s term of the latent''s pre-activation at this token (its normalised activations times the encoder column); with the encoder bias they sum to the pre-activation.';
COMMENT ON COLUMN crosscoder_examples.sequence_id IS 'Sequence of the activating token.';
COMMENT ON COLUMN crosscoder_examples.position IS 'Position of the activating token in its sequence.';
COMMENT ON COLUMN crosscoder_examples.split IS 'Token split of the sequence (e.g. reverse).';
COMMENT ON COLUMN crosscoder_examples.context_token_ids IS 'Token ids of the context window around the activating token (up to 8 before it, it, up to 4 after).';
COMMENT ON COLUMN crosscoder_examples.context_start IS 'Position in the sequence of the first context token; the activating token is context_token_ids[position - context_start + 1].';
COMMENT ON COLUMN crosscoder_examples.token_text IS 'The activating token as text (token_strings of the first source''s run); NULL when that run has no token strings.';
COMMENT ON COLUMN crosscoder_examples.context_text IS 'The context window as text, the activating token marked as ⟦token⟧; NULL when the run has no token strings.';
