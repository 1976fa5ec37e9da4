-- runs: one row per training run (trained here, fine-tuned from another run, a local Hugging Face
-- model, or external activations registered without a model).
CREATE TABLE runs (
    run VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    model_family VARCHAR,
    parent_run VARCHAR,
    parent_step BIGINT,
    seed BIGINT,
    steps BIGINT,
    d_model INTEGER,
    n_layers INTEGER,
    model_config JSON,
    task_config JSON,
    train_config JSON,
    tokenizer VARCHAR,
    featurestore_version VARCHAR NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (run)
);
COMMENT ON TABLE runs IS 'One row per run: a model trained or fine-tuned here, a local Hugging Face model, or externally registered activations.';
COMMENT ON COLUMN runs.run IS 'Run name (letters, digits, ., _, -); the id every other table refers to.';
COMMENT ON COLUMN runs.kind IS 'pretrain (trained from scratch), finetune (continued from parent_run@parent_step), hf (local Hugging Face model directory), custom (any nn.Module: a factory, safetensors weights and an adapter file) or external (activations only, no model).';
COMMENT ON COLUMN runs.model_family IS 'Stage-name adapter used to read the model: demo, gpt2, gpt_neox, llama, or custom (the adapter in model_config); NULL for external runs.';
COMMENT ON COLUMN runs.parent_run IS 'For finetune runs, the run the weights came from; NULL otherwise.';
COMMENT ON COLUMN runs.parent_step IS 'For finetune runs, the checkpoint step of parent_run the weights came from.';
COMMENT ON COLUMN runs.seed IS 'Random seed of training (weights init, data order); NULL if not trained here.';
COMMENT ON COLUMN runs.steps IS 'Number of optimiser steps of this run (the last checkpoint step).';
COMMENT ON COLUMN runs.d_model IS 'Width of the residual stream.';
COMMENT ON COLUMN runs.n_layers IS 'Number of transformer blocks.';
COMMENT ON COLUMN runs.model_config IS 'Model architecture config as JSON (enough to rebuild the model); custom runs: {factory, config, adapter}.';
COMMENT ON COLUMN runs.task_config IS 'Synthetic task config as JSON (vocabulary, world seed, task mix); NULL if not trained here.';
COMMENT ON COLUMN runs.train_config IS 'Training hyperparameters as JSON; NULL if not trained here.';
COMMENT ON COLUMN runs.featurestore_version IS 'featurestore version that wrote the row.';
COMMENT ON COLUMN runs.created_at IS 'When the row was written (UTC).';
COMMENT ON COLUMN runs.tokenizer IS 'Local tokenizer folder given at registration (absolute path); NULL: the checkpoint folder''s own tokenizer, or the demo task vocabulary.';
