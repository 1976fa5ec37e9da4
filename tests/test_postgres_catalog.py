"""Warehouses whose DuckLake catalog is in PostgreSQL: a real server (tests/postgres_server.py),
real writer processes committing at once, and the rows read back.

Where two commits must overlap, the test makes them: a psql session holds a PostgreSQL lock
(or an uncommitted table) that both writers need, waits until both are blocked on it, and then
lets them go, so the outcome does not depend on how the processes happen to be scheduled.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest

from featurestore.lake import load_extensions
from featurestore.warehouse import Warehouse, connect, init_warehouse
from featurestore.writer import COMMIT_TOKENS

from .postgres_server import PostgresServer, PostgresUnavailable, locate_binaries, postgres_server

REPO = Path(__file__).resolve().parents[1]
# A writer process: commits the jobs of a plan (see write_jobs) and exits.
WRITER = "import json, sys; from tests.test_postgres_catalog import write_jobs; " \
         "write_jobs(json.loads(sys.argv[1]))"
WAIT_SECONDS = 60  # for writers to block on a held lock, or to finish
EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="session")
def postgres_catalog() -> Iterator[PostgresServer]:
    """The PostgreSQL server of this module's catalogs; each test makes its own database."""
    try:
        bindir = locate_binaries()
    except PostgresUnavailable as why:
        pytest.skip(str(why))
    with postgres_server(bindir) as server:
        yield server


# -- rows: full rows, the same whichever process builds them ---------------------------------


def runs_row(run: str, writer: int) -> dict:
    """A `runs` row whose every value says which writer wrote it."""
    return {"run": run, "kind": "pretrain", "model_family": "demo", "parent_run": None,
            "parent_step": None, "seed": writer, "steps": 100 * writer, "d_model": 8 * writer,
            "n_layers": writer, "model_config": json.dumps({"writer": writer}),
            "task_config": None, "train_config": json.dumps({"lr": 0.001 * writer}),
            "tokenizer": None, "featurestore_version": f"writer-{writer}",
            "created_at": EPOCH + timedelta(seconds=writer)}


def trajectory_row(basis: str, feature_id: int, step: int) -> dict:
    """A `trajectories` row whose values follow from its key."""
    rate = (feature_id + 1) / (step + 10)
    return {"basis": basis, "feature_id": feature_id, "step": step, "n_tokens": 1000 + step,
            "activation_rate": rate, "mean_activation": rate / 2,
            "mean_active_activation": None if feature_id == 0 else 0.5,
            "max_activation": float(feature_id + step), "energy": rate / 4,
            "split_activation_rates": {"induction": rate, "modular": rate / 3},
            "direction_cosine_previous": None, "direction_cosine_final": 1.0,
            "decoder_norm": None}


ROWS = {"runs": runs_row, "trajectories": trajectory_row}


def write_jobs(plan: dict) -> None:
    """In a writer process: one commit per job of `plan` ({"root", "catalog", "table", "jobs":
    [[job name, [row arguments, ...]], ...]}), in order."""
    wh = Warehouse(plan["root"], catalog=plan["catalog"])
    build = ROWS[plan["table"]]
    for job, arguments in plan["jobs"]:
        with wh.writer(job) as writer:
            writer.put(plan["table"], [build(*a) for a in arguments])


