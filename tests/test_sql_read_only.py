"""`featurestore sql` is read-only in fact: statements that write, table functions that write and
files outside the warehouse's data folder are refused (exit 1, one line, the warehouse unchanged
to the byte), while every table, view, macro and UDF still reads; `--trusted` lifts it all."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.readonly_sql import open_read_only
from featurestore.warehouse import Warehouse

from .conftest import TINY_RUN, snapshot
from .postgres_server import PostgresUnavailable, locate_binaries, postgres_server


@pytest.fixture(scope="module")
def warehouse(analysed_warehouse, tmp_path_factory) -> Path:
    """A private copy of the analysed warehouse; every test checks it is still unchanged."""
    root = tmp_path_factory.mktemp("read_only") / "warehouse"
    shutil.copytree(analysed_warehouse, root)
    return root


@pytest.fixture(scope="module")
def original(warehouse) -> dict[str, bytes]:
    return snapshot(warehouse)


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder outside the warehouse with a text and a Parquet file in it."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.txt").write_text("not for the warehouse's readers")
    pq.write_table(pa.table({"a": [1, 2]}), folder / "rows.parquet")
    return folder


def sql(root: Path, query: str, *args: str, catalog: str | None = None):
    prefix = ["--warehouse", str(root)] + (["--catalog", catalog] if catalog else [])
    return CliRunner().invoke(cli, [*prefix, "sql", query, *args], catch_exceptions=False)


def data_file(root: Path) -> Path:
    """A live table file: one of the `runs` table's."""
    return Warehouse(root).data_files("runs")[0]


# Each attempt: a query (with {data}, {file}, {root} and {outside} filled in), and what the
# one-line refusal names.
ATTEMPTS = {
    "copy over a live data file": ("COPY (SELECT 1 AS x) TO '{file}' (FORMAT parquet)", "COPY"),
    "copy to a new file in data/": ("COPY (FROM runs) TO '{data}/main/runs/x.parquet'", "COPY"),
    "attach the catalog and delete": (
        "ATTACH '{root}/catalog.sqlite' AS c; DELETE FROM c.ducklake_snapshot", "ATTACH"),
    "attach the catalog as sqlite": ("ATTACH '{root}/catalog.sqlite' AS c (TYPE sqlite)",
                                     "ATTACH"),
    "install": ("INSTALL httpfs", "LOAD"),
    "load": ("LOAD httpfs", "LOAD"),
    "turn external access on": ("SET enable_external_access = true", "SET"),
    "unlock the configuration": ("SET lock_configuration = false", "SET"),
    "reset the lock": ("RESET lock_configuration", "SET"),
    "read a system file": ("SELECT * FROM read_text('/etc/hostname')", "data folder"),
    "read a file outside data/": ("SELECT * FROM read_text('{outside}/secret.txt')",
                                  "data folder"),
    "read Parquet outside data/": ("SELECT * FROM read_parquet('{outside}/*.parquet')",
                                   "data folder"),
    "glob the warehouse root": ("SELECT * FROM glob('{root}/*')", "data folder"),
    "read csv outside data/": ("SELECT * FROM read_csv('/etc/passwd')", "data folder"),
    "create a table": ("CREATE TABLE t AS SELECT 1", "CREATE"),
    "insert into a view": ("INSERT INTO runs SELECT * FROM runs", "INSERT"),
    "delete from a table": ("DELETE FROM checkpoints", "DELETE"),
    "call expire snapshots": ("CALL ducklake_expire_snapshots('lake', older_than => now())",
                              "CALL"),
    "cleanup old files in a select": (
        "SELECT * FROM ducklake_cleanup_old_files('lake', cleanup_all => true)",
        "ducklake_cleanup_old_files()"),
    "add data files": ("FROM ducklake_add_data_files('lake', 'runs', '{file}')",
                       "ducklake_add_data_files()"),
    "merge adjacent files in a subquery": (
        "SELECT count(*) FROM (FROM ducklake_merge_adjacent_files('lake'))",
        "ducklake_merge_adjacent_files()"),
    "set a lake option": ("FROM lake.set_option('parquet_compression', 'gzip')", "set_option()"),
    "sqlite_query on the catalog": (
        "FROM sqlite_query('__ducklake_metadata_lake', 'DELETE FROM ducklake_snapshot')",
        "sqlite_query()"),
    "logging to a file in data/": (
        "FROM enable_logging(storage => 'file', storage_path => '{data}')", "enable_logging()"),
    "a copy after a query": ("SELECT 1; COPY (SELECT 1) TO '{data}/x.csv'", "statement 2"),
    "a copy after a comment": ("/* only a SELECT */ -- SELECT 1\n COPY (SELECT 1) TO '{file}'",
                               "COPY"),
    "explain analyze of a copy": ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{data}/x.csv'",
                                  "EXPLAIN"),
    "export the database": ("EXPORT DATABASE '{data}/export'", "EXPORT"),
    "a writing pragma": ("PRAGMA enable_profiling", "PRAGMA"),
    "a checkpoint": ("CHECKPOINT", "CALL"),
}


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=list(ATTEMPTS))
def test_a_statement_that_would_write_or_escape_is_refused(attempt, warehouse, original,
                                                           outside, fault_tally):
    template, named = ATTEMPTS[attempt]
    query = template.format(file=data_file(warehouse), data=warehouse / "data",
                            root=warehouse, outside=outside)
    result = sql(warehouse, query)
    fault_tally.record_cli("sql write attempt", result,
                           mixed_state=snapshot(warehouse) != original)
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert message.startswith("Error: read-only SQL") and "\n" not in message, message
    assert named in message and "--trusted" in message
    assert "Traceback" not in result.output
    assert snapshot(warehouse) == original
    assert not (warehouse / "data" / "x.csv").exists() and not (warehouse / "c").exists()


