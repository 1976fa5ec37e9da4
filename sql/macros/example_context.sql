-- example_context(context_text, context_token_ids, token_position, context_start): an example's context
-- window for display: its decoded text (the activating token marked ⟦token⟧) when the run has
-- token strings, else its token ids separated by spaces with the activating id marked the same
-- way. Works on feature_examples and crosscoder_examples rows:
--   SELECT example_context(context_text, context_token_ids, position, context_start)
--   FROM feature_examples WHERE basis = 'demo-l2' AND feature_id = 12 AND rank = 1;
CREATE OR REPLACE MACRO example_context(context_text, context_token_ids, token_position, context_start) AS
    coalesce(context_text, array_to_string(list_transform(
        context_token_ids,
        lambda token, i: CASE WHEN i = token_position - context_start + 1 THEN '⟦' || token || '⟧'
                              ELSE token::VARCHAR END), ' '));

-- example_token(token_text, context_token_ids, token_position, context_start): the activating token for
-- display: its text when the run has token strings, else its id.
CREATE OR REPLACE MACRO example_token(token_text, context_token_ids, token_position, context_start) AS
    coalesce(token_text, context_token_ids[token_position - context_start + 1]::VARCHAR);
