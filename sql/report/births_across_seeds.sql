-- Report, Births across seeds: per births rule, the share of features matched across the basis's
-- seeds whose births agree, and the matched pairs it is a share of (no rows for a basis fitted
-- with one seed). Parameters: $basis.
SELECT metric, presence, threshold, persistence,
       round(any_value(seed_births_agreement), 3) AS seed_births_agreement,
       any_value(seed_matched_features) AS seed_matched_features
FROM birth_summary
WHERE basis = $basis AND seed_births_agreement IS NOT NULL
GROUP BY ALL ORDER BY metric, presence, threshold, persistence
