-- Grokking report, Causal checks: the loss and accuracy patches of the run's bases, largest
-- change first (patches). Parameters: $run.
SELECT p.basis, p.feature_set, p.split, p.metric, round(p.clean, 4) AS clean,
       round(p.delta, 4) AS delta
FROM patches p JOIN bases s ON s.name = p.basis
WHERE s.run = $run AND p.metric IN ('loss', 'accuracy')
ORDER BY abs(p.delta) DESC
