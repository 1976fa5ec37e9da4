"""Trajectory sweep and the queries analysts run on its tables.

A synthetic run is registered (CHECKPOINTS checkpoints of TOKENS tokens, d_model 64, each token a
sparse mix of known directions), a pooled shared basis of 1,024 features (BatchTopK, k 32) is
fitted on it briefly, swept, and analysed (births, a first-vs-last compare). Then, all in the same
run and interleaved round-robin:

    sweep, one checkpoint       encode_checkpoint on a loaded basis: read, encode, every
                                statistic, the sorted zstd feature_activations file. Baseline:
                                DenseSweepReference, the main statistics computed the direct way
                                (dense float64 codes per batch, a dense F'F matmul, a sort per
                                batch for the top examples) and the non-zeros written unsorted.
    encode only                 read and encode, nothing else: the floor any sweep pays.
    sweep, all checkpoints      feature_trajectory_sweep end to end (registration included),
                                serial and with --workers 2 (baseline: serial).
    write feature_activations   write_partition_file (order checked, zstd, fsync) against
                                pyarrow.parquet.write_table with its defaults.
    queries                     through a warm featurestore connection (views over the DuckLake
                                tables) against pandas reading the tables' Parquet files
                                (Warehouse.data_files) and filtering: one feature's trajectory;
                                one feature's token activations at one checkpoint; births in a
                                step window; the top-20 diffs.

Peak memory: the resident set of a fresh process that sweeps one checkpoint. Writing: the share of
each sweep's wall time spent writing feature_activations, and its rows/s.

On a machine with a GPU: encoding one checkpoint on CUDA (fp32 with TF32, and bf16 autocast)
against the CPU encode, with utilisation against the GPU's measured matmul rates; skipped, with a
note, where there is none.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from harness import (
    BenchmarkResult,
    Figure,
    RunOptions,
    benchmark_devices,
    in_fresh_process,
    matmul_figure,
    measure,
    tf32_matmuls,
)

from featurestore.ingest.birth_analysis import DEFAULT_PERSISTENCE, analyze_births
from featurestore.ingest.feature_compare import compare_features
from featurestore.ingest.register import register_activations
from featurestore.ingest.shared_feature_fit import shared_feature_fit
from featurestore.ingest.trajectory_sweep import (
    EXAMPLES,
    SWEEP_BATCH,
    encode_checkpoint,
    feature_trajectory_sweep,
    sweep_checkpoint,
)
from featurestore.schema import spec
from featurestore.shared_basis import load_shared_basis
from featurestore.warehouse import Warehouse
from featurestore.writer import write_partition_file

RUN, STAGE, BASIS = "bench", "layer_0_post_mlp", "bench-l0"
D_MODEL, TRUE_FEATURES, ACTIVE = 64, 512, 16
DICT_SIZE, K = 1024, 32
CHECKPOINTS, TOKENS = 6, 16_384
QUICK_CHECKPOINTS, QUICK_TOKENS = 4, 8_192
SEQUENCE_LENGTH = 64
FIT_STEPS = 100  # the basis only has to be a plausible one; its quality is not measured
QUERY_REPEATS = 20  # queries are milliseconds: each timed sample runs this many
# On a GPU: encode batches big enough to fill it, and a matmul size (repeated within a sample)
# long enough to time without launch overhead.
CUDA_ENCODE_BATCH = 65_536
CUDA_MATMUL_N, CUDA_MATMUL_REPEATS = 8192, 10


def run(options: RunOptions) -> BenchmarkResult:
    n_checkpoints = QUICK_CHECKPOINTS if options.quick else CHECKPOINTS
    n_tokens = QUICK_TOKENS if options.quick else TOKENS
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = build_warehouse(Path(tmp), n_checkpoints, n_tokens)
        wh = Warehouse(root)
        con = wh.connect()
        basis, sets = load_shared_basis(wh, con, BASIS)
        con.close()
        activations_file = Path(tmp) / "sweep.parquet"
        # One checkpoint's partition as the sweep wrote it: the rows the write figures write.
        written = pq.read_table(wh.data_files("feature_activations")[0])
        peak_rss_mb = sweep_peak_rss_mb(root, activations_file)

        # Per run of the sweep figures: the share of its wall time spent writing
        # feature_activations (the notes hold it against a target of at most 15%), and the rows/s
        # of that writing.
        write_shares: dict[str, list[float]] = {"one checkpoint": [], "all checkpoints": []}
        rows_per_second_written: list[float] = []

        def one_checkpoint() -> float:
            started = time.perf_counter()
            swept = encode_checkpoint(basis, sets, 0, activations_file)
            write_shares["one checkpoint"].append(
                swept.write_seconds / (time.perf_counter() - started))
            rows_per_second_written.append(swept.activation_rows / swept.write_seconds)
            return swept.n_tokens

        def dense_reference() -> float:
            return DenseSweepReference(basis, sets[0]).run(Path(tmp) / "dense.parquet")

        def encode_only() -> float:
            for start in range(0, n_tokens, SWEEP_BATCH):
                index = np.arange(start, min(start + SWEEP_BATCH, n_tokens))
                basis.encode([torch.from_numpy(sets[0].rows(index, normalized=True))], 0)
            return n_tokens

        def sweep_all(workers: int):
            def work() -> float:
                swept = feature_trajectory_sweep(BASIS, workers=workers, warehouse=root,
                                                 progress=False)
                if workers == 1:  # with workers the writes overlap, so a share means less
                    write_shares["all checkpoints"].append(swept.write_seconds / swept.seconds)
                return n_tokens * n_checkpoints
            return work

        def write_sorted() -> float:
            write_partition_file(spec("feature_activations"), {"basis": BASIS, "step": 0},
                                 written, Path(tmp) / "sorted.parquet")
            return written.num_rows

        def write_default() -> float:
            pq.write_table(written, Path(tmp) / "default.parquet")
            return written.num_rows

        figures = [
            Figure("dense reference, one checkpoint", "tokens/s", dense_reference),
            Figure("sweep, one checkpoint", "tokens/s", one_checkpoint,
                   baseline="dense reference, one checkpoint"),
            Figure("encode only, one checkpoint", "tokens/s", encode_only,
                   baseline="dense reference, one checkpoint",
                   note="the floor: reading and encoding, no statistics"),
            Figure("sweep, all checkpoints, serial", "tokens/s", sweep_all(1)),
            Figure("sweep, all checkpoints, 2 workers", "tokens/s", sweep_all(2),
                   baseline="sweep, all checkpoints, serial"),
            Figure("pyarrow write_table, defaults", "rows/s", write_default),
            Figure("write feature_activations partition", "rows/s", write_sorted,
                   baseline="pyarrow write_table, defaults",
                   note="zstd, fsync'd; its rows come in key order, as the sweep makes "
                        "them, so the order is checked rather than sorted again"),
        ]
        figures += query_figures(root, wh)
        gpu_figures, gpu_flops, gpu_notes = cuda_encode_figures(basis, sets[0], n_tokens)
        figures += gpu_figures
        with tf32_matmuls("cuda" if gpu_figures else "cpu"):
            measurements = measure(figures, options)

    result = BenchmarkResult(
        name="sweep",
        description=(f"feature-trajectory-sweep of {n_checkpoints} checkpoints x {n_tokens:,} "
                     f"tokens, d_model {D_MODEL}, {DICT_SIZE} features (k {K}), and queries on "
                     "its tables"),
        measurements=measurements,
        config={"checkpoints": n_checkpoints, "tokens": n_tokens, "d_model": D_MODEL,
                "dict_size": DICT_SIZE, "k": K, "sweep_batch": SWEEP_BATCH,
                "feature_activation_rows_per_checkpoint": written.num_rows,
                "query_repeats_per_sample": QUERY_REPEATS},
        details={"sweep_one_checkpoint_peak_rss_mb": peak_rss_mb,
                 "write_share_of_wall_time": write_shares,
                 "feature_activations_rows_per_second_written": rows_per_second_written},
    )
    for what, shares in write_shares.items():
        result.notes.append(f"sweep, {what}: writing feature_activations took "
                            f"{statistics.median(shares):.1%} of the wall time (median; "
                            f"{min(shares):.1%}-{max(shares):.1%}; target at most 15%)")
    result.notes.append(f"sweep, one checkpoint: feature_activations written at "
                        f"{statistics.median(rows_per_second_written):,.0f} rows/s (median)")
    result.notes.append(f"peak RSS of a process sweeping one checkpoint: {peak_rss_mb:.0f} MB")
    result.notes.append(f"feature_activations: {written.num_rows:,} rows per checkpoint")
    result.notes += gpu_notes
    if gpu_figures:  # utilisation: encode FLOP rate over the GPU's own matmul rate
        rates = {m.label: m.median for m in measurements}
        for label, flops_per_token in gpu_flops.items():
            achieved = rates[label] * flops_per_token
            for product in ("fp32 (TF32)", "bf16"):
                gemm = rates[f"CUDA matmul {CUDA_MATMUL_N}, {product}"] * 1e9
                result.notes.append(f"{label}: {achieved / 1e9:,.0f} GFLOP/s = "
                                    f"{achieved / gemm:.0%} of the {product} matmul rate")
    for m in measurements:
        if m.unit == "queries/s":
            result.notes.append(f"{m.label}: {1000 / m.median:.2f} ms per query (median)")
    return result


def cuda_encode_figures(basis, activations, n_tokens: int
                        ) -> tuple[list[Figure], dict[str, int], list[str]]:
    """On a GPU: encoding one checkpoint there (rows copied from pinned host memory, as the
    sweep would feed them), in fp32 with TF32 matmuls and under bf16 autocast, against the CPU
    encode; and the GPU's matmul rates, which the utilisation notes divide by. On a machine
    without one: no figures and a note saying so."""
    if "cuda" not in benchmark_devices():
        why = "not asked for" if torch.cuda.is_available() else "no GPU on this machine"
        return [], {}, [f"CUDA: {why}, so the CUDA encode figures were skipped"]
    gpu = copy.copy(basis)
    gpu.model = copy.deepcopy(basis.model).to("cuda")
    rows = torch.from_numpy(activations.rows(np.arange(n_tokens), normalized=True)).pin_memory()

    def encode(dtype: torch.dtype | None):
        def work() -> float:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                for start in range(0, n_tokens, CUDA_ENCODE_BATCH):
                    batch = rows[start:start + CUDA_ENCODE_BATCH].to("cuda", non_blocking=True)
                    gpu.encode([batch], 0)
            torch.cuda.synchronize()
            return n_tokens
        return work

    cpu = "encode only, one checkpoint"
    figures = [
        matmul_figure(f"CUDA matmul {CUDA_MATMUL_N}, fp32 (TF32)", "cuda", CUDA_MATMUL_N,
                      CUDA_MATMUL_REPEATS, note="the GPU's rate, for utilisation"),
        matmul_figure(f"CUDA matmul {CUDA_MATMUL_N}, bf16", "cuda", CUDA_MATMUL_N,
                      CUDA_MATMUL_REPEATS, torch.bfloat16, note="the GPU's rate, for utilisation"),
        Figure("encode only, one checkpoint, CUDA fp32", "tokens/s", encode(None), baseline=cpu),
        Figure("encode only, one checkpoint, CUDA bf16 autocast", "tokens/s",
               encode(torch.bfloat16), baseline=cpu),
    ]
    # A dense encoder and decoder matmul per token: 2*d*h FLOPs each.
    flops = 4 * activations.d_model * basis.d_hidden
    encode_labels = [figure.label for figure in figures[2:]]
    return figures, dict.fromkeys(encode_labels, flops), [
        f"CUDA: {torch.cuda.get_device_name(0)}; encode batches of {CUDA_ENCODE_BATCH:,} tokens, "
        f"counted as {flops:,} matmul FLOPs per token"]


def query_figures(root: Path, wh: Warehouse) -> list[Figure]:
    """Typical questions, in SQL on a warm connection and in pandas on the Parquet files.

    The files are those of the snapshot the connection reads (both are taken before the sweep
    figures commit new ones; a commit never changes or deletes a file). Each table was written
    once by then, so no rows are deleted in them and pandas needs no DuckLake delete files.
    """
    con = wh.connect()
    files = {table: [str(p) for p in wh.data_files(table)]
             for table in ("trajectories", "feature_activations", "births", "diffs")}
    (feature,), = con.execute("SELECT feature_id FROM trajectories WHERE basis = ? GROUP BY 1 "
                              "ORDER BY max(activation_rate) DESC LIMIT 1", [BASIS]).fetchall()
    steps = [s for (s,) in con.execute("SELECT DISTINCT step FROM trajectories ORDER BY 1"
                                       ).fetchall()]
    window = (steps[1], steps[len(steps) // 2])

    def repeated(work):
        def timed() -> float:
            for _ in range(QUERY_REPEATS):
                work()
            return QUERY_REPEATS
        return timed

    sql = {
        "trajectory": ("SELECT * FROM trajectories WHERE basis = ? AND feature_id = ? "
                       "ORDER BY step", [BASIS, feature]),
        "token activations": ("SELECT * FROM feature_activations WHERE basis = ? AND step = ? "
                              "AND feature_id = ?", [BASIS, steps[-1], feature]),
        "births in window": ("SELECT * FROM births WHERE basis = ? AND birth_step BETWEEN ? "
                             "AND ? ORDER BY birth_step", [BASIS, *window]),
        "top-20 diffs": ("SELECT * FROM diffs WHERE basis = ? AND source_step = ? AND "
                         "target_step = ? ORDER BY rank_by_rate_change LIMIT 20",
                         [BASIS, steps[0], steps[-1]]),
    }

    def in_sql(name):
        query, params = sql[name]
        return lambda: con.execute(query, params).fetchall()

    def read(table, **kwargs) -> pd.DataFrame:
        return pd.concat([pd.read_parquet(p, **kwargs) for p in files[table]])

    def pandas_trajectory():
        t = read("trajectories")
        return t[(t.basis == BASIS) & (t.feature_id == feature)].sort_values("step")

    def pandas_token_activations():
        t = read("feature_activations")
        return t[(t.step == steps[-1]) & (t.feature_id == feature)]

    def pandas_births():
        t = read("births")
        return t[(t.basis == BASIS) & t.birth_step.between(*window)].sort_values("birth_step")

    def pandas_top_diffs():
        t = read("diffs")
        t = t[(t.basis == BASIS) & (t.source_step == steps[0]) & (t.target_step == steps[-1])]
        return t.nsmallest(20, "rank_by_rate_change")

    pandas = {"trajectory": pandas_trajectory, "token activations": pandas_token_activations,
              "births in window": pandas_births, "top-20 diffs": pandas_top_diffs}
    figures = []
    for name in sql:
        baseline = f"pandas: {name}"
        figures.append(Figure(baseline, "queries/s", repeated(pandas[name])))
        figures.append(Figure(f"SQL: {name}", "queries/s", repeated(in_sql(name)),
                              baseline=baseline))
    return figures


def build_warehouse(tmp: Path, n_checkpoints: int, n_tokens: int) -> Path:
    """Register the synthetic run, fit the basis, sweep it, find births, compare first and last."""
    root = tmp / "warehouse"
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((TRUE_FEATURES, D_MODEL))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    sequence = np.repeat(np.arange(n_tokens // SEQUENCE_LENGTH), SEQUENCE_LENGTH)
    token_ids = rng.integers(0, 100, n_tokens)
    for c in range(n_checkpoints):
        # Later checkpoints switch on more of the directions, so there are births to find.
        on = TRUE_FEATURES * (c + 1) // n_checkpoints
        rows = np.arange(n_tokens)[:, None]
        chosen = rng.integers(0, on, (n_tokens, ACTIVE))
        codes = np.zeros((n_tokens, TRUE_FEATURES), dtype=np.float32)
        codes[rows, chosen] = rng.uniform(0.5, 2.0, (n_tokens, ACTIVE))
        x = codes @ directions.astype(np.float32)
        x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
        path = tmp / f"step_{c}.parquet"
        pq.write_table(pa.table({
            "activations": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D_MODEL),
            "sequence_id": sequence, "position": np.tile(np.arange(SEQUENCE_LENGTH),
                                                         n_tokens // SEQUENCE_LENGTH),
            "token_id": token_ids, "split": np.where(sequence % 2 == 0, "even", "odd"),
        }), path)
        register_activations(str(path), run=RUN, step=c * 100, stage=STAGE, warehouse=root)
    shared_feature_fit(RUN, STAGE, BASIS, dict_size=DICT_SIZE, k=K, steps=FIT_STEPS,
                       warehouse=root, progress=False, min_explained_variance=-1.0,
                       max_active_fraction=1.0, max_dead_fraction=1.0)
    feature_trajectory_sweep(BASIS, warehouse=root, progress=False)
    # A birth must persist over checkpoints after a first one it is absent at: the --quick run
    # has too few for the default persistence (its births are only there to be queried).
    analyze_births(BASIS, warehouse=root,
                   persistence=min(DEFAULT_PERSISTENCE, n_checkpoints - 1))
    compare_features(BASIS, 0, (n_checkpoints - 1) * 100, warehouse=root)
    return root


class DenseSweepReference:
    """One checkpoint's statistics the direct way: dense float64 codes for every batch."""

    def __init__(self, basis, activations):
        self.basis, self.activations = basis, activations

    def run(self, activations_file: Path) -> float:
        n, h, d = len(self.activations), self.basis.d_hidden, self.activations.d_model
        count, total, peak = np.zeros(h), np.zeros(h), np.zeros(h)
        gram, cross = np.zeros((h + 1, h + 1)), np.zeros((h + 1, d))
        top_values = np.full((EXAMPLES, h), -np.inf)
        nonzero = []
        for start in range(0, n, SWEEP_BATCH):
            index = np.arange(start, min(start + SWEEP_BATCH, n))
            x_t = torch.from_numpy(self.activations.rows(index, normalized=True))
            values, _ = self.basis.encode([x_t], 0)
            f = values.double().numpy()
            count += (f > 0).sum(axis=0)
            total += f.sum(axis=0)
            peak = np.maximum(peak, f.max(axis=0))
            augmented = np.hstack([f, np.ones((len(index), 1))])
            gram += augmented.T @ augmented
            cross += augmented.T @ x_t.double().numpy()
            top_values = -np.sort(-np.vstack([top_values, f]), axis=0)[:EXAMPLES]
            token, feature = np.nonzero(f)
            nonzero.append(pa.table({"row": index[token], "feature_id": feature,
                                     "value": f[token, feature].astype(np.float32)}))
        np.linalg.solve(gram + 1e-6 * np.eye(h + 1), cross)
        pq.write_table(pa.concat_tables(nonzero), activations_file)
        return n


def _sweep_one_checkpoint(root: str, activations_file: Path) -> None:
    sweep_checkpoint(root, None, BASIS, 0, activations_file)  # None: the default catalog


def sweep_peak_rss_mb(root: Path, activations_file: Path) -> float:
    return in_fresh_process(_sweep_one_checkpoint, str(root), activations_file)[1]
