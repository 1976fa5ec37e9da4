"""The warehouse: DuckLake round trips, one snapshot per job, time travel, concurrent writers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.compaction import compact_warehouse
from featurestore.errors import (
    FeaturestoreError,
    NotFoundError,
    SchemaVersionError,
)
from featurestore.lake import load_extensions
from featurestore.schema import spec, table_specs
from featurestore.warehouse import Warehouse, connect, describe_table
from featurestore.writer import write_partition_file

from .conftest import query, snapshot

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def run_row(run: str, d_model: int = 16) -> dict:
    return {"run": run, "kind": "external", "model_family": None, "parent_run": None,
            "parent_step": None, "seed": None, "steps": None, "d_model": d_model,
            "n_layers": None, "model_config": None, "task_config": None, "train_config": None,
            "featurestore_version": "test", "created_at": NOW}


def test_round_trip_through_duckdb_and_polars(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    with wh.writer("test") as writer:
        writer.put("runs", [run_row("a", 16), run_row("b", 32)])

    con = connect(wh.root)
    frame = con.sql("SELECT run, d_model, created_at FROM runs ORDER BY run").pl()
    con.close()
    assert frame["run"].to_list() == ["a", "b"]
    assert frame["d_model"].to_list() == [16, 32]
    assert frame["created_at"][0] == NOW

    # The same rows straight from the lake's Parquet file with polars, no DuckDB involved.
    (live,) = (wh.root / "data" / "main" / "runs").glob("*.parquet")
    direct = pl.read_parquet(live).sort("run")
    assert direct["run"].to_list() == ["a", "b"]
    assert direct["d_model"].to_list() == [16, 32]


def test_rows_with_the_same_key_are_replaced_not_duplicated(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    with wh.writer("first") as writer:
        writer.put("runs", [run_row("a", 16), run_row("b", 16)])
    with wh.writer("second") as writer:
        writer.put("runs", [run_row("b", 64)])
    con = connect(wh.root)
    assert con.execute("SELECT run, d_model FROM runs ORDER BY run").fetchall() == [
        ("a", 16), ("b", 64)]
    con.close()


def test_replace_where_drops_a_whole_slice(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    ckpt = {"tokens_seen": None, "path": None, "train_loss": None, "train_accuracy": None,
            "heldout_loss": None, "heldout_accuracy": None, "split_metrics": None,
            "created_at": NOW}
    with wh.writer("first") as writer:
        writer.put("checkpoints", [{"run": "a", "step": s, **ckpt} for s in (0, 5, 9)]
                   + [{"run": "b", "step": 1, **ckpt}])
    with wh.writer("second") as writer:
        writer.put("checkpoints", [{"run": "a", "step": 3, **ckpt}], replace_where={"run": "a"})
    con = connect(wh.root)
    assert con.execute("SELECT run, step FROM checkpoints ORDER BY run, step").fetchall() == [
        ("a", 3), ("b", 1)]
    con.close()


def test_a_failed_job_leaves_the_warehouse_as_it_was(warehouse_copy):
    before = snapshot(warehouse_copy)
    wh = Warehouse(warehouse_copy)
    with pytest.raises(RuntimeError, match="boom"):
        with wh.writer("doomed") as writer:
            writer.put("runs", [run_row("never")])
            (writer.stage_dir("runs/never") / "file.txt").write_text("x")
            raise RuntimeError("boom")
    assert snapshot(warehouse_copy) == before  # its folder runs/never@<version> is gone too
    con = connect(warehouse_copy)
    assert con.execute("SELECT count(*) FROM runs WHERE run = 'never'").fetchall() == [(0,)]
    con.close()


def test_unknown_or_newer_schema_version_is_refused(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    with wh.writer("init") as writer:
        writer.put("runs", [run_row("a")])
    with wh.writer("from the future") as writer:
        writer.put("schema_version", [{"version": 99, "featurestore_version": "9.0",
                                       "created_at": NOW}])
    with pytest.raises(SchemaVersionError, match="schema version 99.*upgrade featurestore"):
        connect(wh.root)


def test_missing_warehouse_names_the_fix(tmp_path):
    with pytest.raises(NotFoundError, match="no warehouse at .*featurestore train-model"):
        connect(tmp_path / "nowhere")


def test_a_moved_warehouse_works_from_another_directory(trained_warehouse, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(trained_warehouse, moved)
    monkeypatch.chdir(tmp_path)
    con = connect(moved)
    (n,) = con.execute("SELECT count(*) FROM activation_sets").fetchall()[0]
    assert n == 6
    # Paths in tables are relative to the root, and fs_path() resolves them in the new place.
    (path,) = con.execute("SELECT fs_path(path) FROM checkpoints LIMIT 1").fetchall()[0]
    con.close()
    assert path.startswith(str(moved)) and os.path.isdir(path)


def test_readers_do_not_block_writers(warehouse_copy):
    reader = connect(warehouse_copy)  # e.g. a notebook left open
    with Warehouse(warehouse_copy).writer("job") as writer:
        writer.put("runs", [run_row("new")])
    # The open connection keeps its snapshot; a new one sees the commit.
    assert reader.execute("SELECT count(*) FROM runs WHERE run='new'").fetchall() == [(0,)]
    reader.close()
    fresh = connect(warehouse_copy)
    assert fresh.execute("SELECT count(*) FROM runs WHERE run='new'").fetchall() == [(1,)]
    fresh.close()


def test_the_warehouse_opens_as_a_plain_ducklake(trained_warehouse):
    # Someone using DuckDB and its ducklake extension alone, without featurestore, reads the
    # same tables.
    con = duckdb.connect()
    try:
        load_extensions(con, "sqlite")
        con.execute(f"ATTACH 'ducklake:sqlite:{trained_warehouse}/catalog.sqlite' AS wh "
                    f"(DATA_PATH '{trained_warehouse}/data/', READ_ONLY)")
        plain = con.execute("SELECT run, step, path FROM wh.checkpoints ORDER BY ALL").fetchall()
    finally:
        con.close()
    assert plain == query(trained_warehouse, "SELECT run, step, path FROM checkpoints ORDER BY ALL")
    assert plain


def test_every_table_and_column_has_a_description(trained_warehouse):
    for table in table_specs():
        columns = describe_table(table, trained_warehouse)
        assert columns, table
        for column in columns:
            assert len(column["description"]) > 10, (table, column["column"])


def test_not_null_columns_are_enforced(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    with pytest.raises(FeaturestoreError, match="runs.kind may not be NULL"):
        with wh.writer("bad") as writer:
            writer.put("runs", [{**run_row("a"), "kind": None}])
    assert not wh.exists()


def test_every_row_is_in_a_parquet_file_not_in_the_catalog(trained_warehouse):
    # No data inlining: the rows of each table are the rows of its Parquet files.
    for table in ("runs", "checkpoints", "activation_sets", "schema_version"):
        files = sorted((trained_warehouse / "data" / "main" / table).rglob("*.parquet"))
        (rows,) = query(trained_warehouse, f"SELECT count(*) FROM {table}")[0]
        assert rows >= 1 and sum(pq.read_metadata(f).num_rows for f in files) == rows, table


def test_the_warehouse_readme_documents_every_table_and_column():
    from featurestore import table_docs

    documented = table_docs.section(table_docs.README.read_text())
    for table in table_specs().values():
        assert f"### `{table.name}`" in documented
        for column in table.columns:
            comment = column.comment.replace("|", "\\|")  # escaped: | would end the cell
            assert f"| `{column.name}` | {column.type} | {comment} |" in documented
    assert documented == table_docs.render(), (
        "warehouse/README.md is out of date: run python -m featurestore.table_docs")


# ---------------------------------------------------------------------------------------------
# Partitioned tables: one file per (basis, step) in data/main/feature_activations/basis=B/step=S/


def activation_rows(seed: int, bases=("a", "b"), steps=(0, 10, 20), n: int = 40) -> pa.Table:
    rng = np.random.default_rng(seed)
    parts = [pa.table({
        "basis": pa.array([basis] * n), "step": np.full(n, step, dtype=np.int64),
        "feature_id": rng.integers(0, 6, n).astype(np.int32),
        "sequence_id": np.arange(n, dtype=np.int64), "position": rng.integers(0, 8, n, np.int32),
        "value": rng.random(n).astype(np.float32)}) for basis in bases for step in steps]
    return pa.concat_tables(parts)


def rows_where(rows: pa.Table, **equal) -> list[tuple]:
    """(basis, step, feature_id, sequence_id, position, value) of the rows matching, by numpy."""
    mask = np.ones(rows.num_rows, dtype=bool)
    for column, value in equal.items():
        mask &= rows[column].to_numpy(zero_copy_only=False) == value
    picked = rows.filter(pa.array(mask))
    return sorted(zip(*(picked[c].to_pylist() for c in picked.column_names)))


ACTIVATIONS = "SELECT * FROM feature_activations WHERE {} ORDER BY ALL"


def test_partitions_live_in_one_folder_per_basis_and_step(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    with wh.writer("sweep") as writer:
        writer.put("feature_activations", activation_rows(0))
    folder = wh.root / "data" / "main" / "feature_activations"
    files = sorted(p.relative_to(folder) for p in folder.rglob("*.parquet"))
    assert [str(f.parent) for f in files] == [f"basis={b}/step={s}" for b in "ab"
                                              for s in (0, 10, 20)]
    for file in files:  # each holds exactly its partition's rows
        basis, step = (part.split("=")[1] for part in file.parent.parts)
        stored = pq.read_table(folder / file)
        assert set(stored["basis"].to_pylist()) == {basis}
        assert set(stored["step"].to_pylist()) == {int(step)}


def test_pruned_queries_match_numpy_and_the_unpruned_scan(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    rows = activation_rows(2)
    with wh.writer("sweep") as writer:
        writer.put("feature_activations", rows)
    files = ", ".join(f"'{p}'" for p in (wh.root / "data").rglob("*.parquet")
                      if "feature_activations" in p.parts)
    con = connect(wh.root)
    for where, equal in [("step = 20", {"step": 20}), ("basis = 'a'", {"basis": "a"}),
                         ("feature_id = 2", {"feature_id": 2}),
                         ("basis = 'a' AND step = 0 AND feature_id = 5",
                          {"basis": "a", "step": 0, "feature_id": 5})]:
        got = con.execute(ACTIVATIONS.format(where)).fetchall()
        plain = con.execute(f"SELECT * FROM read_parquet([{files}]) WHERE {where} ORDER BY ALL")
        assert got == rows_where(rows, **equal) == plain.fetchall(), where
    con.close()

    # A partition written again replaces its rows; the rest stay; the old snapshot still reads
    # the old rows.
    (before,) = [s.snapshot_id for s in wh.snapshots(limit=1)]
    again = activation_rows(3, bases=("a",), steps=(10,), n=7)
    with wh.writer("sweep again") as writer:
        writer.put("feature_activations", again)
    expected = rows_where(again) + [r for r in rows_where(rows) if r[:2] != ("a", 10)]
    assert query(wh.root, ACTIVATIONS.format("true")) == sorted(expected)
    assert query(wh.root, ACTIVATIONS.format("basis = 'a' AND step = 10")) == rows_where(again)
    old = connect(wh.root, as_of=before)
    assert old.execute(ACTIVATIONS.format("true")).fetchall() == rows_where(rows)
    old.close()


def test_a_partition_value_that_cannot_name_a_folder_is_refused(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    with pytest.raises(FeaturestoreError, match=r"feature_activations.basis value.*'a/\.\./b'"):
        with wh.writer("bad sweep") as writer:
            writer.put("feature_activations", activation_rows(5, bases=("a/../b",), steps=(0,)))
    assert not wh.exists()


def birth_rows(seed: int, features: int, threshold: float = 0.01) -> pa.Table:
    rng = np.random.default_rng(seed)
    born = rng.random(features) < 0.8
    return pa.table({
        "basis": pa.array(["a"] * features),
        "feature_id": rng.permutation(features).astype(np.int32),
        "metric": pa.array(["activation_rate"] * features),
        "presence": pa.array(["absolute"] * features),
        "threshold": np.full(features, threshold), "persistence": np.full(features, 3, np.int32),
        "stable_eps": np.full(features, 0.1), "stable_cos": np.full(features, 0.9),
        "feature_threshold": np.full(features, threshold),
        "first_present_step": pa.nulls(features, pa.int64()),
        "birth_step": pa.array(rng.integers(0, 50, features) * 10, mask=~born),
        "birth_censored": pa.array(np.zeros(features, dtype=bool), mask=~born),
        "stabilization_step": pa.nulls(features, pa.int64()),
        "death_step": pa.nulls(features, pa.int64()),
        "death_censored": pa.nulls(features, pa.bool_()), "drift": rng.random(features),
        "present_at_init": np.zeros(features, dtype=bool)})


def test_a_table_is_stored_in_its_declared_order(tmp_path):
    # births declares sort_by (..., birth_step, feature_id), so a step window is read from the
    # row groups whose birth_step min/max overlap it.
    births = table_specs()["births"]
    assert births.sort_by[-2:] == ("birth_step", "feature_id")
    wh = Warehouse(tmp_path / "wh")
    first, second = birth_rows(6, 5000), birth_rows(7, 3000, threshold=0.02)
    with wh.writer("births") as writer:
        writer.put("births", first)
    with wh.writer("more births") as writer:  # added beside the rows already there
        writer.put("births", second)
    files = sorted((wh.root / "data" / "main" / "births").glob("*.parquet"),
                   key=lambda f: pq.read_metadata(f).num_rows)
    assert [pq.read_metadata(f).num_rows for f in files] == [3000, 5000]
    for file in files:
        table = pq.read_table(file)
        order = np.lexsort([table["feature_id"].to_numpy(),
                            table["birth_step"].fill_null(np.iinfo(np.int64).max).to_numpy(),
                            table["threshold"].to_numpy()])
        assert (order == np.arange(table.num_rows)).all()  # NULL birth steps last
    window = query(wh.root, "SELECT threshold, feature_id FROM births WHERE birth_step BETWEEN "
                            "100 AND 200 ORDER BY ALL")
    expected = [(t, f) for rows in (first, second) for t, f, b in zip(
        rows["threshold"].to_pylist(), rows["feature_id"].to_pylist(),
        rows["birth_step"].to_pylist()) if b is not None and 100 <= b <= 200]
    assert window == sorted(expected) and window


def test_partition_files_are_sorted_by_every_key_column_whatever_order_rows_come_in(tmp_path):
    # Rows tied on feature_id and sequence_id that differ only in position: the sortedness check
    # must reach the third key, and an already-sorted input must come back unchanged.
    table = spec("feature_activations")
    rows = pa.table({
        "basis": pa.array(["a"] * 6), "step": np.zeros(6, dtype=np.int64),
        "feature_id": np.array([0, 0, 0, 1, 1, 2], dtype=np.int32),
        "sequence_id": np.array([3, 3, 4, 0, 0, 1], dtype=np.int64),
        "position": np.array([5, 2, 0, 7, 1, 0], dtype=np.int32),
        "value": np.arange(6, dtype=np.float32)})
    order = np.lexsort([rows[c].to_numpy() for c in reversed(table.sort_by)])
    for name, given in (("unsorted", rows), ("sorted", rows.take(order)),
                        ("reversed", rows.take(order[::-1]))):
        path = tmp_path / f"{name}.parquet"
        write_partition_file(table, {"basis": "a", "step": 0}, given, path)
        stored = pq.read_table(path)
        assert stored["value"].to_pylist() == [1.0, 0.0, 2.0, 4.0, 3.0, 5.0], name


# ---------------------------------------------------------------------------------------------
# Snapshots, time travel, compaction


def test_each_job_is_one_snapshot_with_its_job_and_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr("featurestore.writer.COMMAND_LINE", ["sql", "--as-of", "1"])
    wh = Warehouse(tmp_path / "wh")
    with wh.writer("first") as writer:
        writer.put("runs", [run_row("a")])
        writer.put("checkpoints", [{"run": "a", "step": 0, "created_at": NOW}])
    with wh.writer("second") as writer:
        writer.put("runs", [run_row("b")])
    newest, older = wh.snapshots(limit=2)
    assert (newest.job, older.job) == ("second", "first")
    assert newest.snapshot_id == older.snapshot_id + 1
    assert newest.command_line == ["sql", "--as-of", "1"]
    assert newest.changes["tables_inserted_into"] == ["runs"]
    # the first commit also created every table and wrote the schema version
    assert sorted(older.changes["tables_inserted_into"]) == ["checkpoints", "runs",
                                                             "schema_version"]


def test_as_of_reads_the_rows_a_rerun_replaced(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    with wh.writer("first") as writer:
        writer.put("runs", [run_row("a", 16), run_row("b", 16)])
    (first,) = wh.snapshots(limit=1)
    with wh.writer("rerun") as writer:
        writer.put("runs", [run_row("a", 64)])
    runs = "SELECT run, d_model FROM runs ORDER BY run"
    assert query(wh.root, runs) == [("a", 64), ("b", 16)]
    old = connect(wh.root, as_of=first.snapshot_id)
    assert old.execute(runs).fetchall() == [("a", 16), ("b", 16)]
    old.close()
    # By time, and from the command line.
    old = connect(wh.root, as_of=first.time.isoformat())
    assert old.execute(runs).fetchall() == [("a", 16), ("b", 16)]
    old.close()
    result = CliRunner().invoke(cli, ["--warehouse", str(wh.root), "sql", runs, "--format",
                                      "json", "--as-of", str(first.snapshot_id)])
    assert result.exit_code == 0, result.output
    assert [r["d_model"] for r in json.loads(result.output)] == [16, 16]
    with pytest.raises(NotFoundError, match="no snapshot 999"):
        connect(wh.root, as_of=999)
    with pytest.raises(FeaturestoreError, match="neither a snapshot id nor a time"):
        connect(wh.root, as_of="yesterday-ish")


def test_compact_keeps_what_snapshots_read_and_deletes_the_rest(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    folders = []  # the run's folder of the first job, then of the second
    for d_model in (16, 32):
        with wh.writer("train") as writer:
            folder = writer.stage_dir("runs/a")
            (folder / "weights").write_bytes(b"w" * 100)
            writer.put("runs", [run_row("a", d_model)])
            writer.put("checkpoints", [{"run": "a", "step": 0, "created_at": NOW,
                                        "path": f"{writer.versioned('runs/a')}/weights"}])
        folders.append(folder.name)
    assert sorted(p.name for p in (wh.root / "runs").iterdir()) == sorted(folders)
    assert all(f.startswith("a@") for f in folders)
    (wh.root / "tmp" / "job-dead").mkdir(parents=True)  # scratch of a killed job

    # Younger than --older-than: nothing goes.
    kept = compact_warehouse(wh.root, timedelta(days=7))
    assert kept.snapshots_expired == 0 and kept.artefact_folders_deleted == []
    assert sorted(p.name for p in (wh.root / "runs").iterdir()) == sorted(folders)
    dry = compact_warehouse(wh.root, timedelta(0), dry_run=True)
    assert dry.artefact_folders_deleted == [f"runs/{folders[0]}"]
    assert sorted(p.name for p in (wh.root / "runs").iterdir()) == sorted(folders)

    result = compact_warehouse(wh.root, timedelta(0))
    assert result.snapshots_kept == 1 and result.snapshots_expired >= 2
    assert result.artefact_folders_deleted == [f"runs/{folders[0]}"]
    assert result.scratch_folders_deleted == 1 and not (wh.root / "tmp" / "job-dead").exists()
    assert sorted(p.name for p in (wh.root / "runs").iterdir()) == folders[1:]
    assert query(wh.root, "SELECT d_model FROM runs") == [(32,)]
    (path,) = query(wh.root, "SELECT path FROM checkpoints")[0]
    assert (wh.root / path).read_bytes() == b"w" * 100
    # The replaced rows' files are gone from disk: only the live runs file is left.
    (live,) = (wh.root / "data" / "main" / "runs").glob("*.parquet")
    assert pq.read_table(live)["d_model"].to_pylist() == [32]


# ---------------------------------------------------------------------------------------------
# Concurrent writers: processes committing to one warehouse at once

WRITER_PROCESS = textwrap.dedent("""
    import sys
    from datetime import datetime, timezone
    from featurestore.warehouse import Warehouse
    root, name, commits = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(commits):
        with Warehouse(root).writer(f"{name} {i}") as writer:
            writer.put("checkpoints", [{"run": name, "step": i, "train_loss": float(i),
                                        "created_at": datetime.now(timezone.utc)}])
            writer.put("runs", [{"run": "shared", "kind": "external", "d_model": i,
                                 "featurestore_version": name,
                                 "created_at": datetime.now(timezone.utc)}])
