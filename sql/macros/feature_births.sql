-- feature_births(basis_name, metric_name, threshold, persistence, stable_eps, stable_cos
--                [, presence := 'absolute'] [, permutations := [[...], ...]]): when each feature
-- of a shared basis is born, stabilises and dies, read off one column of its trajectories:
-- metric_name is activation_rate, mean_activation, energy or decoder_norm (NULL on pooled bases:
-- check before asking for it).
-- Checkpoints are taken in step order j = 0..n-1 (their spacing does not matter), with m_j the
-- metric and K = persistence. The feature's threshold T_f is
--   presence 'absolute'  T_f = threshold, the same for every feature;
--   presence 'relative'  T_f = threshold * max_j m_j: a share of the feature's own peak, so a
--                        latent that fires weakly before its direction exists is not present.
-- The feature is present at j when m_j >= T_f and m_j > 0 (a silent feature is never present).
--   present_at_init     present at j = 0. Such a feature is not a birth (birth_step NULL).
--   first_present_step  the first j at which the feature is present at all.
--   birth_step          the first j from which the feature is present at K checkpoints
--                       j..j+K-1, or, when fewer than K checkpoints are left, at every one of
--                       them to the last: a right-censored birth (birth_censored), whose
--                       persistence could not be observed in full (without this, nothing could
--                       be born at the last K-1 checkpoints); and absent at every checkpoint
--                       before j. A feature that blinks on before its sustained onset has no
--                       clean onset: no birth, though first_present_step says when it showed.
--                       (Allowing blips before the onset triples the births the shuffled null
--                       finds, since a shuffle scatters a feature's present checkpoints.)
--   stabilization_step  the first j at or after birth (after 0 for present_at_init) from which,
--                       at every later checkpoint, |m - m_final| <= stable_eps * |m_final| and
--                       direction_cosine_final >= stable_cos. A NULL cosine (direction undefined:
--                       the feature is silent) fails, except at the final checkpoint, whose cosine
--                       with itself is 1 by definition; so a born feature stabilises at the last
--                       checkpoint at the latest. NULL if never born and not present at init.
--   death_step          the first j after birth (after 0 for present_at_init) from which the
--                       feature is absent at K checkpoints, or at every one left when fewer than
--                       K are (death_censored). NULL if it never dies (or was never born).
--   drift               sum over the trajectory of (1 - direction_cosine_previous), NULL cosines
--                       skipped (NULL if no consecutive pair has one): how far the direction
--                       wandered, step by step.
-- One row per (ordering, feature_id). Ordering 0 is the real checkpoint order. `permutations`
-- adds a null control: each element is a permutation of 0..n-1, and ordering k (1-based) places
-- at checkpoint j the metric value measured at checkpoint permutations[k][j + 1] (the cosines
-- stay where they were measured; the peak, and so T_f, is the same in every order). The rule is
-- the same for every ordering, censoring included, so births in the permuted orders are the
-- births the rule finds when the checkpoint order carries no signal.
-- `other_seed` reads the trajectories of the basis's other seed of that number
-- (seed_trajectories) instead of the basis's own; they have no direction cosines, so their
-- stabilization_step and drift mean little.
CREATE OR REPLACE MACRO feature_births(basis_name, metric_name, threshold, persistence,
                                       stable_eps, stable_cos, presence := 'absolute',
                                       permutations := [], other_seed := NULL) AS TABLE
WITH measured AS (
    SELECT feature_id, step, activation_rate, mean_activation, energy, decoder_norm,
           direction_cosine_previous, direction_cosine_final
    FROM trajectories
    WHERE basis = basis_name AND other_seed IS NULL
    UNION ALL
    SELECT feature_id, step, activation_rate, mean_activation, energy, NULL, NULL, NULL
    FROM seed_trajectories
    WHERE basis = basis_name AND seed = other_seed
),
series AS (
    SELECT
        feature_id,
        step,
        (dense_rank() OVER (ORDER BY step) - 1)::INTEGER AS position,
        CASE metric_name
            WHEN 'activation_rate' THEN activation_rate
            WHEN 'mean_activation' THEN mean_activation
            WHEN 'energy' THEN energy
            WHEN 'decoder_norm' THEN decoder_norm
            ELSE error('feature_births: unknown metric ''' || metric_name || '''; use '
                       || 'activation_rate, mean_activation, energy or decoder_norm')
        END AS value,
        direction_cosine_previous,
        direction_cosine_final
    FROM measured
),
thresholds AS (
    SELECT feature_id,
           CASE presence
               WHEN 'absolute' THEN threshold
               WHEN 'relative' THEN threshold * coalesce(max(value), 0)
               ELSE error('feature_births: unknown presence ''' || presence || '''; use '
                          || 'absolute or relative')
           END AS feature_threshold
    FROM series
    GROUP BY feature_id
),
orderings AS (
    SELECT DISTINCT 0 AS ordering, position, position AS source FROM series
    UNION ALL
    SELECT k, (generate_subscripts(perm, 1) - 1)::INTEGER, unnest(perm)
    FROM (SELECT generate_subscripts(CAST(permutations AS INTEGER[][]), 1) AS k,
                 unnest(CAST(permutations AS INTEGER[][])) AS perm)
),
placed AS (
    SELECT o.ordering, here.feature_id, here.position, here.step, measured.value,
           here.direction_cosine_previous, here.direction_cosine_final, t.feature_threshold,
           coalesce(measured.value >= t.feature_threshold AND measured.value > 0, false)
               AS present
    FROM series AS here
    JOIN orderings AS o ON o.position = here.position
    JOIN series AS measured
        ON measured.feature_id = here.feature_id AND measured.position = o.source
    JOIN thresholds AS t ON t.feature_id = here.feature_id
),
framed AS (
    SELECT *,
        -- the checkpoints j..j+K-1 that exist: K of them, or fewer near the end
        count(*) OVER next_k AS frame,
        count_if(present) OVER next_k = count(*) OVER next_k AS born_here,
        count_if(NOT present) OVER next_k = count(*) OVER next_k AS dies_here,
        coalesce(count_if(present) OVER earlier, 0) = 0 AS absent_before,
        last_value(value) OVER rest AS final_value,
        position = count(*) OVER feature - 1 AS is_final
    FROM placed
    WINDOW feature AS (PARTITION BY ordering, feature_id),
           next_k AS (PARTITION BY ordering, feature_id ORDER BY position
                      ROWS BETWEEN CURRENT ROW AND persistence - 1 FOLLOWING),
           earlier AS (PARTITION BY ordering, feature_id ORDER BY position
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
           rest AS (PARTITION BY ordering, feature_id ORDER BY position
                    ROWS BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING)
),
anchored AS (
    SELECT *,
        -- stable here and at every later checkpoint; the final checkpoint's cosine is 1
        bool_and(abs(value - final_value) <= stable_eps * abs(final_value)
                 AND (is_final OR coalesce(direction_cosine_final >= stable_cos, false)))
            OVER rest AS stable_from_here,
        bool_or(position = 0 AND present) OVER feature AS present_at_init,
        min(position) FILTER (WHERE born_here AND absent_before) OVER feature AS first_born_here
    FROM framed
    WINDOW feature AS (PARTITION BY ordering, feature_id),
           rest AS (PARTITION BY ordering, feature_id ORDER BY position
                    ROWS BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING)
),
-- where stabilisation and death are looked for from: the birth, or the start for features
-- present at init
dated AS (
    SELECT *,
        CASE WHEN present_at_init THEN 0 ELSE first_born_here END AS anchor,
        min(position) FILTER (WHERE position > CASE WHEN present_at_init THEN 0
                                                    ELSE first_born_here END AND dies_here)
            OVER (PARTITION BY ordering, feature_id) AS first_dies_here
    FROM anchored
)
SELECT
    ordering,
    feature_id,
    any_value(present_at_init) AS present_at_init,
    any_value(feature_threshold) AS feature_threshold,
    min(step) FILTER (WHERE present) AS first_present_step,
    min(step) FILTER (WHERE NOT present_at_init AND position = anchor) AS birth_step,
    any_value(frame < persistence) FILTER (WHERE NOT present_at_init AND position = anchor)
        AS birth_censored,
    min(step) FILTER (WHERE position >= anchor AND stable_from_here) AS stabilization_step,
    min(step) FILTER (WHERE position = first_dies_here) AS death_step,
    any_value(frame < persistence) FILTER (WHERE position = first_dies_here) AS death_censored,
    -- summed in checkpoint order, so the result does not depend on how the rows were split
    -- between threads
    sum(1 - direction_cosine_previous ORDER BY position) AS drift
FROM dated
GROUP BY ordering, feature_id;
