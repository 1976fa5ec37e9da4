"""The warehouse: Parquet + catalog round trips, atomic writes, the writer lock, the schema."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurestore.errors import (
    FeaturestoreError,
    NotFoundError,
    SchemaVersionError,
    WarehouseBusyError,
)
from featurestore.warehouse import (
    Warehouse,
    connect,
    describe_table,
    spec,
    table_specs,
    write_partition_file,
)

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

    # The same rows straight from the Parquet file with polars, no DuckDB involved.
    (live,) = (wh.root / "tables" / "runs").glob("part-*.parquet")
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


def test_replaced_files_are_kept_for_the_grace_period_then_deleted(tmp_path, monkeypatch):
    wh = Warehouse(tmp_path / "wh")
    files = lambda: sorted((wh.root / "tables" / "runs").glob("*.parquet"))  # noqa: E731
    with wh.writer("first") as writer:
        writer.put("runs", [run_row("a")])
    (first,) = files()
    with wh.writer("second") as writer:
        writer.put("runs", [run_row("b")])
    assert first in files() and len(files()) == 2  # retired, still readable by old snapshots

    monkeypatch.setattr("featurestore.warehouse.RETIRED_GRACE", timedelta(0))
    with wh.writer("third") as writer:
        writer.put("runs", [run_row("c")])
    assert first not in files()  # its grace is over
    assert wh.path(wh.live_files()["runs"]) in files() and len(files()) == 2


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
    assert snapshot(warehouse_copy) == before
    con = connect(warehouse_copy)
    assert con.execute("SELECT count(*) FROM runs WHERE run = 'never'").fetchall() == [(0,)]
    con.close()


KILLED_JOB = textwrap.dedent("""
    import sys, time
    from featurestore.warehouse import Warehouse
    from datetime import datetime, timedelta, timezone
    wh = Warehouse(sys.argv[1])
    with wh.writer("killed job") as writer:
        writer.put("runs", [{"run": "ghost", "kind": "external", "created_at":
                             datetime.now(timezone.utc), "featurestore_version": "x"}])
        (writer.stage_dir("runs/ghost") / "weights").write_bytes(b"0" * 1000)
        print("ready", flush=True)
        time.sleep(60)
