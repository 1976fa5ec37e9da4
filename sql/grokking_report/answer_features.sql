-- Grokking report, Answer features and the key frequencies: per basis of the run, the share of
-- its answer features' decoders in the key frequencies, beside the share an even spread gives
-- (answer_feature_frequencies). Parameters: $run.
SELECT a.basis, a.n_answer_features, a.answers_covered, a.key_frequencies,
       round(a.key_frequency_share, 3) AS key_frequency_share,
       round(len(a.key_frequencies) / ((g.p - 1) / 2), 3) AS uniform_share
FROM answer_feature_frequencies a JOIN bases b ON b.name = a.basis
JOIN grokking_phases g ON g.run = b.run
WHERE b.run = $run ORDER BY a.basis