""")


def test_concurrent_writer_processes_lose_nothing_and_never_duplicate_a_key(tmp_path):
    root = tmp_path / "wh"
    with Warehouse(root).writer("init") as writer:
        writer.put("runs", [run_row("seed")])
    commits = 6
    jobs = [subprocess.Popen([sys.executable, "-c", WRITER_PROCESS, str(root), f"w{n}",
                              str(commits)], stderr=subprocess.PIPE, text=True)
            for n in range(4)]
    for job in jobs:
        assert job.wait(timeout=300) == 0, job.stderr.read()
    # Every process's rows are there once each ...
    assert query(root, "SELECT run, count(*), min(step), max(step) FROM checkpoints "
                       "GROUP BY run ORDER BY run") == [
        (f"w{n}", commits, 0, commits - 1) for n in range(4)]
    # ... and the row every commit replaced is there once, from one of the last commits.
    assert query(root, "SELECT count(*), max(d_model) FROM runs WHERE run = 'shared'") == [
        (1, commits - 1)]
    # The lake's own first snapshot, "init", then one per commit.
    assert len(Warehouse(root).snapshots(limit=100)) == 1 + 1 + 4 * commits


# ---------------------------------------------------------------------------------------------
# What jobs leave behind: scratch of killed jobs, cleanup that fails after a commit

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from featurestore.warehouse import Warehouse
    with Warehouse(sys.argv[1]).writer("killed") as writer:
        writer.tmp_dir.mkdir()
        (writer.tmp_dir / "partial.parquet").write_bytes(b"half a file")
        print(writer.tmp_dir, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_the_next_writer_deletes_the_scratch_of_a_killed_job_but_not_of_a_running_one(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    with wh.writer("init") as writer:
        writer.put("runs", [run_row("a")])
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(wh.root)],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    dead = Path(killed.stdout.strip())
    assert dead.is_dir() and dead.parent == wh.tmp_dir
    # Scratch of an older featurestore, which did not lock it: kept while it may be running.
    young, old = wh.tmp_dir / "job-young", wh.tmp_dir / "job-old"
    young.mkdir()
    old.mkdir()
    two_days_ago = NOW.timestamp() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))

    with wh.writer("running") as running:
        running.tmp_dir.mkdir()
        with Warehouse(wh.root).writer("next"):
            pass
        assert running.tmp_dir.is_dir()
    assert not dead.exists() and not dead.with_name(dead.name + ".lock").exists()
    assert young.is_dir() and not old.exists()
    assert sorted(p.name for p in wh.tmp_dir.iterdir()) == ["job-young"]


@contextmanager
def undeletable(folder: Path):
    """`folder` cannot be deleted while the block runs: a mount point (root), or in a folder
    this user may not write to."""
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        (folder / "weights").write_bytes(b"w")
        try:
            yield
        finally:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)
        return
    folder.parent.chmod(0o555)
    try:
        yield
    finally:
        folder.parent.chmod(0o755)


def test_cleanup_that_fails_after_the_commit_is_a_warning_not_a_failure(tmp_path, capfd):
    wh = Warehouse(tmp_path / "wh")
    leftover = wh.root / "rejected" / "old-fit"
    leftover.mkdir(parents=True)
    with undeletable(leftover):
        with wh.writer("fit") as writer:
            writer.put("runs", [run_row("a")])
            writer.remove_dir("rejected/old-fit")
        assert writer.committed
        warnings = capfd.readouterr().err.strip().splitlines()
        assert len(warnings) == 1 and warnings[0].startswith("featurestore: warning: fit:")
        assert str(leftover) in warnings[0] and "could not delete" in warnings[0]
    assert query(wh.root, "SELECT run FROM runs") == [("a",)]
