-- crosscoder_latent_stats: what every latent of a train-crosscoder basis (a model diff) does in
-- each of its sources, over the sources' aligned activation sets (crosscoder-sweep).
CREATE TABLE crosscoder_latent_stats (
    basis VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    source VARCHAR NOT NULL,
    source_index INTEGER NOT NULL,
    n_tokens BIGINT NOT NULL,
    activation_rate DOUBLE NOT NULL,
    mean_activation DOUBLE NOT NULL,
    mean_active_activation DOUBLE,
    max_activation DOUBLE NOT NULL,
    energy DOUBLE NOT NULL,
    decoder_norm DOUBLE NOT NULL,
    mean_encoder_input DOUBLE,
    PRIMARY KEY (basis, feature_id, source)
);
COMMENT ON TABLE crosscoder_latent_stats IS 'One row per (train-crosscoder basis, latent, source): the latent''s activity in that source over every token of the aligned activation sets. The code is joint (one latent value per token from all sources), so a latent''s value in source s is its latent value times its decoder norm for s: the size of what it writes into that source.';
COMMENT ON COLUMN crosscoder_latent_stats.basis IS 'The basis (bases.name) trained by train-crosscoder.';
COMMENT ON COLUMN crosscoder_latent_stats.feature_id IS 'Latent index in the basis (features.feature_id, model_diff.feature_id).';
COMMENT ON COLUMN crosscoder_latent_stats.source IS 'Source label (bases.sources[].label, e.g. base or ft).';
COMMENT ON COLUMN crosscoder_latent_stats.source_index IS 'Position of the source in bases.sources, from 0.';
COMMENT ON COLUMN crosscoder_latent_stats.n_tokens IS 'Tokens encoded (every row of the aligned activation sets).';
COMMENT ON COLUMN crosscoder_latent_stats.activation_rate IS 'Share of tokens on which the latent is active. The code is joint, so this is the same for every source; energy and mean_activation say how much it writes into each.';
COMMENT ON COLUMN crosscoder_latent_stats.mean_activation IS 'Mean over all tokens (zeros included) of latent value x decoder norm for this source, in normalised units.';
COMMENT ON COLUMN crosscoder_latent_stats.mean_active_activation IS 'The same mean over the tokens where the latent writes into this source; NULL if it never does.';
COMMENT ON COLUMN crosscoder_latent_stats.max_activation IS 'Largest latent value x decoder norm for this source (0 if never active).';
COMMENT ON COLUMN crosscoder_latent_stats.energy IS 'The latent''s share of this source''s reconstructed variance: sum over tokens of ||f_i d_is||^2 divided by the same sum over all latents.';
COMMENT ON COLUMN crosscoder_latent_stats.decoder_norm IS 'Norm of the latent''s decoder vector for this source (features.decoder_norms[source_index + 1]).';
COMMENT ON COLUMN crosscoder_latent_stats.mean_encoder_input IS 'Mean, over the tokens where the latent is active, of this source''s term of its pre-activation (the source''s normalised activations times its encoder column): which model''s activations drive the latent. The terms of all sources plus the encoder bias give the pre-activation. NULL if never active.';
