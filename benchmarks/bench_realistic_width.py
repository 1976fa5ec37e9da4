"""The pipeline at a real model's width: collect, fit and sweep on a GPT-2-small-sized model.

A random-init GPT-2 with GPT-2 small's shape (12 blocks, d_model 768, 12 heads, d_mlp 3072, the
50,257-token vocabulary, context 1,024) is saved with save_pretrained three times, as steps 0,
1000 and 2000 of one run (each step is the one before with every weight moved by 1% noise), and
registered. Tokens are
drawn from a Zipf law over the vocabulary (the frequency profile of text) in sequences of 128.
Each job then runs once, in a fresh process, through the same Python functions the CLI calls:

    collect        layer_5_post_mlp of every checkpoint (the forward pass stops after block 5),
                   at TOKENS tokens and again at a quarter of them in a second warehouse.
                   Baseline: the same six blocks as a plain transformers forward pass on the
                   same tokens (no nnsight, nothing written).
    fit            shared-feature-fit: a BatchTopK dictionary of 16,384 features (k 32) pooled
                   over the checkpoints, FIT_STEPS steps of 1,024 tokens. Baseline: the machine's
                   matrix-multiply rate; the fit's rate is also given as achieved GFLOP/s
                   (encoder and decoder products, forward and backward).
    sweep          feature-trajectory-sweep of that basis over the checkpoints.

Peak memory is each job's own process (VmHWM). The point of the two collect sizes: collect writes
batch by batch, so its peak memory must stay flat when the token count grows four-fold; the
notes print both and their ratio.

With --quick everything shrinks (2 blocks, d_model 128, 8,192 tokens, 1,024 features): a smoke
run of the code path, not figures to quote.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from harness import (
    BenchmarkResult,
    Figure,
    Measurement,
    RunOptions,
    in_fresh_process,
    matmul_figure,
    measure,
)

RUN = "gpt2-small-width"
SEQ_LEN = 128
STEPS = (0, 1000, 2000)
ZIPF_EXPONENT = 1.1


@dataclass(frozen=True)
class Size:
    n_layer: int
    d_model: int
    n_head: int
    vocab: int
    stage_block: int  # collect reads layer_{stage_block}_post_mlp
    tokens: int
    dict_size: int
    fit_steps: int

    @property
    def stage(self) -> str:
        return f"layer_{self.stage_block}_post_mlp"


FULL = Size(n_layer=12, d_model=768, n_head=12, vocab=50_257, stage_block=5, tokens=131_072,
            dict_size=16_384, fit_steps=96)
QUICK = Size(n_layer=2, d_model=128, n_head=4, vocab=4_096, stage_block=1, tokens=8_192,
             dict_size=1_024, fit_steps=8)
K = 32
BATCH = 1024


def run(options: RunOptions) -> BenchmarkResult:
    size = QUICK if options.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-width-") as tmp:
        root = Path(tmp)
        folders = save_models(root, size)
        tokens_file = write_tokens(root / "tokens.parquet", size)
        small_file = write_tokens(root / "tokens_small.parquet", size, fraction=4)
        warehouse, small_warehouse = root / "warehouse", root / "warehouse-small"
        for wh in (warehouse, small_warehouse):
            in_fresh_process(register, folders, str(wh))

        (collect_small, small_rss) = in_fresh_process(
            collect_job, str(small_warehouse), str(small_file), size.stage, size.tokens // 4)
        (collect_full, full_rss) = in_fresh_process(
            collect_job, str(warehouse), str(tokens_file), size.stage, size.tokens)
        (fit_seconds, fit_rss) = in_fresh_process(fit_job, str(warehouse), size)
        (sweep_seconds, sweep_rss) = in_fresh_process(sweep_job, str(warehouse))

        reference = plain_forward_figure(folders[0], tokens_file, size)
        gemm = matmul_figure("matrix multiply, 2048 x 2048", "cpu", 2048, repeats=4)
        baselines = measure([reference, gemm], options)

    n_read = len(STEPS) * size.tokens
    fit_tokens = size.fit_steps * BATCH
    fit_flops = fit_tokens * 6 * size.d_model * size.dict_size  # 2 products x (fwd + 2 bwd)
    measurements = baselines + [
        Measurement("collect (nnsight, writing sets)", "tokens/s", [n_read / collect_full],
                    baseline=reference.label,
                    note=f"{len(STEPS)} checkpoints x {size.tokens:,} tokens"),
        Measurement("shared-feature-fit", "tokens/s", [fit_tokens / fit_seconds],
                    note=f"{size.fit_steps} steps of {BATCH}, plus the fit report"),
        Measurement("shared-feature-fit, encoder + decoder products", "GFLOP/s",
                    [fit_flops / fit_seconds / 1e9], baseline=gemm.label,
                    note="the whole job's wall time, report and registration included"),
        Measurement("feature-trajectory-sweep", "tokens/s", [n_read / sweep_seconds],
                    note=f"{len(STEPS)} checkpoints, {size.dict_size:,} features"),
    ]
    notes = [
        f"peak RSS: collect {full_rss:,.0f} MB at {size.tokens:,} tokens, {small_rss:,.0f} MB at "
        f"{size.tokens // 4:,} tokens (ratio {full_rss / small_rss:.2f} for 4x the tokens); "
        f"fit {fit_rss:,.0f} MB; sweep {sweep_rss:,.0f} MB",
        f"one activation set holds {size.tokens * size.d_model * 4 / 1e6:,.0f} MB of float32",
        f"collect at {size.tokens // 4:,} tokens: "
        f"{len(STEPS) * size.tokens // 4 / collect_small:,.0f} tokens/s",
        "the jobs ran once each (minutes long); the baselines were repeated",
    ]
    return BenchmarkResult(
        name="realistic_width",
        description=(f"collect, fit and sweep on a random-init {size.n_layer}-block GPT-2 of "
                     f"d_model {size.d_model}, {size.tokens:,} tokens, "
                     f"{size.dict_size:,} features"),
        measurements=measurements,
        config={"size": size.__dict__, "k": K, "batch": BATCH, "seq_len": SEQ_LEN,
                "steps": list(STEPS)},
        details={"peak_rss_mb": {"collect": full_rss, "collect_quarter_tokens": small_rss,
                                 "fit": fit_rss, "sweep": sweep_rss},
                 "seconds": {"collect": collect_full, "collect_quarter_tokens": collect_small,
                             "fit": fit_seconds, "sweep": sweep_seconds}},
        notes=notes,
    )


def save_models(root: Path, size: Size) -> list[str]:
    """save_pretrained folders of one random-init GPT-2, each step the one before plus noise."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=size.n_layer, n_embd=size.d_model, n_head=size.n_head,
                        vocab_size=size.vocab, n_positions=1024)
    model = GPT2LMHeadModel(config)
    folders = []
    for step in STEPS:
        if step:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.01 * parameter.std() * torch.randn_like(parameter))
        folder = root / "models" / f"step_{step}"
        model.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def write_tokens(path: Path, size: Size, fraction: int = 1) -> Path:
    """Token ids [tokens / fraction / SEQ_LEN, SEQ_LEN] from a Zipf law over the vocabulary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n = size.tokens // fraction
    ranks = np.arange(1, size.vocab + 1, dtype=np.float64)
    probabilities = ranks ** -ZIPF_EXPONENT
    ids = rng.choice(size.vocab, size=n, p=probabilities / probabilities.sum())
    rng.shuffle(ids)
    sequences = pa.FixedSizeListArray.from_arrays(pa.array(ids, pa.int64()), SEQ_LEN)
    pq.write_table(pa.table({"input_ids": sequences.cast(pa.list_(pa.int64()))}), path)
    return path


def register(folders: list[str], warehouse: str) -> None:
    from featurestore.ingest.register_model import register_model

    for step, folder in zip(STEPS, folders):
        register_model(run=RUN, path=folder, step=step, warehouse=warehouse)


def collect_job(warehouse: str, tokens_file: str, stage: str, tokens: int) -> float:
    from featurestore.ingest.collect import collect

    started = time.perf_counter()
    collect(RUN, [stage], tokens_from=tokens_file, tokens=tokens, warehouse=warehouse,
            progress=False)
    return time.perf_counter() - started


def fit_job(warehouse: str, size: Size) -> float:
    from featurestore.ingest.shared_feature_fit import shared_feature_fit

    started = time.perf_counter()
    # A random-init model's activations are not a sparse code: the quality bounds are not what
    # is measured here, so they are opened all the way.
    shared_feature_fit(RUN, size.stage, name="width", dict_size=size.dict_size, k=K,
                       steps=size.fit_steps, batch_size=BATCH, min_explained_variance=-1e9,
                       max_active_fraction=1.0, max_dead_fraction=1.0, warehouse=warehouse,
                       progress=False)
    return time.perf_counter() - started


def sweep_job(warehouse: str) -> float:
    from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep

    started = time.perf_counter()
    feature_trajectory_sweep("width", warehouse=warehouse, progress=False)
    return time.perf_counter() - started


def plain_forward_figure(folder: str, tokens_file: Path, size: Size):
    """The first stage_block + 1 blocks as a plain transformers GPT2Model, on 32 sequences."""
    import pyarrow.parquet as pq
    import torch
    from transformers import GPT2Config, GPT2Model

    full = GPT2Model.from_pretrained(folder)
    config = GPT2Config(**{**full.config.to_dict(), "n_layer": size.stage_block + 1})
    blocks = GPT2Model(config).eval()
    blocks.load_state_dict(full.state_dict(), strict=False)  # the later blocks are left out
    ids = pq.read_table(tokens_file).column("input_ids").to_pylist()[:32]
    batch = torch.tensor(ids)

    def work() -> float:
        with torch.no_grad():
            blocks(input_ids=batch)
        return batch.numel()
    return Figure("forward pass, plain transformers", "tokens/s", work)
