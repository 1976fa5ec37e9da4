-- grokking_phases: one row per modular-addition run (featurestore experiment grokking) with the
-- steps at which its training passes the paper's three phases, read off progress_measures:
--   memorised_step  the first checkpoint answering 99% of the trained pairs (memorisation done)
--   jump_step       the first checkpoint answering half the held-out pairs (the test-accuracy
--                   jump, midway)
--   grokked_step    the first checkpoint answering 99% of the held-out pairs (cleanup done)
-- Circuit formation is what happens between memorised_step and jump_step.
CREATE OR REPLACE VIEW grokking_phases AS
SELECT
    m.run,
    CAST(json_extract(any_value(r.task_config), '$.p') AS INTEGER) AS p,
    any_value(m.key_frequencies) AS key_frequencies,
    min(m.step) FILTER (WHERE m.train_accuracy >= 0.99) AS memorised_step,
    min(m.step) FILTER (WHERE m.test_accuracy >= 0.5) AS jump_step,
    min(m.step) FILTER (WHERE m.test_accuracy >= 0.99) AS grokked_step,
    max(m.step) AS last_step,
    arg_max(m.test_accuracy, m.step) AS final_test_accuracy,
    arg_max(m.key_frequency_share, m.step) AS final_key_frequency_share
FROM progress_measures AS m
JOIN runs AS r USING (run)
GROUP BY m.run;
COMMENT ON VIEW grokking_phases IS 'Per modular-addition run: the steps of memorisation (train accuracy >= 0.99), the test-accuracy jump (test accuracy >= 0.5) and grokking (test accuracy >= 0.99), with the key frequencies.';