def test_every_table_view_macro_and_udf_still_reads(warehouse, original):
    def rows(query: str, *args: str) -> list[dict]:
        result = sql(warehouse, query, "--format", "json", *args)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    con = Warehouse(warehouse).connect()
    views = [v for (v,) in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'"
    ).fetchall()]
    con.close()
    for view in views:  # every table (a view over the lake) and every view of sql/views
        assert rows(f"SELECT count(*) AS n FROM {view}")[0]["n"] >= 0
    assert rows("SELECT run FROM run_summary") == [{"run": TINY_RUN}]
    steps = [r["step"] for r in rows("SELECT DISTINCT step FROM trajectories "
                                     "WHERE basis = 'tiny-l2' ORDER BY step")]
    compare = rows(f"SELECT count(*) AS n FROM feature_compare('tiny-l2', {steps[0]}, "
                   f"{steps[-1]})")
    births = rows("SELECT count(*) AS n FROM feature_births('tiny-l2', 'activation_rate', "
                  "0.05, 1, 0.1, 0.9)")
    assert compare[0]["n"] > 0 and births[0]["n"] > 0
    assert rows("SELECT stage_layer('layer_2_post_mlp') AS layer") == [{"layer": 2}]
    assert rows("SELECT example_context(NULL, [5, 6, 7], 11, 10) AS c") == [{"c": "5 ⟦6⟧ 7"}]
    path = rows("SELECT fs_path(path) AS p FROM bases WHERE name = 'tiny-l2'")[0]["p"]
    assert Path(path).is_dir() and Path(path).is_relative_to(warehouse)
    # DuckDB's own read statements, DuckLake's snapshot list and the table files under data/
    assert rows("DESCRIBE runs")[0]["column_name"] == "run"
    assert {"runs", "run_summary"} <= {r["name"] for r in rows("SHOW TABLES")}
    assert rows("SUMMARIZE runs")
    assert rows("PRAGMA table_info('runs')")[0]["name"] == "run"
    assert rows("EXPLAIN SELECT * FROM runs")
    assert rows("SELECT count(*) AS n FROM lake.snapshots()")[0]["n"] > 1
    assert rows(f"SELECT count(*) AS n FROM read_parquet('{data_file(warehouse)}')")[0]["n"] >= 1
    assert rows("SELECT 1 AS a; SELECT 2 AS b") == [{"b": 2}]
    assert snapshot(warehouse) == original


