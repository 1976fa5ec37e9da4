-- Grokking report's plots: the run's phase boundaries, one row per phase (memorised,
-- test-accuracy jump, grokked) with its step + 1 (the plots' log axis). Parameters: $run.
SELECT step + 1 AS step_plus_1, phase FROM (
    UNPIVOT (SELECT memorised_step, jump_step, grokked_step FROM grokking_phases
             WHERE run = $run)
    ON memorised_step AS 'memorised', jump_step AS 'test-accuracy jump',
       grokked_step AS 'grokked'
    INTO NAME phase VALUE step)
