"""Collection throughput: tokens/s of `collect`, against the forward pass it is built on.

A small demo run is trained into a temporary warehouse (a few steps: collect only needs
checkpoints, not a good model), then four ways of getting through the same checkpoints on the
same tokens, in the same batches of sequences, are timed:

    plain forward   model(tokens) under no_grad, nothing read out: the floor (baseline)
    forward hooks   torch hooks on the two stage modules keep their outputs
    nnsight read    StageReader.read, the call collect makes: nnsight's cost over the forward
    collect         the whole job: loading checkpoints, reading, checking and writing the
                    activation sets, committing them to the warehouse

Plain forward and hooks also run the unembedding that nnsight's read stops before; with the demo
vocabulary (under 100 tokens) that is a small share of the forward pass.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from harness import BenchmarkResult, Figure, RunOptions, measure

from featurestore.checkpoints import load_checkpoint
from featurestore.ingest.collect import collect
from featurestore.ingest.train_model import train_model
from featurestore.model import Transformer
from featurestore.registry import get_checkpoints, get_run
from featurestore.run_inputs import BATCH_TOKENS, token_set
from featurestore.stages import StageReader, demo_reader
from featurestore.warehouse import Warehouse

RUN = "bench"
STAGES = ["layer_2_post_mlp", "final_norm"]
TRAIN_STEPS = 2  # checkpoints at steps 0, 1, 2
QUICK_TRAIN_STEPS = 1  # checkpoints at steps 0, 1
TOKENS = 8192  # per checkpoint: 256 sequences, two of collect's batches
QUICK_TOKENS = 4096

PLAIN_FORWARD = "plain forward"


def run(options: RunOptions) -> BenchmarkResult:
    n_tokens = QUICK_TOKENS if options.quick else TOKENS
    steps = QUICK_TRAIN_STEPS if options.quick else TRAIN_STEPS
    with tempfile.TemporaryDirectory(prefix="bench-collect-") as warehouse:
        train_model(RUN, steps=steps, warehouse=warehouse, progress=False)
        checkpoint_dirs, tokens = checkpoints_and_tokens(warehouse, n_tokens)
        # Separate model instances: nnsight patches the forward of every module it wraps, which
        # would put its cost into the plain-forward baseline too.
        models = [load_checkpoint(path) for path in checkpoint_dirs]
        readers = [demo_reader(load_checkpoint(path)) for path in checkpoint_dirs]

        def collect_all() -> int:
            result = collect(RUN, STAGES, checkpoints="all", tokens=n_tokens,
                             warehouse=warehouse, progress=False)
            return len(result.steps) * result.n_tokens

        measurements = measure([
            Figure(PLAIN_FORWARD, "tokens/s", lambda: plain_forward(models, tokens)),
            Figure("forward hooks, 2 stages", "tokens/s", lambda: forward_hooks(models, tokens),
                   baseline=PLAIN_FORWARD),
            Figure("nnsight StageReader.read, 2 stages", "tokens/s",
                   lambda: nnsight_read(readers, tokens), baseline=PLAIN_FORWARD),
            Figure("collect end to end", "tokens/s", collect_all, baseline=PLAIN_FORWARD,
                   note=f"includes loading checkpoints and writing {len(STAGES)} activation "
                        "sets per checkpoint into the warehouse"),
        ], options)

    return BenchmarkResult(
        name="collect",
        description=(f"demo run, {len(checkpoint_dirs)} checkpoints x {n_tokens:,} tokens, stages "
                     f"{', '.join(STAGES)}, {BATCH_TOKENS} tokens per batch"),
        measurements=measurements,
        config={"train_steps": steps, "checkpoints": len(checkpoint_dirs),
                "tokens_per_checkpoint": n_tokens, "sequence_length": tokens.shape[1],
                "stages": STAGES, "batch_tokens": BATCH_TOKENS},
        notes=["tokens/s counts checkpoints x tokens, as collect's own tokens_per_second does."],
    )


def checkpoints_and_tokens(warehouse: str, n_tokens: int) -> tuple[list[Path], torch.Tensor]:
    """The run's checkpoint directories and the token ids collect will read, looked up the way
    collect looks them up, so every variant sees exactly collect's inputs."""
    wh = Warehouse(warehouse)
    con = wh.connect()
    try:
        task_config = get_run(con, RUN).task_config
        checkpoints = get_checkpoints(wh, con, RUN)
    finally:
        con.close()
    tokens, _columns = token_set(task_config, None, n_tokens, seed=0)
    return [checkpoint.path for checkpoint in checkpoints], tokens


def batches(tokens: torch.Tensor):
    """The batches collect traces: BATCH_TOKENS a batch."""
    per_batch = max(1, BATCH_TOKENS // tokens.shape[1])
    return (tokens[start:start + per_batch] for start in range(0, tokens.shape[0], per_batch))


def plain_forward(models: list[Transformer], tokens: torch.Tensor) -> int:
    with torch.no_grad():
        for model in models:
            for batch in batches(tokens):
                model(batch)
    return len(models) * tokens.numel()


def forward_hooks(models: list[Transformer], tokens: torch.Tensor) -> int:
    saved: dict[str, torch.Tensor] = {}

    def keep(stage: str):
        def hook(_module, _inputs, output):
            saved[stage] = output
        return hook

    with torch.no_grad():
        for model in models:
            # The modules the demo family maps these two stages to (see featurestore.stages).
            handles = [model.blocks[2].register_forward_hook(keep("layer_2_post_mlp")),
                       model.ln_f.register_forward_hook(keep("final_norm"))]
            try:
                for batch in batches(tokens):
                    model(batch)
            finally:
                for handle in handles:
                    handle.remove()
    return len(models) * tokens.numel()


def nnsight_read(readers: list[StageReader], tokens: torch.Tensor) -> int:
    for reader in readers:
        for batch in batches(tokens):
            reader.read(batch, STAGES)
    return len(readers) * tokens.numel()
