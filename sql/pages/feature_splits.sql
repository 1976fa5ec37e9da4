-- Where the feature fires at one checkpoint: its activation rate on each token split.
SELECT split, n_tokens, round(activation_rate, 5) AS activation_rate,
       round(mean_activation, 5) AS mean_activation
FROM split_profiles
WHERE basis = $basis AND feature_id = $feature AND step = $step
ORDER BY activation_rate DESC, split
