-- One run: its settings and summary.
SELECT r.run, r.kind, r.model_family, r.parent_run, r.parent_step, r.seed, r.steps, r.d_model,
       r.n_layers, r.tokenizer, s.n_checkpoints, s.last_step, s.stages
FROM runs AS r JOIN run_summary AS s USING (run)
WHERE r.run = $run
