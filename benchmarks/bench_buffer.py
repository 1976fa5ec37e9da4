"""Crosscoder training straight from models (the activation buffer) against stored sets.

A small demo run is trained into a temporary warehouse (a few steps: the benchmark needs two
checkpoints, not a good model); its first and last checkpoints at layer_2_post_mlp are the two
sources of a BatchTopK crosscoder (d_model 64, 1,024 latents, k = 32, batches of 1,024). Every
figure trains on the same token stream (the demo task's generator), each token once, in the
buffer's order:

    stored sets             the stream's activations collected beforehand into activation sets,
                            read memory-mapped (baseline: what training costs once they exist)
    collect, then train     the whole alternative to the buffer: reading the models, writing the
                            sets, then training on them
    buffer                  ActivationBuffer: models read through nnsight while training, the
                            next batch prepared in a background thread, nothing written
    buffer reads only       the same buffer with no training: how fast the data side alone is

tokens/s counts training tokens (steps x batch size), so the figures compare directly. Memory:
the peak RSS of a fresh process training once from the models and once from the stored sets, the
pool's own bytes, and the disk the stored sets take (what the buffer does not write).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import BenchmarkResult, Figure, RunOptions, in_fresh_process, measure

from featurestore.activation_buffer import (
    ActivationBuffer,
    DemoTokens,
    StoredInBufferOrder,
    open_model_sources,
)
from featurestore.activations import ActivationSet, norm_sample, norm_scale, write_activation_set
from featurestore.aligned import Source
from featurestore.corpus import sequence_columns
from featurestore.crosscoder import CrossCoder, CrossCoderConfig
from featurestore.crosscoder_training import TrainerConfig, train_crosscoder
from featurestore.ingest.collect import read_stages
from featurestore.ingest.train_model import train_model

RUN = "bench"
STAGE = "layer_2_post_mlp"
TRAIN_STEPS = 2  # checkpoints at steps 0, 1, 2; the sources are the first and the last
TOKENS, QUICK_TOKENS = 65_536, 16_384
BATCH = 1024
POOL_BATCHES = 8  # smaller than the stream, so the pool is refilled as training goes
DICT_SIZE, K = 1024, 32

STORED = "train from stored sets"


def run(options: RunOptions) -> BenchmarkResult:
    n_tokens = QUICK_TOKENS if options.quick else TOKENS
    steps = n_tokens // BATCH
    trainer = TrainerConfig(steps=steps, batch_size=BATCH, warmup_steps=min(10, steps),
                            log_every=steps, save_every=steps)
    with tempfile.TemporaryDirectory(prefix="bench-buffer-") as folder:
        folder = Path(folder)
        train_model(RUN, steps=TRAIN_STEPS, warehouse=folder / "warehouse", progress=False)
        sources = model_sources(folder / "warehouse")
        tokens = DemoTokens(sources[0].task_config, seed=0, n_rows=n_tokens)
        # Whole stream batches (the token counts are multiples of one), as collect reads them.
        token_ids = torch.cat([tokens.batch(i) for i in range(n_tokens // tokens.rows_per_batch)])
        peaks: list[int] = []

        def buffer() -> ActivationBuffer:
            return ActivationBuffer(sources, tokens, POOL_BATCHES * BATCH, seed=0)

        def train(data, name: str) -> int:
            result = train_crosscoder(crosscoder(), data, trainer, folder / "state" / name,
                                      progress=False)
            return result.tokens

        def from_buffer() -> int:
            data = buffer()
            peaks.append(data.memory_bytes)
            return train(data, "buffer")

        def reads_only() -> int:
            data = buffer()
            for step in range(steps):
                data.batch(data.indices_for_step(step, BATCH))
            return steps * BATCH

        def collect_then_train() -> int:
            shutil.rmtree(folder / "collected", ignore_errors=True)
            return train(collect_sets(sources, token_ids, folder / "collected"), "collected")

        stored = collect_sets(sources, token_ids, folder / "stored")
        stored_bytes = sum(p.stat().st_size for p in (folder / "stored").rglob("*")
                           if p.is_file())
        # Peak memory of one training run of each kind, each in a fresh process of its own.
        scales = [source.activations.norm_scale for source in stored.sources]
        peak_rss = {kind: in_fresh_process(train_once, str(folder), kind, scales, n_tokens,
                                           trainer)[1] for kind in ("buffer", "stored")}
        measurements = measure([
            Figure(STORED, "tokens/s", lambda: train(stored, "stored")),
            Figure("pre-collect, then train", "tokens/s", collect_then_train, baseline=STORED,
                   note="reads both models and writes their activation sets before training"),
            Figure("train from models (buffer)", "tokens/s", from_buffer, baseline=STORED,
                   note="includes the first pool fill, read before the first step"),
            Figure("buffer reads only", "tokens/s", reads_only, baseline=STORED,
                   note="no training: the models' reads through nnsight and the pool"),
        ], options)
    return BenchmarkResult(
        name="buffer",
        description=(f"BatchTopK crosscoder 2x64/{DICT_SIZE} k={K}, {steps} steps of {BATCH} "
                     f"tokens from two demo checkpoints at {STAGE}; pool of {POOL_BATCHES} "
                     "batches"),
        measurements=measurements,
        config={"tokens": n_tokens, "steps": steps, "batch_size": BATCH,
                "pool_batches": POOL_BATCHES, "dict_size": DICT_SIZE, "k": K, "stage": STAGE,
                "sources": 2, "d_model": sources[0].reader.module.config.d_model},
        details={"peak_rss_mb": peak_rss, "pool_mb": max(peaks) / 2**20,
                 "stored_sets_mb": stored_bytes / 2**20},
        notes=[f"peak RSS of a fresh process training once: {peak_rss['buffer']:,.0f} MB from "
               f"the models (buffer), {peak_rss['stored']:,.0f} MB from the stored sets; the "
               f"buffer's pool and stream batch {max(peaks) / 2**20:.1f} MiB; the stored sets "
               f"the buffer does not write {stored_bytes / 2**20:.1f} MiB on disk"],
    )


def model_sources(warehouse: Path):
    return open_model_sources(warehouse, [("first", f"{RUN}@0:{STAGE}"),
                                          ("last", f"{RUN}@LAST:{STAGE}")])


def crosscoder() -> CrossCoder:
    torch.manual_seed(0)
    config = CrossCoderConfig(n_sources=2, d_model=64, d_hidden=DICT_SIZE, arch="batchtopk", k=K,
                              aux_k=2 * K, source_labels=("first", "last"))
    return CrossCoder(config)


def train_once(folder: str, kind: str, scales: list[float], n_tokens: int,
               trainer: TrainerConfig) -> int:
    """One training run from the buffer or from the stored sets in `folder` (for a fresh
    process: everything is opened again from the warehouse and the files)."""
    folder = Path(folder)
    sources = model_sources(folder / "warehouse")
    if kind == "buffer":
        tokens = DemoTokens(sources[0].task_config, seed=0, n_rows=n_tokens)
        data = ActivationBuffer(sources, tokens, POOL_BATCHES * BATCH, seed=0)
    else:
        stored = [Source(source.label, ActivationSet(folder / "stored" / source.label,
                                                     norm_scale=scale))
                  for source, scale in zip(sources, scales)]
        data = StoredInBufferOrder(stored, POOL_BATCHES * BATCH, 0, n_tokens // BATCH * BATCH)
    return train_crosscoder(crosscoder(), data, trainer, folder / "state" / f"fresh-{kind}",
                            progress=False).tokens


def collect_sets(sources, token_ids: torch.Tensor, folder: Path) -> StoredInBufferOrder:
    """The stream's activations written as activation sets, served in the buffer's order."""
    columns = sequence_columns(token_ids, np.full(len(token_ids), "demo", dtype=object))
    stored = []
    for source in sources:
        values = read_stages(source.reader, token_ids, [source.stage])[source.stage]
        write_activation_set(folder / source.label, values, columns)
        first_fill = slice(0, POOL_BATCHES * BATCH)  # the rows the buffer estimates it on
        scale = norm_scale(values[first_fill][norm_sample(columns.position[first_fill])])
        stored.append(Source(source.label, ActivationSet(folder / source.label,
                                                         norm_scale=scale)))
    return StoredInBufferOrder(stored, POOL_BATCHES * BATCH, 0, len(columns) // BATCH * BATCH)
