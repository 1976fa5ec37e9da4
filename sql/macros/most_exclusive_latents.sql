-- most_exclusive_latents(basis_name, n): the n live latents of a two-source crosscoder that lean
-- furthest toward each source: largest |relative_decoder_norm - 0.5| first, then the most
-- frequent. Columns: feature_id, class, relative_decoder_norm, toward (the label of the source
-- it leans toward). The model-diff report's two exclusive sections read the same latents here.
--   SELECT * FROM most_exclusive_latents('demo-diff', 5)
-- depends_on: model_diff
CREATE OR REPLACE MACRO most_exclusive_latents(basis_name, n) AS TABLE
    SELECT d.feature_id, d.class, d.relative_decoder_norm,
           CASE WHEN d.relative_decoder_norm < 0.5 THEN b.sources[1].label
                ELSE b.sources[2].label END AS toward
    FROM model_diff d JOIN bases b ON b.name = d.basis
    WHERE d.basis = basis_name AND d.class <> 'dead'
    QUALIFY row_number() OVER (PARTITION BY toward ORDER BY
        abs(d.relative_decoder_norm - 0.5) DESC, d.frequency DESC, d.feature_id) <= n;
