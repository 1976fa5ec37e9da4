-- context_tokens(token_ids, run): a list of token ids as the run's tokenizer spells each token
-- (token_strings), in order; a token the run has no string for reads as its id. For showing an
-- example's context token by token, e.g. with the activating one highlighted:
--   SELECT context_tokens(context_token_ids, 'demo') AS tokens,
--          position - context_start + 1 AS activating
--   FROM feature_examples WHERE basis = 'demo-l2' AND feature_id = 12 AND step = 1800;
CREATE OR REPLACE MACRO context_tokens(token_ids, run_name) AS (
    SELECT list(coalesce(s.token_text, u.token_id::VARCHAR) ORDER BY u.i)
    FROM (SELECT unnest(token_ids) AS token_id, generate_subscripts(token_ids, 1) AS i) AS u
    LEFT JOIN token_strings AS s ON s.run = run_name AND s.token_id = u.token_id
);