def start_writer(root: Path, catalog: str, table: str, jobs: list) -> subprocess.Popen:
    plan = {"root": str(root), "catalog": catalog, "table": table, "jobs": jobs}
    return subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(plan)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(writers: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit status, output) of each writer, once all have exited."""
    return [(w.wait(timeout=WAIT_SECONDS), w.stdout.read()) for w in writers]


def wait_until_blocked(server: PostgresServer, database: str, writers: list[subprocess.Popen],
                       ungranted_locks: int) -> None:
    """Until the writers wait on `ungranted_locks` PostgreSQL locks (each blocked on what the
    test's transaction holds); a writer that exits first fails the test with its output."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        exited = [w for w in writers if w.poll() is not None]
        assert not exited, f"a writer exited before blocking: {finish(exited)}"
        (waiting,) = server.query(database, "SELECT count(*) FROM pg_locks WHERE NOT granted")
        if int(waiting) == ungranted_locks:
            return
        time.sleep(0.05)
    raise AssertionError(f"the writers did not block on the held lock in {WAIT_SECONDS} s")


def read(root: Path, catalog: str, sql: str) -> list[tuple]:
    con = connect(root, catalog=catalog)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def rows_at_each_snapshot(root: Path, catalog: str, table: str,
                          key: str) -> dict[int, list[tuple]]:
    """snapshot id -> the table's keys (sorted) at that snapshot, read by DuckLake itself (time
    travel on a bare ATTACH), for every snapshot that has the table."""
    con = duckdb.connect(":memory:")
    try:
        load_extensions(con, "postgres")
        con.execute(f"ATTACH 'ducklake:{catalog}' AS lake (DATA_PATH '{root / 'data'}/', "
                    "READ_ONLY)")
        snapshots = [s for (s,) in con.execute("SELECT snapshot_id FROM lake.snapshots() "
                                               "ORDER BY snapshot_id").fetchall()]
        keys = {}
        for snapshot in snapshots:
            try:
                keys[snapshot] = con.execute(f"SELECT {key} FROM lake.{table} AT (VERSION => "
                                             f"{snapshot}) ORDER BY ALL").fetchall()
            except duckdb.CatalogException:
                continue  # the snapshot before the first commit created the table
        return keys
    finally:
        con.close()


def new_warehouse(server: PostgresServer, tmp_path: Path) -> tuple[Path, str, str]:
    """A new PostgreSQL database and a warehouse root: (root, database, catalog string)."""
    database = server.create_database()
    return tmp_path / "warehouse", database, server.catalog(database)


# -- tests --------------------------------------------------------------------------------------


def test_a_warehouse_with_its_catalog_in_postgres(postgres_catalog, tmp_path, monkeypatch):
    root, database, catalog = new_warehouse(postgres_catalog, tmp_path)
    wh = Warehouse(root, catalog=catalog)
    with wh.writer("write-runs") as writer:
        writer.put("runs", [runs_row("a", 1), runs_row("b", 1)])
    with wh.writer("replace-a") as writer:
        writer.put("runs", [runs_row("a", 2)])

    # Read through the URI form of the same database: the rows of both jobs, "a" replaced.
    con = connect(root, catalog=postgres_catalog.catalog_uri(database))
    try:
        cursor = con.execute("SELECT * FROM runs ORDER BY run")
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    finally:
        con.close()
    assert rows == [runs_row("a", 2), runs_row("b", 1)]
    # And through $FEATURESTORE_CATALOG, which --catalog defaults to.
    monkeypatch.setenv("FEATURESTORE_CATALOG", catalog)
    assert read(root, None, "SELECT run, seed FROM runs ORDER BY run") == [("a", 2), ("b", 1)]

    # The catalog is PostgreSQL's: no SQLite file anywhere, DuckLake's tables in the database.
    assert not [p for p in root.rglob("*") if p.name.startswith("catalog.sqlite")]
    assert sorted(p.parent.name for p in (root / "data").rglob("*.parquet")
                  if p.parent.name != COMMIT_TOKENS) == [
        "runs", "runs", "runs", "schema_version"]  # 2 inserts, 1 deletion file, the version
    snapshots = wh.snapshots()
    assert [s.job for s in snapshots] == ["replace-a", "write-runs", None]  # None: DuckLake's own
    assert snapshots[0].changes == {"tables_inserted_into": ["runs"],
                                    "tables_deleted_from": ["runs"]}
    stored = postgres_catalog.query(database, "SELECT snapshot_id, commit_message FROM "
                                              "ducklake_snapshot_changes ORDER BY snapshot_id")
    assert stored == [f"{s.snapshot_id}|{s.job or ''}" for s in reversed(snapshots)]


def test_an_empty_postgres_database_is_a_new_warehouse(postgres_catalog, tmp_path):
    root, _, catalog = new_warehouse(postgres_catalog, tmp_path)
    wh = Warehouse(root, catalog=catalog)
    with wh.writer("register") as writer:  # a first job that looks at the warehouse first
        con = wh.connect()
        assert con.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]
        con.close()
        writer.put("runs", [runs_row("a", 1)])
    root, _, catalog = new_warehouse(postgres_catalog, tmp_path / "init")
    assert init_warehouse(root, catalog=catalog).created


