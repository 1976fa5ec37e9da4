"""Shared fixtures: one tiny trained run with collected activations, built once per session.

Everything is real: torch training, safetensors checkpoints, nnsight reads, datasets folders,
Parquet files and a DuckDB catalog, just small.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from featurestore.settings import set_torch_threads

TINY_RUN = "tiny"
TINY_STEPS = 20
# Fit-quality bounds that accept the small, briefly trained dictionaries of the tests: they check
# what a job writes, not how good a 30-step fit is (tests/test_fit_quality.py checks the bounds).
RELAXED_BOUNDS = {"min_explained_variance": -10.0, "max_active_fraction": 1.0,
                  "max_dead_fraction": 1.0}
RELAXED_FLAGS = ["--min-explained-variance", "-10", "--max-active-fraction", "1",
                 "--max-dead-fraction", "1"]
TINY_D_MODEL = 32
TINY_TOKENS = 1024  # 32 sequences of 32 tokens
STAGES = ["layer_2_post_mlp", "final_norm"]


set_torch_threads(2)  # before any fixture trains


@pytest.fixture(autouse=True)
def _threads():
    """Two torch threads again after every test: a CLI test's --threads 1 is process-wide, and a
    fixture built after it would otherwise train under another thread count (float sums in
    another order) than a test that retrains to compare."""
    yield
    set_torch_threads(2)


@pytest.fixture(scope="session")
def trained_warehouse(tmp_path_factory) -> Path:
    """A warehouse with run `tiny` (20 steps, d_model 32) and both stages for three checkpoints."""
    from featurestore.ingest.collect import collect
    from featurestore.ingest.train_model import train_model

    root = tmp_path_factory.mktemp("trained") / "warehouse"
    result = train_model(TINY_RUN, steps=TINY_STEPS, d_model=TINY_D_MODEL, warehouse=root,
                         progress=False)
    middle = result.checkpoint_steps[len(result.checkpoint_steps) // 2]
    collect(TINY_RUN, STAGES, checkpoints=f"0,{middle},LAST", tokens=TINY_TOKENS,
            warehouse=root, progress=False)
    return root


@pytest.fixture
def warehouse_copy(trained_warehouse, tmp_path) -> Path:
    """A private copy of the trained warehouse, for tests that change or break it."""
    copy = tmp_path / "warehouse"
    shutil.copytree(trained_warehouse, copy)
    return copy


def query(root: Path, sql: str, params=()) -> list[tuple]:
    """Rows of one query on a fresh connection to the warehouse at `root`."""
    from featurestore.warehouse import connect

    con = connect(root)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def basis_path(root: Path, basis: str) -> Path:
    """The weights folder of a basis, where its `bases` row points (a versioned folder)."""
    (path,) = query(root, "SELECT path FROM bases WHERE name = ?", [basis])[0]
    return root / path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under a warehouse (but tmp/ and SQLite's shared-memory index and write-ahead
    log, which readers touch) with its contents: the catalog and every data file."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(("-shm", "-wal"))
        and "tmp" not in p.relative_to(root).parts
    }


@pytest.fixture(scope="session")
def analysed_warehouse(tmp_path_factory, trained_warehouse) -> Path:
    """The tiny run taken through every analysis, for the read side (exports, plots, graphs,
    reports): a crosscoder `tiny-diff` (first vs last checkpoint at layer_2_post_mlp), shared
    bases `tiny-l2` and `tiny-fn` (fitted, swept, births, first-vs-last compare), patches of
    tiny-l2's top features and lineage at the last checkpoint (tiny-fn with tiny-l2 upstream).
    Small and quick: about 30 s. Copy it before changing it."""
    from featurestore.ingest.birth_analysis import analyze_births
    from featurestore.ingest.feature_compare import compare_features
    from featurestore.ingest.feature_lineage import feature_lineage
    from featurestore.ingest.feature_patch import feature_patch
    from featurestore.ingest.shared_feature_fit import shared_feature_fit
    from featurestore.ingest.train_crosscoder import train_crosscoder_job
    from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep
    from featurestore.warehouse import connect

    root = tmp_path_factory.mktemp("analysed") / "warehouse"
    shutil.copytree(trained_warehouse, root)
    con = connect(root)
    steps = [s for (s,) in con.execute(
        "SELECT step FROM activation_sets WHERE stage = 'layer_2_post_mlp' ORDER BY step"
    ).fetchall()]
    con.close()
    first, last = steps[0], steps[-1]
    train_crosscoder_job("tiny-diff", [f"first={TINY_RUN}@{first}:layer_2_post_mlp",
                                       f"last={TINY_RUN}@{last}:layer_2_post_mlp"],
                         dict_size=64, k=4, steps=30, batch_size=128, log_every=10,
                         save_every=10, warehouse=root, progress=False, **RELAXED_BOUNDS)
    fit = dict(checkpoints=",".join(map(str, steps)), dict_size=64, k=4, steps=150,
               batch_size=256, min_explained_variance=-1.0, max_active_fraction=1.0,
               max_dead_fraction=1.0, warehouse=root, progress=False)
    for stage, name in (("layer_2_post_mlp", "tiny-l2"), ("final_norm", "tiny-fn")):
        shared_feature_fit(TINY_RUN, stage, name, **fit)
        feature_trajectory_sweep(name, warehouse=root, progress=False)
        analyze_births(name, metric="activation_rate", presence="absolute", threshold=0.05,
                       persistence=1, permutations=5, warehouse=root)
        compare_features(name, first, last, warehouse=root)
    feature_patch("tiny-l2", first, last, features="top:3", tokens=256, warehouse=root,
                  progress=False)
    feature_lineage("tiny-l2", steps=str(last), patch_threshold=0.0, tokens=256,
                    warehouse=root, progress=False)
    feature_lineage("tiny-fn", steps=str(last), features="top:4", upstream="tiny-l2",
                    tokens=256, warehouse=root, progress=False)
    return root


@pytest.fixture
def fault_tally():
    """The session's fault-suite counts (tests/fault_tally.py), printed at the end."""
    from .fault_tally import TALLY

    return TALLY


def pytest_terminal_summary(terminalreporter):
    from .fault_tally import TALLY

    for line in TALLY.summary():
        terminalreporter.write_line(line)
