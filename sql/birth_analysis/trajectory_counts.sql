-- feature-birth-analyze's check of a basis's trajectories: one row of its trajectory rows,
-- features, checkpoints and rows without a decoder norm. Parameters: $basis.
SELECT count(*), count(DISTINCT feature_id), count(DISTINCT step),
       count_if(decoder_norm IS NULL)
FROM trajectories WHERE basis = $basis