def test_two_writer_processes_commit_different_rows(postgres_catalog, tmp_path):
    """Two processes, eight jobs each, every job a commit of four trajectory rows (one step): each
    job is one snapshot, and every snapshot holds exactly the rows of the jobs committed up to
    it, so no commit lost another's rows and none wrote twice."""
    root, _, catalog = new_warehouse(postgres_catalog, tmp_path)
    init_warehouse_by_a_job(root, catalog)
    features = range(4)
    plans = {f"w{writer}-{i}": [("shared", f, 100 * writer + i) for f in features]
             for writer in (1, 2) for i in range(8)}
    writers = [start_writer(root, catalog, "trajectories",
                            [[job, rows] for job, rows in plans.items() if job.startswith(w)])
               for w in ("w1-", "w2-")]
    for status, output in finish(writers):
        assert status == 0, output

    committed = {s.job: s.snapshot_id for s in Warehouse(root, catalog=catalog).snapshots()
                 if s.job in plans}
    assert sorted(committed) == sorted(plans)  # one snapshot per job
    keys = rows_at_each_snapshot(root, catalog, "trajectories", "basis, feature_id, step")
    for job, snapshot in committed.items():
        expected = sorted(tuple(row) for j, s in committed.items() if s <= snapshot
                          for row in plans[j])
        assert keys[snapshot] == expected, f"snapshot {snapshot} ({job})"

    union = sorted(tuple(row) for rows in plans.values() for row in rows)
    assert len(union) == 2 * 8 * 4
    rows = read(root, catalog, "SELECT * FROM trajectories ORDER BY basis, feature_id, step")
    assert rows == [tuple(trajectory_row(*key).values()) for key in union]


def init_warehouse_by_a_job(root: Path, catalog: str) -> None:
    """The warehouse's first commit, made before the writers race (what `featurestore init`
    does; init_warehouse itself fails on a new PostgreSQL catalog, see the xfail above)."""
    with Warehouse(root, catalog=catalog).writer("init"):
        pass


def race_same_rows(server: PostgresServer, root: Path, database: str,
                   runs: list[str]) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """Writers 1 and 2 each commit `runs` (rows that say which writer wrote them) in one job,
    both from the same starting snapshot: a transaction holds DuckLake's snapshot table locked
    against new snapshots until both writers have done their work and wait to commit. Returns
    each writer's (exit status, output) and which snapshot each job made."""
    catalog = server.catalog(database)
    with server.transaction(database, "LOCK TABLE ducklake_snapshot IN EXCLUSIVE MODE"):
        writers = [start_writer(root, catalog, "runs", [[f"w{w}", [[r, w] for r in runs]]])
                   for w in (1, 2)]
        wait_until_blocked(server, database, writers, ungranted_locks=2)
    results = finish(writers)
    jobs = {s.job: s.snapshot_id for s in Warehouse(root, catalog=catalog).snapshots()}
    return results, jobs


@pytest.mark.parametrize("rows_exist", [True, False], ids=["existing-rows", "new-rows"])
def test_the_last_writer_of_the_same_rows_wins(postgres_catalog, tmp_path, rows_exist):
    """Both writers write the same rows at once, replacing rows already there or new ones:
    their commit tokens conflict in DuckLake, the later commit is run again from the start, and
    its rows replace the first's (without the tokens, two inserts of new rows both commit and
    every key is stored twice)."""
    root, database, catalog = new_warehouse(postgres_catalog, tmp_path)
    runs = ["r0", "r1", "r2"]
    if rows_exist:
        with Warehouse(root, catalog=catalog).writer("first") as writer:
            writer.put("runs", [runs_row(r, 0) for r in runs])
    else:
        init_warehouse_by_a_job(root, catalog)
    results, jobs = race_same_rows(postgres_catalog, root, database, runs)
    for status, output in results:
        assert status == 0, output
    last = 1 if jobs["w1"] > jobs["w2"] else 2
    rows = read(root, catalog, "SELECT run, seed FROM runs ORDER BY run")
    assert [run for run, _ in rows] == runs  # each once
    assert rows == [(r, last) for r in runs]


def test_two_first_jobs_create_the_catalog_once(postgres_catalog, tmp_path):
    """Both writers find the database empty and create DuckLake's tables at once (held back by
    a transaction that creates the first of them and is rolled back once both wait on it): one
    creates them, the other's CREATE TABLE fails on PostgreSQL's unique type names, and its
    ATTACH is tried again, now finding the catalog."""
    root, database, catalog = new_warehouse(postgres_catalog, tmp_path)
    with postgres_catalog.transaction(database, "CREATE TABLE ducklake_metadata (key VARCHAR)"):
        writers = [start_writer(root, catalog, "runs", [[f"w{w}", [[f"r{w}", w]]]])
                   for w in (1, 2)]
        wait_until_blocked(postgres_catalog, database, writers, ungranted_locks=2)
    for status, output in finish(writers):
        assert status == 0, output
    assert read(root, catalog, "SELECT run, seed FROM runs ORDER BY run") == [("r1", 1),
                                                                                ("r2", 2)]
