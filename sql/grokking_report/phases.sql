-- Grokking report, Phases: the run's modulus, key frequencies and the steps at which it memorised,
-- its test accuracy jumped and it grokked (grokking_phases). Parameters: $run.
SELECT p, key_frequencies, memorised_step, jump_step, grokked_step, last_step,
       round(final_test_accuracy, 4) AS final_test_accuracy,
       round(final_key_frequency_share, 3) AS final_key_frequency_share
FROM grokking_phases WHERE run = $run
