"""Writing jobs create the warehouse: `featurestore init`, and jobs on a missing or empty folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from featurestore.activations import TokenColumns, write_activation_set
from featurestore.cli import cli
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.ingest.train_crosscoder import train_crosscoder_job
from featurestore.schema import table_specs
from featurestore.warehouse import Warehouse, connect

from .conftest import query

RELAXED = dict(min_explained_variance=-1.0, max_active_fraction=1.0, max_dead_fraction=1.0)
SMALL = dict(dict_size=32, k=4, steps=20, batch_size=128, save_every=10, log_every=10,
             progress=False, **RELAXED)


@pytest.fixture
def activation_folder(tmp_path):
    n, d = 1024, 8
    rng = np.random.default_rng(0)
    index = np.arange(n)
    write_activation_set(tmp_path / "acts", rng.standard_normal((n, d)).astype(np.float32),
                         TokenColumns(index // 16, (index % 16).astype(np.int32),
                                      rng.integers(0, 50, n), np.array(["s"] * n, dtype=object)))
    return tmp_path / "acts"


def test_init_creates_an_empty_warehouse_once(tmp_path):
    root = tmp_path / "wh"
    runner = CliRunner()
    first = runner.invoke(cli, ["--warehouse", str(root), "init"])
    assert first.exit_code == 0, first.output
    assert f"created an empty warehouse at {root}" in first.output
    assert query(root, "SELECT count(*) FROM runs") == [(0,)]
    assert query(root, "SELECT version FROM schema_version") == [(3,)]
    assert {p.name for p in root.iterdir()} - {"catalog.sqlite-wal", "catalog.sqlite-shm"} == {
        "catalog.sqlite", "catalog.sqlite.backup", "data"}
    snapshots = Warehouse(root).snapshots()
    again = runner.invoke(cli, ["--warehouse", str(root), "init", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output) == {"path": str(root), "created": False, "schema_version": 3,
                                        "tables": len(table_specs())}
    assert Warehouse(root).snapshots() == snapshots  # nothing committed


def test_readers_of_a_missing_warehouse_are_told_to_init(tmp_path):
    with pytest.raises(NotFoundError, match="no warehouse at .*`featurestore init`"):
        connect(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["--warehouse", str(tmp_path / "empty"), "tables"])
    assert result.exit_code == 1 and "featurestore init" in result.output
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("prepare", ["missing", "mkdir"])
def test_a_crosscoder_trains_in_a_missing_or_empty_warehouse(tmp_path, activation_folder,
                                                             prepare):
    root = tmp_path / "wh"
    if prepare == "mkdir":
        root.mkdir()
    result = CliRunner().invoke(cli, [
        "--warehouse", str(root), "--threads", "1", "train-crosscoder", "--name", "sae",
        "--source", f"x={activation_folder}", "--dict-size", "32", "--k", "4", "--steps", "20",
        "--batch-size", "128", "--min-explained-variance", "-1", "--max-active-fraction", "1",
        "--max-dead-fraction", "1", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    assert query(root, "SELECT name, n_sources FROM bases") == [("sae", 1)]
    assert query(root, "SELECT count(*) FROM features") == [(32,)]
    assert query(root, "SELECT version FROM schema_version") == [(3,)]


@pytest.mark.parametrize("prepare", ["missing", "mkdir"])
def test_a_failed_job_leaves_nothing_behind(tmp_path, activation_folder, prepare):
    root = tmp_path / "wh"
    if prepare == "mkdir":
        root.mkdir()
    with pytest.raises(NotFoundError, match="no activation set named 'nope'"):
        train_crosscoder_job("sae", [f"x={activation_folder}", "y=nope"], warehouse=root,
                             **SMALL)
    if prepare == "missing":
        assert not root.exists()
    else:
        assert list(root.iterdir()) == []


def test_a_lost_catalog_is_not_mistaken_for_a_new_warehouse(tmp_path, activation_folder):
    root = tmp_path / "wh"
    train_crosscoder_job("sae", [f"x={activation_folder}"], warehouse=root, **SMALL)
    backup = CliRunner().invoke(cli, ["--warehouse", str(root), "catalog", "backup", "--out",
                                      str(tmp_path / "backup.sqlite")])
    assert backup.exit_code == 0, backup.output
    for name in ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm",
                 "catalog.sqlite.backup"):
        (root / name).unlink(missing_ok=True)
    with pytest.raises(FeaturestoreError,
                       match="table files .* but no catalog .*catalog restore --from FILE"):
        train_crosscoder_job("other", [f"x={activation_folder}"], warehouse=root, **SMALL)
    result = CliRunner().invoke(cli, ["--warehouse", str(root), "init"])
    assert result.exit_code == 1 and "catalog backup" in result.output
    assert not (root / "catalog.sqlite").exists()
    # The table files are untouched, so the backup brings the basis back.
    restore = CliRunner().invoke(cli, ["--warehouse", str(root), "catalog", "restore", "--from",
                                       str(tmp_path / "backup.sqlite")])
    assert restore.exit_code == 0, restore.output
    assert query(root, "SELECT name FROM bases") == [("sae",)]
