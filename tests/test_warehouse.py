"""The warehouse: Parquet + catalog round trips, atomic writes, the writer lock, the schema."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from featurestore.errors import (
    FeaturestoreError,
    NotFoundError,
    SchemaVersionError,
    WarehouseBusyError,
)
from featurestore.warehouse import Warehouse, connect, describe_table, table_specs

from .conftest import snapshot

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
