-- depends_on: grokking_phases
-- frequency_births: every feature of a modular-addition basis (feature_frequencies), its birth
-- under each stored births rule, and where that birth falls against its run's test-accuracy jump
-- (grokking_phases). The grokking question in one query:
--   SELECT follows, count(*) AS features, count(*) FILTER (born_before_jump) AS before
--   FROM frequency_births
--   WHERE basis = 'grok-l0' AND metric = 'energy' AND presence = 'relative'
--   GROUP BY follows;
-- `follows` sorts the features: a key frequency, another frequency, the answer (a feature that
-- looks the answer up: feature_frequencies.answer_feature), or none of these (other; silent at
-- '=': 'not at =').
CREATE OR REPLACE VIEW frequency_births AS
SELECT
    f.basis,
    g.run,
    f.feature_id,
    f.dominant_frequency,
    f.dominant_share,
    f.follows_frequency,
    f.key_frequency,
    CASE WHEN f.key_frequency THEN 'key frequency'
         WHEN f.follows_frequency THEN 'another frequency'
         WHEN f.answer_feature THEN 'answer'
         WHEN f.n_active = 0 THEN 'not at ='
         ELSE 'other' END AS follows,
    f.answer_variance_share,
    b.metric,
    b.presence,
    b.threshold,
    b.persistence,
    b.stable_eps,
    b.stable_cos,
    b.birth_step,
    b.birth_censored,
    b.present_at_init,
    g.memorised_step,
    g.jump_step,
    b.birth_step < g.jump_step AS born_before_jump,
    g.jump_step - b.birth_step AS steps_before_jump
FROM feature_frequencies AS f
JOIN bases AS s ON s.name = f.basis
JOIN grokking_phases AS g ON g.run = s.run
JOIN births AS b ON b.basis = f.basis AND b.feature_id = f.feature_id;
COMMENT ON VIEW frequency_births IS 'Features of modular-addition bases with the frequency they follow, their births per stored rule, and whether each was born before its run''s test-accuracy jump.';
