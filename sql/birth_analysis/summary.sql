-- feature-birth-analyze: the `birth_summary` rows, one per pair of consecutive checkpoints: births
-- in (window_start, window_end] in the real order and in each permutation of all_births. Every
-- (window, ordering) pair is counted, zeros included, so the null's mean and spread are over all
-- permutations. No birth can fall on the first checkpoint (a feature present there is
-- present_at_init), so the windows cover every birth.
-- The null counts births only among the features that could be born in the real order (those not
-- present at the first checkpoint): a shuffle moves some other checkpoint first, which would turn
-- features present from the start into spurious "births" and inflate the null.
-- Parameters: $basis, $metric, $presence, $threshold, $persistence, $stable_eps, $stable_cos,
-- $permutations, $seed, $agreement and $matched (the seed agreement, NULL with one seed).
WITH candidates AS (
    SELECT feature_id FROM all_births WHERE ordering = 0 AND NOT present_at_init
),
windows AS (
    SELECT * FROM (
        SELECT lag(step) OVER (ORDER BY step) AS window_start, step AS window_end
        FROM (SELECT DISTINCT step FROM trajectories WHERE basis = $basis)
    )
    WHERE window_start IS NOT NULL
),
counts AS (
    SELECT w.window_start, w.window_end, o.ordering, count(b.feature_id) AS births,
           count(b.feature_id) FILTER (WHERE b.birth_censored) AS censored
    FROM windows AS w
    CROSS JOIN (SELECT DISTINCT ordering FROM all_births) AS o
    LEFT JOIN all_births AS b ON b.ordering = o.ordering AND b.birth_step = w.window_end
        AND (b.ordering = 0 OR b.feature_id IN (SELECT feature_id FROM candidates))
    GROUP BY ALL
),
per_window AS (
    SELECT window_start, window_end,
           sum(births) FILTER (WHERE ordering = 0)::INTEGER AS births,
           sum(censored) FILTER (WHERE ordering = 0)::INTEGER AS censored_births,
           avg(births) FILTER (WHERE ordering > 0) AS null_births_mean,
           avg(censored) FILTER (WHERE ordering > 0) AS null_censored_births_mean,
           -- in a fixed order: a float aggregate split between threads can differ in the last
           -- digit from run to run
           stddev_samp(births ORDER BY ordering) FILTER (WHERE ordering > 0) AS null_births_sd
    FROM counts
    GROUP BY ALL
),
totals AS (
    SELECT count(*) FILTER (WHERE ordering = 0)::INTEGER AS n_features,
           count_if(present_at_init AND ordering = 0)::INTEGER AS n_present_at_init,
           count(birth_step) FILTER (WHERE ordering = 0) AS real_births,
           count(birth_step) FILTER (WHERE ordering > 0 AND feature_id IN (
               SELECT feature_id FROM candidates)) / $permutations AS null_births
    FROM all_births
)
SELECT $basis AS basis, $metric AS metric, $presence AS presence, $threshold AS threshold,
       $persistence AS persistence, $stable_eps AS stable_eps, $stable_cos AS stable_cos,
       window_start, window_end, births, censored_births, null_births_mean,
       null_censored_births_mean, null_births_sd,
       n_features, n_present_at_init,
       real_births / n_features AS birth_rate,
       null_births / n_features AS null_false_birth_rate,
       $permutations AS permutations, $seed AS seed,
       $agreement::DOUBLE AS seed_births_agreement, $matched::INTEGER AS seed_matched_features
FROM per_window, totals
ORDER BY window_end