""")


def test_a_killed_job_leaves_nothing_visible_and_the_next_writer_cleans_up(warehouse_copy):
    before = snapshot(warehouse_copy)
    job = subprocess.Popen([sys.executable, "-c", KILLED_JOB, str(warehouse_copy)],
                           stdout=subprocess.PIPE, text=True)
    assert job.stdout.readline().strip() == "ready"
    # While it holds the lock, a second writer is refused with a clear message.
    with pytest.raises(WarehouseBusyError, match="killed job"):
        with Warehouse(warehouse_copy).writer("second"):
            pass
    os.kill(job.pid, signal.SIGKILL)
    job.wait()

    assert snapshot(warehouse_copy) == before
    con = connect(warehouse_copy)
    assert con.execute("SELECT count(*) FROM runs WHERE run = 'ghost'").fetchall() == [(0,)]
    con.close()
    assert any((warehouse_copy / "tmp").iterdir())  # the dead job's staging is still there
    with Warehouse(warehouse_copy).writer("next"):
        assert not any((warehouse_copy / "tmp").iterdir())


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    with wh.writer("first job"):
        with pytest.raises(WarehouseBusyError, match="warehouse busy.*first job"):
            with wh.writer("second job"):
                pass
    with wh.writer("third job"):  # the lock is released after the first job
        pass


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


def test_catalog_rebuild_restores_every_table(warehouse_copy):
    con = connect(warehouse_copy)
    before = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in table_specs()}
    con.close()
    (warehouse_copy / "featurestore.duckdb").unlink()
    with pytest.raises(NotFoundError, match="catalog rebuild"):
        connect(warehouse_copy)
    Warehouse(warehouse_copy).rebuild_catalog()
    con = connect(warehouse_copy)
    after = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in table_specs()}
    con.close()
    assert after == before
    assert before["activation_sets"]  # the comparison is not vacuous


def test_rebuild_refuses_a_folder_that_is_not_a_warehouse(tmp_path):
    (tmp_path / "wh" / "tables").mkdir(parents=True)
    with pytest.raises(SchemaVersionError, match="schema_version"):
        Warehouse(tmp_path / "wh").rebuild_catalog()


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


def test_the_catalog_file_opens_directly_in_duckdb(trained_warehouse, monkeypatch):
    # Someone using DuckDB itself, from the warehouse root, sees the same views.
    monkeypatch.chdir(trained_warehouse)
    con = duckdb.connect("featurestore.duckdb", read_only=True)
    try:
        (n,) = con.execute("SELECT count(*) FROM checkpoint_metrics").fetchall()[0]
    finally:
        con.close()
    assert n > 0


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


def test_live_files_are_plain_parquet(trained_warehouse):
    live = Warehouse(trained_warehouse).live_files()
    assert {"runs", "checkpoints", "activation_sets", "schema_version"} <= set(live)
    assert set(live) <= set(table_specs())
    for table, path in live.items():
        assert pq.read_metadata(trained_warehouse / path).num_rows >= 1, table


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
# Partitioned tables: one file per (basis, step) in tables/feature_activations/basis=B/step=S/


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
    parts = wh.manifest().partitions["feature_activations"]
    assert len(parts) == 6
    for key, path in parts.items():
        basis, step = json.loads(key)
        assert Path(path).parent == Path(f"tables/feature_activations/basis={basis}/step={step}")


def test_a_query_on_one_partition_opens_only_that_partitions_file(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    rows = activation_rows(1)
    with wh.writer("sweep") as writer:
        writer.put("feature_activations", rows)
    parts = wh.manifest().partitions["feature_activations"]
    con = connect(wh.root)
    # Every other partition's file is made unreadable; the first one of the view's list stays,
    # as DuckDB reads the first file's schema when it binds the view.
    first, target = sorted(parts)[0], json.dumps(["b", 10])
    for key, path in parts.items():
        if key not in (first, target):
            (wh.root / path).write_bytes(b"not a parquet file")
    got = con.execute(ACTIVATIONS.format("basis = ? AND step = ?"), ["b", 10]).fetchall()
    assert got == rows_where(rows, basis="b", step=10) and got
    got = con.execute(ACTIVATIONS.format("step = 10 AND basis = 'b' AND feature_id = 3"))
    assert got.fetchall() == rows_where(rows, basis="b", step=10, feature_id=3)
    with pytest.raises(duckdb.Error, match="basis=a/step=10"):  # a damaged file read is noticed
        con.execute(ACTIVATIONS.format("basis = 'a' AND step = 10")).fetchall()
    con.close()


def test_pruned_queries_match_numpy_and_the_unpruned_scan(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    rows = activation_rows(2)
    with wh.writer("sweep") as writer:
        writer.put("feature_activations", rows)
    files = ", ".join(f"'{wh.root / p}'" for p in wh.manifest().paths("feature_activations"))
    con = connect(wh.root)
    for where, equal in [("step = 20", {"step": 20}), ("basis = 'a'", {"basis": "a"}),
                         ("feature_id = 2", {"feature_id": 2}),
                         ("basis = 'a' AND step = 0 AND feature_id = 5",
                          {"basis": "a", "step": 0, "feature_id": 5})]:
        got = con.execute(ACTIVATIONS.format(where)).fetchall()
        plain = con.execute(f"SELECT * FROM read_parquet([{files}]) WHERE {where} ORDER BY ALL")
        assert got == rows_where(rows, **equal) == plain.fetchall(), where
    con.close()

    # A partition written again replaces its file; the rest stay; a rebuilt catalog agrees.
    again = activation_rows(3, bases=("a",), steps=(10,), n=7)
    with wh.writer("sweep again") as writer:
        writer.put("feature_activations", again)
    expected = rows_where(again) + [r for r in rows_where(rows) if r[:2] != ("a", 10)]
    assert query(wh.root, ACTIVATIONS.format("true")) == sorted(expected)
    assert query(wh.root, ACTIVATIONS.format("basis = 'a' AND step = 10")) == rows_where(again)
    wh.rebuild_catalog()
    assert query(wh.root, ACTIVATIONS.format("true")) == sorted(expected)


def test_flat_partition_files_of_an_older_warehouse_are_read_then_moved_into_folders(tmp_path):
    wh = Warehouse(tmp_path / "wh")
    rows = activation_rows(4)
    with wh.writer("sweep") as writer:
        writer.put("feature_activations", rows)
    # As featurestore wrote partitions before the folder layout: flat in tables/<table>/, with
    # the catalog's manifest naming them there.
    folder = wh.root / "tables" / "feature_activations"
    paths = wh.manifest().paths("feature_activations")
    catalog = duckdb.connect(str(wh.catalog_path))
    for path in paths:
        (wh.root / path).rename(folder / Path(path).name)
        catalog.execute("UPDATE _partitions SET path = ? WHERE path = ?",
                        [str(Path(path).parent.parent.parent / Path(path).name), path])
    catalog.close()
    shutil.rmtree(folder / "basis=a"), shutil.rmtree(folder / "basis=b")
    flat = sorted(wh.manifest().paths("feature_activations"))
    assert all(Path(p).parent == Path("tables/feature_activations") for p in flat)

    old_reader = connect(wh.root)
    assert old_reader.execute(ACTIVATIONS.format("step = 10")).fetchall() == rows_where(
        rows, step=10)
    with wh.writer("any later job") as writer:  # its commit moves the partitions
        writer.put("runs", [run_row("a")])
    live = wh.manifest()
    assert not live.legacy_partitions(table_specs()["feature_activations"])
    assert flat == sorted(live.retired)  # kept for readers of the older snapshot
    assert old_reader.execute(ACTIVATIONS.format("true")).fetchall() == rows_where(rows)
    old_reader.close()
    assert query(wh.root, ACTIVATIONS.format("basis = 'b'")) == rows_where(rows, basis="b")
    # The moved files are links to the same data, not copies.
    for path in live.paths("feature_activations"):
        assert (wh.root / path).stat().st_nlink == 2


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


def test_a_table_is_stored_in_its_declared_order_and_row_groups(tmp_path):
    # births declares sort_by (..., birth_step, feature_id) and 4096-row groups, so a step
    # window is read from the row groups whose birth_step min/max overlap it.
    births = table_specs()["births"]
    assert births.sort_by[-2:] == ("birth_step", "feature_id") and births.row_group_size == 4096
    wh = Warehouse(tmp_path / "wh")
    first, second = birth_rows(6, 5000), birth_rows(7, 3000, threshold=0.02)
    with wh.writer("births") as writer:
        writer.put("births", first)
    with wh.writer("more births") as writer:  # merged with the rows already there
        writer.put("births", second)
    stored = pq.ParquetFile(wh.root / wh.live_files()["births"])
    assert [stored.metadata.row_group(i).num_rows for i in range(stored.num_row_groups)] == [
        4096, 3904]
    table = stored.read()
    order = np.lexsort([table["feature_id"].to_numpy(),
                        table["birth_step"].fill_null(np.iinfo(np.int64).max).to_numpy(),
                        table["threshold"].to_numpy()])
    assert (order == np.arange(table.num_rows)).all()  # NULL birth steps last in each rule
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
