-- Grokking experiment, per basis: the share of the answer features' decoder variation that lies
-- in the run's key frequencies (answer_feature_frequencies). Parameters: $basis.
SELECT key_frequency_share FROM answer_feature_frequencies WHERE basis = $basis
