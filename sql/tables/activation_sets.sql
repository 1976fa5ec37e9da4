-- activation_sets: one row per set of activations on disk (one run, checkpoint and stage).
CREATE TABLE activation_sets (
    name VARCHAR NOT NULL,
    run VARCHAR,
    step BIGINT,
    stage VARCHAR,
    path VARCHAR NOT NULL,
    format VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    n_tokens BIGINT NOT NULL,
    d_model INTEGER NOT NULL,
    norm_scale DOUBLE NOT NULL,
    norm_excludes_first BOOLEAN NOT NULL,
    tokens_fingerprint VARCHAR NOT NULL,
    token_source VARCHAR,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (name)
);
COMMENT ON TABLE activation_sets IS 'One row per activation set on disk: the activations of one checkpoint at one stage, on a token set shared by every checkpoint it was collected with.';
COMMENT ON COLUMN activation_sets.name IS 'Set id: RUN@STEP:STAGE for sets tied to a checkpoint, or the name given to register-activations --name.';
COMMENT ON COLUMN activation_sets.run IS 'Run of the checkpoint (runs.run); NULL for a set registered by name only.';
COMMENT ON COLUMN activation_sets.step IS 'Checkpoint step (checkpoints.step); NULL for a set registered by name only.';
COMMENT ON COLUMN activation_sets.stage IS 'Stage name, e.g. layer_2_post_mlp or final_norm; NULL for a set registered by name only.';
COMMENT ON COLUMN activation_sets.path IS 'Location relative to the warehouse root (collected and converted sets) or absolute (sets registered in place).';
COMMENT ON COLUMN activation_sets.format IS 'hf_dataset (a datasets save_to_disk folder) or parquet.';
COMMENT ON COLUMN activation_sets.source IS 'collected (read from a model here through nnsight), registered (brought from elsewhere in the activation-set format, used in place) or converted (brought from elsewhere in another form, converted once into a float32 copy inside the warehouse; token_source names the input and its form).';
COMMENT ON COLUMN activation_sets.n_tokens IS 'Number of rows, one per token position.';
COMMENT ON COLUMN activation_sets.d_model IS 'Length of each activation vector.';
COMMENT ON COLUMN activation_sets.norm_scale IS 'Scalar that brings the mean L2 norm of the activations to sqrt(d_model); readers multiply by it on request and models trained on the set store it.';
COMMENT ON COLUMN activation_sets.norm_excludes_first IS 'Whether position 0 (often an outlier norm) was left out when estimating norm_scale.';
COMMENT ON COLUMN activation_sets.tokens_fingerprint IS 'SHA-256 of the (sequence_id, position, token_id) columns; sets with equal fingerprints have aligned rows.';
COMMENT ON COLUMN activation_sets.token_source IS 'Where the tokens came from, e.g. "demo task splits=train,heldout sequences=1024 seed=0".';
COMMENT ON COLUMN activation_sets.created_at IS 'When the set was written (UTC).';
