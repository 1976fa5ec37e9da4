-- bases: one row per trained dictionary (a crosscoder or SAE over one or more activation sources).
CREATE TABLE bases (
    name VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    arch VARCHAR NOT NULL,
    n_sources INTEGER NOT NULL,
    d_model INTEGER NOT NULL,
    d_hidden INTEGER NOT NULL,
    k INTEGER,
    sources STRUCT(label VARCHAR, activation_set VARCHAR, run VARCHAR, step BIGINT, stage VARCHAR, norm_scale DOUBLE)[] NOT NULL,
    config JSON NOT NULL,
    trainer_config JSON NOT NULL,
    path VARCHAR NOT NULL,
    steps BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    final_metrics JSON,
    run VARCHAR,
    stage VARCHAR,
    fit_quality JSON,
    stability DOUBLE,
    seeds BIGINT[],
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (name)
);
COMMENT ON TABLE bases IS 'One row per trained dictionary (crosscoder, or SAE with one source): its sources, architecture, settings and final metrics.';
COMMENT ON COLUMN bases.name IS 'Basis name, given to train-crosscoder --name; the id features and decoder_directions refer to.';
COMMENT ON COLUMN bases.kind IS 'crosscoder (one encoder/decoder slice per source, shared latent code) or pooled (one encoder/decoder for activations pooled from several checkpoints: a shared-feature-fit SAE).';
COMMENT ON COLUMN bases.arch IS 'vanilla (ReLU + decoder-norm-weighted L1), batchtopk (top k x batch latents, learned inference threshold), topk (each token''s k largest latents), jumprelu (a learned threshold per latent, L0 penalty) or matryoshka (batchtopk over nested prefixes of the dictionary, config.group_sizes).';
COMMENT ON COLUMN bases.n_sources IS 'Number of aligned activation sources the dictionary spans.';
COMMENT ON COLUMN bases.d_model IS 'Width of each source''s activations.';
COMMENT ON COLUMN bases.d_hidden IS 'Number of latents (dictionary size).';
COMMENT ON COLUMN bases.k IS 'batchtopk, matryoshka: mean active latents per token during training; topk: active latents per token; NULL for vanilla and jumprelu.';
COMMENT ON COLUMN bases.sources IS 'The sources in order: label, activation set (name or path), run, step, stage, and the norm scale the model multiplies that source by. For pooled bases, the pooled checkpoints, each with its own norm scale.';
COMMENT ON COLUMN bases.config IS 'The crosscoder config as JSON (enough to rebuild the model).';
COMMENT ON COLUMN bases.trainer_config IS 'The training settings as JSON (learning rate, schedules, batch size, seed, ...); for a dictionary brought in by import-dictionary, {"imported": {format, path, and the config the other tool saved}}.';
COMMENT ON COLUMN bases.path IS 'Folder with crosscoder.safetensors and crosscoder.json, relative to the warehouse root.';
COMMENT ON COLUMN bases.steps IS 'Optimiser steps trained (0 for an imported dictionary).';
COMMENT ON COLUMN bases.tokens IS 'Training tokens consumed (steps x batch size), counted per source (0 for an imported dictionary).';
COMMENT ON COLUMN bases.final_metrics IS 'Metrics of the last logged step as JSON (loss, explained variance per source, L0, dead fraction, ...); NULL for an imported dictionary.';
COMMENT ON COLUMN bases.run IS 'Shared bases (shared-feature-fit): the run whose checkpoints were pooled; NULL for train-crosscoder bases.';
COMMENT ON COLUMN bases.stage IS 'Shared bases: the stage fitted (e.g. layer_2_post_mlp); NULL for train-crosscoder bases.';
COMMENT ON COLUMN bases.fit_quality IS 'The fit-quality report as JSON: explained variance per fitted checkpoint (shared bases) or source (crosscoders), L0, active and dead fraction, and the bounds they were checked against (an imported dictionary''s fit is measured the same way but never rejected); NULL for crosscoders registered before it was recorded.';
COMMENT ON COLUMN bases.seeds IS 'shared-feature-fit --seeds N: the N seeds fitted. The first is this basis; each other seed''s weights lie in <path>/seed_<seed>/, and the sweep encodes every checkpoint in them too (seed_trajectories). NULL for other bases and rows written before this column existed.';
COMMENT ON COLUMN bases.stability IS 'Shared bases fitted with --seeds N > 1: mean share of features matched at decoder cosine >= 0.9 (Hungarian assignment) between the first seed and each other seed; NULL otherwise.';
COMMENT ON COLUMN bases.created_at IS 'When the basis was registered (UTC).';
