-- checkpoints: one row per saved checkpoint of a run, with its evaluation metrics.
CREATE TABLE checkpoints (
    run VARCHAR NOT NULL,
    step BIGINT NOT NULL,
    tokens_seen BIGINT,
    path VARCHAR,
    train_loss DOUBLE,
    train_accuracy DOUBLE,
    heldout_loss DOUBLE,
    heldout_accuracy DOUBLE,
    split_metrics STRUCT(split VARCHAR, loss DOUBLE, accuracy DOUBLE)[],
    eval_tokens VARCHAR,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (run, step)
);
COMMENT ON TABLE checkpoints IS 'One row per checkpoint of a run, with loss and accuracy per data split; see the checkpoint_metrics view for one row per split.';
COMMENT ON COLUMN checkpoints.run IS 'Run the checkpoint belongs to (runs.run).';
COMMENT ON COLUMN checkpoints.step IS 'Optimiser steps taken when the checkpoint was saved; 0 is the initialisation.';
COMMENT ON COLUMN checkpoints.tokens_seen IS 'Training tokens consumed up to this step.';
COMMENT ON COLUMN checkpoints.path IS 'Checkpoint directory (model.safetensors + config.json) relative to the warehouse root, an absolute local model directory (hf runs), or an absolute safetensors weights file (custom runs); NULL for external runs.';
COMMENT ON COLUMN checkpoints.train_loss IS 'Mean next-token cross-entropy on the train split (nats).';
COMMENT ON COLUMN checkpoints.train_accuracy IS 'Next-token accuracy on the scored positions of the train split.';
COMMENT ON COLUMN checkpoints.heldout_loss IS 'Mean next-token cross-entropy on the heldout split (nats).';
COMMENT ON COLUMN checkpoints.heldout_accuracy IS 'Next-token accuracy on the scored positions of the heldout split.';
COMMENT ON COLUMN checkpoints.split_metrics IS 'Loss and accuracy for every split (train, heldout and one per sub-task).';
COMMENT ON COLUMN checkpoints.created_at IS 'When the checkpoint was saved (UTC).';
COMMENT ON COLUMN checkpoints.eval_tokens IS 'Token set the heldout metrics of a registered model were measured on (file, sequences, length, tokens fingerprint); NULL for runs trained here (their task''s own splits) and for checkpoints not evaluated.';
