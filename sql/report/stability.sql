-- Report, Stability: the basis's row with the share of its features a fit with another seed finds
-- again (no row unless it was fitted with several seeds). Parameters: $basis.
SELECT name, kind, arch, d_hidden, k,
       stability AS share_matched_at_cosine_0_9
FROM bases WHERE name = $basis AND stability IS NOT NULL