def test_as_of_reads_an_older_snapshot(warehouse):
    first = min(s.snapshot_id for s in Warehouse(warehouse).snapshots())
    result = sql(warehouse, "SELECT count(*) AS n FROM bases", "--as-of", str(first + 1),
                 "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"n": 0}]  # the first jobs trained and collected


def test_trusted_is_full_duckdb(warehouse, outside, tmp_path):
    text = sql(warehouse, f"SELECT content FROM read_text('{outside}/secret.txt')", "--trusted",
               "--format", "json")
    assert text.exit_code == 0, text.output
    assert json.loads(text.output) == [{"content": "not for the warehouse's readers"}]
    copy = sql(warehouse, f"COPY (SELECT run FROM runs) TO '{tmp_path}/runs.csv'", "--trusted")
    assert copy.exit_code == 0 and (tmp_path / "runs.csv").read_text() == f"run\n{TINY_RUN}\n"
    assert "--trusted" in CliRunner().invoke(cli, ["sql", "--help"]).output


def test_the_python_api_is_read_only_too(warehouse, original):
    from featurestore.errors import QueryRefusedError

    with open_read_only(warehouse) as session:
        assert session.query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 1}]
        with pytest.raises(QueryRefusedError, match="COPY"):
            session.query(f"COPY runs TO '{data_file(warehouse)}'")
        # the connection stays locked after a refusal, for the next query of a long session
        with pytest.raises(QueryRefusedError, match="data folder"):
            session.query("SELECT * FROM read_text('/etc/hostname')")
    assert snapshot(warehouse) == original


def test_a_postgres_catalog_is_read_only_too(tmp_path, monkeypatch):
    try:
        bindir = locate_binaries()
    except PostgresUnavailable as why:
        pytest.skip(str(why))
    with postgres_server(bindir) as server:
        database = server.create_database()
        catalog = server.catalog(database)
        # `--catalog` sets the variable for the process; this puts it back after the test.
        monkeypatch.setenv("FEATURESTORE_CATALOG", catalog)
        root = tmp_path / "warehouse"
        with Warehouse(root, catalog=catalog).writer("runs") as writer:
            writer.put("runs", [{"run": "pg", "kind": "pretrain", "model_family": "demo",
                                 "seed": 0, "steps": 1, "d_model": 8, "n_layers": 1,
                                 "featurestore_version": "test",
                                 "created_at": datetime.now(timezone.utc)}])
        files = snapshot(root)
        snapshots = server.query(database, "SELECT count(*) FROM ducklake_snapshot")
        file = Warehouse(root, catalog=catalog).data_files("runs")[0]

        result = sql(root, "SELECT run FROM runs", "--format", "json", catalog=catalog)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == [{"run": "pg"}]
        for query, named in [
            (f"COPY (SELECT 1) TO '{file}' (FORMAT parquet)", "COPY"),
            ("FROM postgres_execute('__ducklake_metadata_lake', 'DELETE FROM ducklake_snapshot')",
             "postgres_execute()"),
            ("FROM postgres_query('__ducklake_metadata_lake', 'SELECT 1')", "postgres_query()"),
            (f"ATTACH '{catalog}' AS pg (TYPE postgres)", "ATTACH"),
            ("SELECT * FROM read_text('/etc/hostname')", "data folder"),
        ]:
            refused = sql(root, query, catalog=catalog)
            assert refused.exit_code == 1 and named in refused.output, refused.output
            assert refused.output.count("\n") == 1
        assert snapshot(root) == files
        assert server.query(database, "SELECT count(*) FROM ducklake_snapshot") == snapshots
