-- sort_by: basis, step, method, src_type, rank, dst_type, dst_id, src_id
-- lineage_edges: which model components write each feature of a shared basis (feature-lineage).
CREATE TABLE lineage_edges (
    basis VARCHAR NOT NULL,
    step BIGINT NOT NULL,
    src_type VARCHAR NOT NULL,
    src_id VARCHAR NOT NULL,
    dst_type VARCHAR NOT NULL,
    dst_id VARCHAR NOT NULL,
    weight DOUBLE NOT NULL,
    method VARCHAR NOT NULL,
    rank INTEGER NOT NULL,
    pruning JSON NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (basis, step, method, src_type, src_id, dst_type, dst_id)
);
COMMENT ON TABLE lineage_edges IS 'One row per edge of a feature''s lineage at one checkpoint of a shared basis''s run: an attention head, MLP neuron, the embeddings or a feature of an upstream basis writing the feature, or the feature promoting or suppressing an output token. Only features passing the causal filter get edges, at most top_k per (feature, method, src_type). Written by feature-lineage; re-running a (basis, step) replaces its rows.';
COMMENT ON COLUMN lineage_edges.basis IS 'The shared basis (bases.name) whose features the edges explain.';
COMMENT ON COLUMN lineage_edges.step IS 'Checkpoint step of the basis''s run whose model was read.';
COMMENT ON COLUMN lineage_edges.src_type IS 'attention_head, mlp_neuron, embedding (token + position embedding), or feature: a feature of the upstream basis (methods decoder_cosine, activation_correlation) or of this basis (method dla).';
COMMENT ON COLUMN lineage_edges.src_id IS 'attention_head: L{block}H{head}, e.g. L1H2; mlp_neuron: L{block}N{neuron}, e.g. L1N37; embedding: embed; feature: the feature id in its basis (the upstream basis is pruning.upstream).';
COMMENT ON COLUMN lineage_edges.dst_type IS 'feature (a feature of this basis), or token (an output token, method dla).';
COMMENT ON COLUMN lineage_edges.dst_id IS 'feature: the feature id in this basis; token: the token id.';
COMMENT ON COLUMN lineage_edges.weight IS 'dfa: mean over the tokens where the feature fires of the source''s direct contribution to the feature''s pre-activation (normalised units, through the linearised final LayerNorm for a final_norm basis); grad_x_act: gradient of the feature''s pre-activation summed over those tokens with respect to the source''s output, times that output, divided by their number; decoder_cosine: cosine of the upstream decoder direction (times the final LayerNorm''s gain, centred, for a final_norm basis) with this feature''s decoder direction; activation_correlation: Pearson correlation of the two features'' activations over the sampled tokens; dla: the feature''s raw-unit decoder direction times the unembedding: the logit it adds to the token.';
COMMENT ON COLUMN lineage_edges.method IS 'dfa (direct feature attribution), grad_x_act (gradient x activation), decoder_cosine, activation_correlation or dla (direct logit attribution).';
COMMENT ON COLUMN lineage_edges.rank IS 'Rank of the absolute weight among the edges kept for the same feature, method and src_type: 1 = largest; ties by source order.';
COMMENT ON COLUMN lineage_edges.pruning IS 'The settings that chose the edges, as JSON: top_k, min_weight, filter (features, patches or energy) and its setting (features, patch_threshold or top_features), upstream, tokens.';
COMMENT ON COLUMN lineage_edges.created_at IS 'When feature-lineage wrote the row (UTC).';
