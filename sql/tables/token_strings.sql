-- token_strings: the text of every token id of a run's vocabulary, so token ids anywhere in the
-- warehouse can be read (JOIN on run and token_id).
CREATE TABLE token_strings (
    run VARCHAR NOT NULL,
    token_id BIGINT NOT NULL,
    token_text VARCHAR NOT NULL,
    tokenizer VARCHAR NOT NULL,
    PRIMARY KEY (run, token_id)
);
COMMENT ON TABLE token_strings IS 'The text of every token id of a run''s tokenizer, written once per run; join on (run, token_id) to read any token column.';
COMMENT ON COLUMN token_strings.run IS 'Run whose tokenizer this is (runs.run).';
COMMENT ON COLUMN token_strings.token_id IS 'Token id in the run''s vocabulary.';
COMMENT ON COLUMN token_strings.token_text IS 'The token decoded on its own, as it appears in text (a leading space is kept).';
COMMENT ON COLUMN token_strings.tokenizer IS 'Where the strings came from: the tokenizer folder, or "demo task vocabulary".';
