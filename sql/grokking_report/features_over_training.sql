-- Grokking report, The features over training: every feature of the run's bases that follows a
-- frequency or looks the answer up, with its birth under one births rule and its peak energy,
-- most energetic first (frequency_births, trajectories). Parameters: $run and the rule:
-- $metric, $presence, $threshold, $persistence, $stable_eps, $stable_cos.
SELECT f.basis, f.feature_id, f.follows, f.dominant_frequency,
       round(f.dominant_share, 3) AS dominant_share, f.birth_step,
       round(max(t.energy), 4) AS peak_energy
FROM frequency_births f JOIN trajectories t USING (basis, feature_id)
WHERE f.run = $run AND f.follows NOT IN ('other', 'not at =') AND metric = $metric
  AND presence = $presence AND threshold = $threshold AND persistence = $persistence
  AND stable_eps = $stable_eps AND stable_cos = $stable_cos
GROUP BY ALL ORDER BY peak_energy DESC
