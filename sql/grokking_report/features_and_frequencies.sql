-- Grokking report, Features and frequencies: per basis of the run and frequency, how many features
-- follow it at the last checkpoint (feature_frequencies). Parameters: $run.
SELECT f.basis, f.dominant_frequency, f.key_frequency, count(*) AS features,
       round(avg(f.dominant_share), 3) AS mean_dominant_share,
       round(avg(f.answer_variance_share), 3) AS mean_answer_variance_share
FROM feature_frequencies f JOIN bases b ON b.name = f.basis
WHERE b.run = $run AND f.follows_frequency
GROUP BY ALL ORDER BY f.basis, features DESC
