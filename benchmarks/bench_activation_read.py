"""Activation read rate: `ActivationSet.batches` against datasets' own torch formatter.

Training a sparse autoencoder on an activation set reads it many times over in batches, so the
read rate bounds how fast such training can go. The set here is synthetic (random float32,
d_model 64) but written with `write_activation_set`, exactly as `collect` writes real ones.

Each reader is timed on two orders, with the same batch size and the same rows per batch:

    sequential  rows 0..n in order
    shuffled    a seeded permutation, each batch's row numbers sorted (what ActivationSet does,
                because sorted reads walk the memory map forwards)

The baseline is `datasets.load_from_disk(path).with_format("torch", columns=["activations"])`
indexed by the same batches: a slice for sequential batches (datasets' fastest path for
contiguous rows) and the sorted row-number array for shuffled ones. Only the activations column
is formatted, so the baseline does no more work than ActivationSet does.

Memory: a reader of a memory-mapped set should allocate about one batch of private memory however
big the set is. Its file pages count in the process's RSS too, as they are touched, but they are
page cache shared with the kernel and dropped under pressure, so the two are reported apart.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from harness import BenchmarkResult, Figure, RunOptions, measure

from featurestore.activations import ActivationSet, TokenColumns, write_activation_set

ROWS = 500_000  # x 64 float32 = 128 MB: well past the CPU caches
QUICK_ROWS = 100_000
D_MODEL = 64
BATCH_SIZE = 4096
SEQUENCE_LENGTH = 32  # only shapes the token columns, which are not read here
SHUFFLE_SEED = 0
# datasets' formatter is far slower, so a full pass of it would dominate the run; it is timed on
# the first batches only. Its cost per batch does not depend on where in the set the batch is, so
# the rate over these batches stands for a full pass.
BASELINE_MAX_BATCHES = 16
BYTES_PER_GB = 1e9

SEQUENTIAL_BASELINE = "datasets torch formatter, sequential"
SHUFFLED_BASELINE = "datasets torch formatter, shuffled"


@dataclass
class MemoryGrowth:
    """Peak growth over one full pass of ActivationSet.batches, from just after opening the set.

    Sampled from /proc/self/status after every batch (ru_maxrss cannot be used: it is the peak of
    the whole process, which writing the set has already pushed far higher).
    """

    private_mb: float  # RssAnon: memory the reader allocates itself
    mapped_file_mb: float  # RssFile: pages of the set's file mapped in (reclaimable page cache)


def run(options: RunOptions) -> BenchmarkResult:
    import datasets

    n_rows = QUICK_ROWS if options.quick else ROWS
    set_mb = n_rows * D_MODEL * 4 / 1e6
    batch_mb = BATCH_SIZE * D_MODEL * 4 / 1e6
    order_mb = n_rows * 8 / 1e6
    with tempfile.TemporaryDirectory(prefix="bench-activation-read-") as tmp:
        path = Path(tmp) / "set"
        write_synthetic_set(path, n_rows)
        # Memory first, each pass on a freshly opened set, so file pages start unmapped.
        memory = {"sequential": memory_growth(path, None),
                  "shuffled": memory_growth(path, SHUFFLE_SEED)}

        activation_set = ActivationSet(path)
        formatter = datasets.load_from_disk(str(path)).with_format("torch",
                                                                   columns=["activations"])
        sequential = [slice(start, min(start + BATCH_SIZE, n_rows))
                      for start in range(0, n_rows, BATCH_SIZE)]
        shuffled = shuffled_batches(n_rows, SHUFFLE_SEED)
        check_same_rows(activation_set, formatter, sequential[0], None)
        check_same_rows(activation_set, formatter, shuffled[0], SHUFFLE_SEED)

        n_batches = len(sequential)
        baseline_batches = min(n_batches, BASELINE_MAX_BATCHES)
        subset_note = (f"timed on the first {baseline_batches} of {n_batches} batches "
                       f"({baseline_batches / n_batches:.0%} of the rows); the rate is bytes "
                       "read over time for those batches") if baseline_batches < n_batches else ""

        gigabytes = 1 / BYTES_PER_GB
        measurements = measure([
            Figure(SEQUENTIAL_BASELINE, "GB/s",
                   lambda: read_with_formatter(formatter, sequential[:baseline_batches]),
                   gigabytes, note=subset_note),
            Figure("ActivationSet.batches, sequential", "GB/s",
                   lambda: read_with_activation_set(activation_set, None),
                   gigabytes, baseline=SEQUENTIAL_BASELINE),
            Figure(SHUFFLED_BASELINE, "GB/s",
                   lambda: read_with_formatter(formatter, shuffled[:baseline_batches]),
                   gigabytes, note=subset_note),
            Figure("ActivationSet.batches, shuffled", "GB/s",
                   lambda: read_with_activation_set(activation_set, SHUFFLE_SEED),
                   gigabytes, baseline=SHUFFLED_BASELINE),
        ], options)

    notes = [
        "GB = 1e9 bytes of float32 activations delivered as torch tensors; the set's file is in "
        "the page cache (just written, then warmed up), so these are memory-map rates, not disk.",
        f"memory growth over one full pass: private (RssAnon) "
        f"+{memory['sequential'].private_mb:.1f} MB sequential, "
        f"+{memory['shuffled'].private_mb:.1f} MB shuffled; file pages mapped (RssFile, "
        f"reclaimable page cache) +{memory['sequential'].mapped_file_mb:.0f} MB sequential, "
        f"+{memory['shuffled'].mapped_file_mb:.0f} MB shuffled. For scale: one batch = "
        f"{batch_mb:.2f} MB, one int64 per row (the row order batches() holds) = "
        f"{order_mb:.1f} MB, the set = {set_mb:.0f} MB. Growth near 0 means the batches fit in "
        "memory the process already held.",
    ]
    return BenchmarkResult(
        name="activation_read",
        description=(f"{n_rows:,} rows x d_model {D_MODEL} float32 = {set_mb:.0f} MB, batch "
                     f"{BATCH_SIZE}"),
        measurements=measurements,
        config={"rows": n_rows, "d_model": D_MODEL, "batch_size": BATCH_SIZE,
                "set_mb": set_mb, "batch_mb": batch_mb, "shuffle_seed": SHUFFLE_SEED,
                "baseline_batches": baseline_batches, "batches": n_batches},
        details={"memory_growth_mb": {order: asdict(growth) for order, growth in memory.items()}},
        notes=notes,
    )


def write_synthetic_set(path: Path, n_rows: int) -> None:
    rng = np.random.default_rng(0)
    activations = rng.standard_normal((n_rows, D_MODEL), dtype=np.float32)
    row = np.arange(n_rows)
    tokens = TokenColumns(
        sequence_id=row // SEQUENCE_LENGTH,
        position=(row % SEQUENCE_LENGTH).astype(np.int32),
        token_id=rng.integers(0, 100, n_rows),
        split=np.full(n_rows, "train", dtype=object),
    )
    write_activation_set(path, activations, tokens)


def shuffled_batches(n_rows: int, seed: int) -> list[np.ndarray]:
    """The row numbers of each batch of ActivationSet.batches(shuffle_seed=seed), sorted.

    This mirrors ActivationSet's own shuffle so the baseline reads the same rows per batch;
    check_same_rows catches it if the two ever drift apart.
    """
    order = np.random.default_rng(seed).permutation(n_rows)
    return [np.sort(order[start:start + BATCH_SIZE]) for start in range(0, n_rows, BATCH_SIZE)]


def check_same_rows(activation_set: ActivationSet, formatter, first_batch: slice | np.ndarray,
                    shuffle_seed: int | None) -> None:
    """Refuse to compare rates if the two readers' first batches differ (they must read the same
    rows for the ratio to mean anything)."""
    ours = next(activation_set.batches(BATCH_SIZE, shuffle_seed=shuffle_seed))
    theirs = formatter[first_batch]["activations"]
    if not torch.equal(ours, theirs):
        raise RuntimeError(
            f"ActivationSet and the datasets formatter read different rows for the first batch "
            f"(shuffle_seed={shuffle_seed}); update shuffled_batches to match ActivationSet"
        )


def read_with_activation_set(activation_set: ActivationSet, shuffle_seed: int | None) -> int:
    """One full pass; returns the bytes delivered."""
    return sum(batch.numel() * batch.element_size()
               for batch in activation_set.batches(BATCH_SIZE, shuffle_seed=shuffle_seed))


def read_with_formatter(formatter, batches: list[slice] | list[np.ndarray]) -> int:
    """The given batches through datasets' torch formatter; returns the bytes delivered."""
    total = 0
    for index in batches:
        batch = formatter[index]["activations"]
        total += batch.numel() * batch.element_size()
    return total


def memory_growth(path: Path, shuffle_seed: int | None) -> MemoryGrowth:
    activation_set = ActivationSet(path)
    start = _rss_kb()
    peak = dict(start)
    for _batch in activation_set.batches(BATCH_SIZE, shuffle_seed=shuffle_seed):
        # Sampled while the batch is still alive, so it counts.
        for key, value in _rss_kb().items():
            peak[key] = max(peak[key], value)
    # Unmap the file before the next pass opens it again, or its pages would already be in.
    del activation_set
    gc.collect()
    return MemoryGrowth(private_mb=(peak["RssAnon"] - start["RssAnon"]) * 1024 / 1e6,
                        mapped_file_mb=(peak["RssFile"] - start["RssFile"]) * 1024 / 1e6)


def _rss_kb() -> dict[str, int]:
    """RssAnon and RssFile of this process in kB, from /proc/self/status (Linux)."""
    sizes = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                sizes[key] = int(value.split()[0])
    return sizes
