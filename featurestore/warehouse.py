"""The warehouse: a DuckLake of Parquet files, its catalog in SQLite (default) or PostgreSQL.

On disk (see warehouse/README.md for the full layout)::

    <root>/catalog.sqlite                  the DuckLake catalog: tables, snapshots, file lists
    <root>/data/main/<table>/...parquet    table rows, written and tracked by DuckLake
    <root>/runs/<run>@<version>/           checkpoints of a run trained here
    <root>/activations/.../<set>@<version> activation sets
    <root>/bases/<basis>@<version>/        dictionary weights
    <root>/tmp/                            scratch of running jobs; never read by queries

Every job is one DuckLake snapshot: its table writes commit in one transaction whose commit
message names the job and its arguments. Artefacts that are not tables (checkpoints, activation
sets, dictionary weights) are written to folders with a new, never reused version in their name
before the commit, and the rows that point at them are part of the commit: a job killed at any
point leaves either the old rows (pointing at the old folders) or the new ones, never a mix.
Nothing is renamed or deleted in place; replaced files and folders stay readable at older
snapshots until `featurestore compact` expires those snapshots.

Writers do not lock each other out: several jobs (processes, machines) run at once and each
commits when it is done. Commits that race are retried by DuckLake, or here as a whole
transaction when the catalog reports the race as a lock, so the last one to commit wins.

Readers never hold a lock either: `connect()` pins the snapshot that was current when it was
opened (or an older one, `as_of`), so a notebook sees one consistent warehouse.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import re
import shutil
import socket
import sqlite3
import sys
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cache
from importlib import resources
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurestore.errors import (
    DamagedCatalogError,
    FeaturestoreError,
    NotFoundError,
    SchemaVersionError,
    WarehouseBusyError,
)
from featurestore.lake import (
    DATA_FOLDER,
    LAKE,
    LAKE_OPTIONS,
    CatalogLocation,
    attach_sql,
    catalog_location,
    lake_connection,
    prepare_sqlite,
    sqlite_catalog_damage,
    sqlite_has_ducklake,
)
from featurestore.scratch import TRAINING_FOLDER, Claim, newest_mtime, remove_tree, sweep
from featurestore.settings import check_name, resolve_warehouse

SCHEMA_VERSION = 3
BACKUP_SUFFIX = ".backup"
KNOWN_SCHEMA_VERSIONS = frozenset({3})
# The catalog of schema 2: a manifest of Parquet files in one DuckDB file (see migrate.py).
LEGACY_CATALOG = "featurestore.duckdb"
# Rows of every file are sorted (by the table's sort_by columns, else its key) and written in
# row groups this size unless the table declares its own, so a filter on a leading sort column
# decompresses only the groups whose min/max cover it. Smaller groups cost more footer to parse
# per query than they save, except in tables of a few thousand rows per question (diffs).
ROW_GROUP = LAKE_OPTIONS["parquet_row_group_size"]
PARTITION_KEY_METADATA = b"featurestore.partition"
# A commit that loses a race is tried again, as a whole, up to this many times, waiting a random
# time that grows each round (the catalog serialises commits; jitter keeps racers apart).
COMMIT_ATTEMPTS = 40
COMMIT_WAIT_SECONDS = (0.02, 1.0)
# Errors of a commit that lost a race (SQLite: the catalog was written since this transaction
# began; DuckLake: conflicting snapshots, or its own retries used up).
_RACE_MESSAGES = ("database is locked", "conflict", "duplicate key", "retry", "busy",
                  "could not serialize")
# One row per table, replaced by every commit that writes the table. DuckLake sees two commits
# that insert rows into one table as compatible, even when the rows have the same key (neither
# delete found the other's rows, which were not committed yet); two commits that delete the same
# row conflict. So each commit also replaces its tables' token rows: of two concurrent commits
# to a table, the second is refused and run again, and its deletes then see the first one's rows.
COMMIT_TOKENS = "featurestore_commit_tokens"
# The version part of an artefact folder's name: <name>@20261206T203628-1a2b3c
VERSION_SUFFIX = re.compile(r"@\d{8}T\d{6}-[0-9a-f]{6}$")
# What the CLI records of its own command line in each snapshot (set by featurestore.cli).
COMMAND_LINE: list[str] | None = None
# Scratch of a killed job from a featurestore that did not lock its scratch (featurestore.scratch)
# is deleted by the next writer once this old; a job still running holds its lock.
LOCKLESS_SCRATCH_AGE = timedelta(days=1)
# The jobs this process committed, in order: what the CLI reports as kept when a later step fails.
_committed_jobs: list[str] = []


def committed_jobs() -> list[str]:
    """The jobs this process has committed so far, oldest first."""
    return list(_committed_jobs)


# ---------------------------------------------------------------------------------------------
# Table definitions, read from sql/tables/*.sql


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool
    comment: str
    # SQL expression of the DDL's DEFAULT: what files written before the column existed hold
    default: str | None = None

    def select(self, present: bool) -> str:
        """The view's expression for this column, from a file that has it or not."""
        value = self.name if present else (self.default or "NULL")
        return f"CAST({value} AS {self.type}) AS {self.name}"


@dataclass(frozen=True)
class TableSpec:
    """One warehouse table as its DDL file declares it."""

    name: str
    comment: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # the PRIMARY KEY: a write replaces existing rows with the same key
    arrow_schema: pa.Schema
    # Large tables declare `-- partition_by: a, b` (one file per value of those columns, which a
    # write replaces whole); any table may declare `-- sort_by: c, d`, the order of rows in its
    # files (default: its key), chosen for the filters its questions use.
    partition_by: tuple[str, ...] = ()
    sort_by: tuple[str, ...] = ()

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


def sql_text(kind: str) -> list[tuple[str, str]]:
    """(name, text) of every .sql file in sql/<kind>/, in name order."""
    folder = resources.files("featurestore.sql").joinpath(kind)
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


@cache
def load_query(name: str) -> str:
    """The text of sql/<name>.sql, e.g. load_query("report/fit_quality"): one query, its leading
    comment saying what it returns, its parameters written $name (DuckDB's named parameters)."""
    file = resources.files("featurestore.sql").joinpath(*f"{name}.sql".split("/"))
    if not file.is_file():
        raise NotFoundError(f"no query file sql/{name}.sql")
    return file.read_text()


@cache
def table_specs() -> dict[str, TableSpec]:
    """Parse the table DDL by running it in a scratch DuckDB, so SQL stays the one definition."""
    scratch = duckdb.connect(":memory:")
    try:
        specs = {}
        for name, ddl in sql_text("tables"):
            scratch.execute(ddl)
            comment = scratch.execute(
                "SELECT comment FROM duckdb_tables() WHERE table_name = ?", [name]
            ).fetchall()
            if not comment:
                raise RuntimeError(f"sql/tables/{name}.sql must create a table named {name}")
            columns = tuple(
                Column(n, t, nullable, c or "", default)
                for n, t, nullable, c, default in scratch.execute(
                    "SELECT column_name, data_type, is_nullable, comment, column_default "
                    "FROM duckdb_columns() "
                    "WHERE table_name = ? ORDER BY column_index",
                    [name],
                ).fetchall()
            )
            key = scratch.execute(
                "SELECT constraint_column_names FROM duckdb_constraints() "
                "WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'",
                [name],
            ).fetchall()
            schema = scratch.sql(f"SELECT * FROM {name}").to_arrow_table().schema
            # DuckDB's JSON type arrives as a string extension type; store plain strings.
            schema = pa.schema(
                [pa.field(f.name, pa.string()) if _is_json(c) else f
                 for f, c in zip(schema, columns)]
            )
            specs[name] = TableSpec(name, comment[0][0] or "", columns,
                                    tuple(key[0][0]) if key else (), schema,
                                    _declared(ddl, "partition_by"), _declared(ddl, "sort_by"))
        return specs
    finally:
        scratch.close()


def _declared(ddl: str, directive: str) -> tuple[str, ...]:
    """Column names from a `-- directive: a, b` line of a DDL file."""
    for line in ddl.splitlines():
        if line.startswith(f"-- {directive}:"):
            return tuple(c.strip() for c in line.split(":", 1)[1].split(","))
    return ()


def partition_key(table: TableSpec, values: dict | tuple) -> str:
    """One partition's column values as JSON, e.g. ["demo-l2", 100]: stored in its file's
    metadata, and checked when a job hands the file over (adopt_partition)."""
    if isinstance(values, dict):
        values = tuple(values[c] for c in table.partition_by)
    return json.dumps([v.item() if hasattr(v, "item") else v for v in values])


def partition_folder(table: TableSpec, key: str) -> str:
    """The folder of one partition under the table's data folder, one level per partition
    column (basis=demo-l2/step=100): the layout DuckLake itself writes partitioned tables in,
    from which it records the file's partition values."""
    return "/".join(f"{c}={v}" for c, v in zip(table.partition_by, json.loads(key)))


def _is_json(column: Column) -> bool:
    return column.type == "JSON"


# Where a row names a basis other than its own `basis`: lineage_edges keeps the --upstream basis
# of its feature -> feature edges in its pruning settings.
UPSTREAM_BASIS = {"lineage_edges": "json_extract_string(pruning, '$.upstream')"}


def derived_from_basis(basis: str) -> list[tuple[str, dict]]:
    """(table, replace_where) of every row a job computed from the weights of `basis`: rows of
    every table with a `basis` column but the fit's own, and rows that read it as their
    upstream basis. A new fit under the name makes them describe other weights: it puts
    `writer.put(table, [], replace_where=where)` for each, in its own commit."""
    own = {"features", "decoder_directions", "training_metrics"}
    derived = [(name, {"basis": basis}) for name, table in sorted(table_specs().items())
               if "basis" in {c.name for c in table.columns} and name not in own]
    return derived + [(table, {column: basis}) for table, column in UPSTREAM_BASIS.items()]


def bases_computed_from(con: duckdb.DuckDBPyConnection, run: str,
                        steps: list[int] | None = None) -> list[str]:
    """Bases fitted on checkpoints of `run` (any, or those of `steps`), through their activation
    sets or read from the models: shared bases of the run, crosscoders with a source in it."""
    steps_filter = "" if steps is None else " AND list_contains(?::BIGINT[], s.step)"
    params = [run] if steps is None else [run, steps]
    return [name for (name,) in con.execute(
        "SELECT name FROM bases WHERE len(list_filter(sources, lambda s: s.run = ?"
        f"{steps_filter})) > 0 ORDER BY name", params).fetchall()]


def drop_basis(writer: Writer, basis: str) -> None:
    """In the writer's commit: the basis's row, its features, directions and training metrics,
    and every row computed from its weights."""
    writer.put("bases", [], replace_where={"name": basis})
    for table in ("features", "decoder_directions", "training_metrics"):
        writer.put(table, [], replace_where={"basis": basis})
    for table, where in derived_from_basis(basis):
        writer.put(table, [], replace_where=where)


def drop_run_outputs(wh: Warehouse, writer: Writer, run: str) -> None:
    """In the writer's commit, for a run being trained again under its name: its activation sets
    and every basis fitted on them (with their rows), which describe weights that are gone."""
    writer.put("activation_sets", [], replace_where={"run": run})
    con = wh.connect()  # inside the writer: an empty warehouse if there is none yet
    try:
        stale = bases_computed_from(con, run)
    finally:
        con.close()
    for basis in stale:
        drop_basis(writer, basis)


def spec(table: str) -> TableSpec:
    specs = table_specs()
    if table not in specs:
        raise NotFoundError(f"unknown table {table!r}; tables are: {', '.join(sorted(specs))}")
    return specs[table]



# ---------------------------------------------------------------------------------------------
# Reading: views over the lake's tables, then sql/views and sql/macros


def build_views(con: duckdb.DuckDBPyConnection, snapshot: int | None) -> None:
    """Create a view per table in the connection's own schema, reading the lake at `snapshot`
    (None: an empty view of the DDL's columns, for a warehouse with no catalog yet), with the
    DDL's comments; then the macros and views of sql/."""
    try:  # one transaction: DuckLake reads its catalog once for every view, not once per view
        con.execute("BEGIN TRANSACTION")
        for table in table_specs().values():  # the lake tables as the DDL declares them
            con.execute(_table_view_sql(table, snapshot, {c.name for c in table.columns}))
        con.execute("COMMIT")
    except duckdb.Error:  # written by an older featurestore, or an older snapshot: per table
        _rollback(con)
        for table in table_specs().values():
            present = _columns_at(con, table.name, snapshot) if snapshot is not None else None
            con.execute(_table_view_sql(table, snapshot, present))
    for table in table_specs().values():
        con.execute(f"COMMENT ON VIEW {table.name} IS {_sql_string(table.comment)}")
        for c in table.columns:
            con.execute(f"COMMENT ON COLUMN {table.name}.{c.name} IS {_sql_string(c.comment)}")
    for _, text in sql_text("macros"):
        con.execute(text)
    for _, text in views_in_order():
        con.execute(text)


def views_in_order() -> list[tuple[str, str]]:
    """sql/views in an order that creates each view after those it reads: a view that reads
    another names it on a `-- depends_on: name` line."""
    from graphlib import TopologicalSorter

    views = dict(sql_text("views"))
    needs = {name: _declared(text, "depends_on") for name, text in views.items()}
    unknown = sorted({n for names in needs.values() for n in names} - set(views))
    if unknown:
        raise ValueError(f"sql/views: depends_on names no view {', '.join(unknown)}")
    return [(name, views[name]) for name in TopologicalSorter(needs).static_order()]


def _lake_columns(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
    rows = con.execute("SELECT table_name, column_name FROM duckdb_columns() "
                       "WHERE database_name = ? AND schema_name = 'main'", [LAKE]).fetchall()
    columns: dict[str, set[str]] = {}
    for table, column in rows:
        columns.setdefault(table, set()).add(column)
    return columns


def _columns_at(con: duckdb.DuckDBPyConnection, table: str, snapshot: int) -> set[str] | None:
    """The lake table's columns at `snapshot`; None if it did not exist then."""
    try:
        cursor = con.execute(f"SELECT * FROM {LAKE}.{table} AT (VERSION => {int(snapshot)}) "
                             "LIMIT 0")
    except duckdb.Error:
        return None
    return {d[0] for d in cursor.description}


def _table_view_sql(table: TableSpec, snapshot: int | None, present: set[str] | None) -> str:
    """The view over one lake table at a snapshot. Explicit casts keep the view's types fixed by
    the DDL; a column the lake table lacks (added by a newer featurestore) reads as its DEFAULT."""
    if snapshot is None or present is None:
        select = ", ".join(f"CAST(NULL AS {c.type}) AS {c.name}" for c in table.columns)
        return f"CREATE OR REPLACE VIEW {table.name} AS SELECT {select} WHERE false"
    select = ", ".join(c.select(c.name in present) for c in table.columns)
    return (f"CREATE OR REPLACE VIEW {table.name} AS SELECT {select} "
            f"FROM {LAKE}.{table.name} AT (VERSION => {int(snapshot)})")


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# ---------------------------------------------------------------------------------------------
# The warehouse


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Snapshot:
    """One committed state of the warehouse: which job made it, when, with which arguments."""

    snapshot_id: int
    time: datetime
    job: str | None
    command_line: list[str] | None  # the featurestore arguments, when run from the CLI
    host: str | None
    changes: dict[str, list[str]]  # e.g. {"tables_inserted_into": ["trajectories", ...]}

    def to_dict(self) -> dict:
        return {"snapshot_id": self.snapshot_id, "time": self.time.isoformat(), "job": self.job,
                "command_line": self.command_line, "host": self.host, "changes": self.changes}


class Warehouse:
    """A warehouse directory and its catalog. Cheap to construct; touches nothing until used.

    `catalog`: where the DuckLake catalog lives (see featurestore.lake); default
    $FEATURESTORE_CATALOG, else catalog.sqlite in the folder.
    """

    def __init__(self, root: str | os.PathLike | None = None, catalog: str | None = None):
        self.root = resolve_warehouse(root)
        self.catalog_setting = catalog
        self.catalog: CatalogLocation = catalog_location(self.root, catalog)
        self.data_path = self.root / DATA_FOLDER
        self.tmp_dir = self.root / "tmp"
        self.legacy_catalog = self.root / LEGACY_CATALOG
        # A copy of a SQLite catalog refreshed after every commit, for `catalog restore`.
        self.catalog_backup = (Path(self.catalog.target + BACKUP_SUFFIX)
                               if self.catalog.kind == "sqlite" else None)
        # True while this object's writer is held: a warehouse with no catalog yet then reads
        # as empty to the job (see connect), instead of "no warehouse".
        self._writing = False

    def __repr__(self) -> str:
        return f"Warehouse({str(self.root)!r})"

    def path(self, relative: str) -> Path:
        """Absolute path of a path stored in a table (relative to the root, or already absolute)."""
        return self.root / relative

    # -- the lake -------------------------------------------------------------------------------

    def _open(self, *, read_only: bool, create: bool = False) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with the lake attached as `lake`."""
        if create and self.catalog.kind == "sqlite" and not self.catalog.exists():
            prepare_sqlite(Path(self.catalog.target))
        con = lake_connection(self.catalog.kind)
        try:
            # Relative artefact paths in the tables resolve against the root.
            con.execute(f"SET file_search_path = {_sql_string(str(self.root))}")
            attach = attach_sql(self.catalog, self.data_path, read_only=read_only, create=create)
            for attempt in range(COMMIT_ATTEMPTS):  # a catalog being created or recovered
                try:
                    con.execute(attach)
                    break
                except duckdb.Error as error:
                    if not _is_race(error) or attempt + 1 == COMMIT_ATTEMPTS:
                        raise
                    time.sleep(random.uniform(*COMMIT_WAIT_SECONDS) / 4)
        except duckdb.Error as error:
            con.close()
            raise self._unreachable(error) from None
        except BaseException:
            con.close()
            raise
        return con

    def _unreachable(self, error: duckdb.Error) -> FeaturestoreError:
        text = str(error)
        if damage := self._damage():
            return self._damaged(damage)
        if "does not exist" in text or "not exist" in text and self.catalog.kind == "sqlite":
            return self._missing()
        return FeaturestoreError(
            f"cannot open the warehouse catalog {self.catalog.describe()}: {text.strip()}. "
            "Check --catalog / $FEATURESTORE_CATALOG (the server must be running and the "
            "database created), or that the file is a featurestore catalog.")

    def _has_table_files(self) -> bool:
        return self.data_path.exists() and next(self.data_path.rglob("*.parquet"), None) is not None

    def _damage(self) -> str | None:
        """Why the SQLite catalog file cannot be read, or None. An empty file, or one without
        DuckLake's tables, is what a first job killed early leaves; it is damage only when table
        files show that the catalog once held them."""
        if self.catalog.kind != "sqlite" or not self.catalog.exists():
            return None
        damage = sqlite_catalog_damage(Path(self.catalog.target))
        unfinished = damage in ("it is empty (0 bytes)", "it holds no DuckLake tables")
        return None if unfinished and not self._has_table_files() else damage

    def _damaged(self, damage: str) -> DamagedCatalogError:
        backup = self.catalog_backup
        if backup is not None and backup.exists():
            fix = (f"Restore it with `featurestore catalog restore`, from {backup}, the copy "
                   "taken after the last commit")
        else:
            fix = ("Restore it from a copy made with `featurestore catalog backup`: "
                   "`featurestore catalog restore --from FILE`")
        return DamagedCatalogError(
            f"the catalog {self.catalog.describe()} of {self.root} is damaged: {damage}. The "
            f"table files and artefacts are not affected. {fix}; jobs committed after that copy "
            "must be run again.")

    def _missing(self) -> FeaturestoreError:
        if damage := self._damage():
            return self._damaged(damage)
        if self.legacy_catalog.exists():
            return SchemaVersionError(
                f"{self.root} is a warehouse of schema 2 (a {LEGACY_CATALOG} catalog); this "
                f"featurestore reads schema {SCHEMA_VERSION}. Convert it in place with "
                "`featurestore catalog migrate` (every table and artefact is kept), or run any "
                "job that writes, which converts it first.")
        # (A catalog holding a DuckLake but no featurestore tables is a first job's that did
        # not commit; its table files, if any, are orphans.)
        holds_lake = self.catalog.kind == "sqlite" and self._has_catalog()
        if not holds_lake and (lost := self._lost_catalog()):
            return lost
        if self.catalog.kind == "sqlite" and self.catalog.exists():
            return NotFoundError(
                f"the warehouse at {self.root} holds no featurestore tables yet: its catalog "
                f"{self.catalog.describe()} was created by a first job that did not finish. "
                "Run `featurestore init` or the job again.")
        return NotFoundError(
            f"no warehouse at {self.root} (no catalog {self.catalog.describe()}). Create an "
            "empty one with `featurestore init`, or run a job that writes one, e.g. "
            "`featurestore train-model --run demo`, or point --warehouse / "
            "FEATURESTORE_WAREHOUSE (and --catalog / FEATURESTORE_CATALOG) at an existing one.")

    def _has_catalog(self) -> bool:
        """Whether the catalog database holds a DuckLake: DuckLake's own tables are in it (a
        SQLite file created by a first job killed before DuckLake set it up does not count)."""
        if self.catalog.kind == "sqlite":
            return self.catalog.exists() and sqlite_has_ducklake(Path(self.catalog.target))
        try:
            self._open(read_only=True).close()
            return True
        except NotFoundError:
            return False

    def exists(self) -> bool:
        """Whether the catalog holds a featurestore warehouse (a first commit happened)."""
        if not self._has_catalog():
            return False
        con = self._open(read_only=True)
        try:
            return _initialised(con)
        finally:
            con.close()

    def current_snapshot(self, con: duckdb.DuckDBPyConnection) -> int:
        (snapshot,) = con.execute(f"SELECT id FROM {LAKE}.current_snapshot()").fetchone()
        return int(snapshot)

    def _resolve_as_of(self, con: duckdb.DuckDBPyConnection, as_of) -> int:
        """A snapshot id from an id, an ISO timestamp or a datetime (the last snapshot at or
        before that time)."""
        known = [s for (s,) in con.execute(
            f"SELECT snapshot_id FROM {LAKE}.snapshots() ORDER BY snapshot_id").fetchall()]
        if isinstance(as_of, int) or (isinstance(as_of, str) and as_of.strip().isdigit()):
            snapshot = int(as_of)
            if snapshot not in known:
                raise NotFoundError(
                    f"--as-of {as_of}: no snapshot {snapshot} in {self.root} (it holds "
                    f"{known[0]}..{known[-1]}, older ones expired by `featurestore compact`); "
                    "`featurestore snapshots` lists them")
            return snapshot
        try:
            moment = as_of if isinstance(as_of, datetime) else datetime.fromisoformat(str(as_of))
        except ValueError:
            raise FeaturestoreError(
                f"--as-of {as_of!r} is neither a snapshot id nor a time; give e.g. 12 or "
                "'2026-12-06 14:00' (UTC unless it names a zone)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        row = con.execute(f"SELECT max(snapshot_id) FROM {LAKE}.snapshots() "
                          "WHERE snapshot_time <= ?", [moment]).fetchone()
        if row[0] is None:
            raise NotFoundError(f"--as-of {as_of}: the warehouse has no snapshot that old; "
                                "`featurestore snapshots` lists them")
        return int(row[0])

    # -- reading --------------------------------------------------------------------------------

    def connect(self, as_of: int | str | datetime | None = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with every table, view, macro and UDF of the warehouse.

        The tables read the snapshot that is current now (or `as_of`: a snapshot id, or a time),
        and keep reading it however many jobs commit later. Inside this warehouse's own writer,
        a warehouse with no catalog yet reads as empty; anywhere else that is a NotFoundError.
        """
        if self._writing and not self._has_catalog():
            con = duckdb.connect(":memory:")
            build_views(con, None)
        else:
            if not self._has_catalog():
                raise self._missing()
            con = self._open(read_only=True)
            try:
                if not _initialised(con):
                    if not self._writing:
                        raise self._missing()
                    build_views(con, None)
                else:
                    snapshot = (self.current_snapshot(con) if as_of is None
                                else self._resolve_as_of(con, as_of))
                    build_views(con, snapshot)
                    check_schema_version(con, self.root)
            except BaseException:
                con.close()
                raise
        _open_connections.add(con)
        # Parquet footers are parsed once per connection, not once per query: safe because a
        # data file never changes (a commit writes new files).
        con.execute("SET parquet_metadata_cache = true")
        from featurestore.queries.udfs import register_udfs

        register_udfs(con, self)
        return con

    def data_files(self, table: str) -> list[Path]:
        """The Parquet files that hold `table`'s rows at the newest snapshot, for tools that read
        Parquet directly. Rows deleted since a file was written stay in it (DuckLake records
        them in delete files) until `featurestore compact` rewrites it."""
        spec(table)
        con = self._open(read_only=True)
        try:
            return [Path(path) for (path,) in con.execute(
                "SELECT data_file FROM ducklake_list_files(?, ?)", [LAKE, table]).fetchall()]
        finally:
            con.close()

    def snapshots(self, limit: int | None = None) -> list[Snapshot]:
        """Committed snapshots, newest first: id, time, job and its arguments, what changed."""
        if not self._has_catalog():
            raise self._missing()
        con = self._open(read_only=True)
        try:
            rows = con.execute(
                f"SELECT snapshot_id, snapshot_time, commit_message, commit_extra_info, changes "
                f"FROM {LAKE}.snapshots() ORDER BY snapshot_id DESC"
                + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
            # Changes name tables by id; every name a table id ever had, for display.
            names = dict(con.execute(
                f"SELECT table_id::VARCHAR, table_name FROM __ducklake_metadata_{LAKE}."
                "ducklake_table").fetchall())
        finally:
            con.close()
        snapshots = []
        for snapshot, moment, message, extra, changes in rows:
            info = json.loads(extra) if extra else {}
            snapshots.append(Snapshot(
                int(snapshot), moment, message, info.get("command_line"), info.get("host"),
                {kind: [names.get(str(v), str(v)) for v in values
                        if names.get(str(v)) != COMMIT_TOKENS]
                 for kind, values in (changes or {}).items()}))
        return snapshots

    # -- writing --------------------------------------------------------------------------------

    @contextmanager
    def writer(self, job: str) -> Iterator[Writer]:
        """A job's writes, committed as one snapshot when the block exits cleanly.

        No lock is taken: other jobs may write at the same time. A schema-2 warehouse is
        converted first. A job that fails before its commit leaves the warehouse as it was
        (its scratch and unreferenced artefact folders are deleted; if the warehouse did not
        exist, nothing of it is left).
        """
        if self.legacy_catalog.exists() and not self.exists():
            from featurestore.migrate import migrate_warehouse

            print(f"featurestore: converting {self.root} from schema 2 to {SCHEMA_VERSION} "
                  "(DuckLake) before writing", file=sys.stderr)
            migrate_warehouse(self)
        made_root = not self.root.exists()
        had_file = self.catalog.kind == "sqlite" and self.catalog.exists()
        had_catalog = self._has_catalog()
        if not had_catalog:
            if damage := self._damage():
                raise self._damaged(damage)
            self._check_catalog_not_lost()
        self._remove_abandoned(job)
        writer = Writer(self, job)
        self._writing = True
        try:
            yield writer
            writer.commit()
        except Exception as error:
            if not writer.committed:
                raise
            # The commit stands: what failed after it is cleanup, and the job has done its work.
            print(f"featurestore: warning: {job} committed, but its cleanup after the commit "
                  f"failed: {error}", file=sys.stderr)
        finally:
            self._writing = False
            if writer.committed:
                _committed_jobs.append(job)
            writer.discard()
            if not writer.committed and not had_catalog:
                self._remove_uncommitted_catalog(made_root, remove_file=not had_file)

    def _remove_abandoned(self, job: str) -> None:
        """What killed jobs left behind (see featurestore.scratch): scratch folders no running
        job holds, and training states kept for --resume of a basis registered since."""
        sweep(self.tmp_dir, lambda name: name.startswith("job-"),
              lockless_age=LOCKLESS_SCRATCH_AGE, warn=job)
        training = self.root / TRAINING_FOLDER
        if not training.is_dir() or not any(training.iterdir()):
            return
        registered = self._bases_registered()
        sweep(training, lambda name: True, lockless_age=timedelta(0), warn=job,
              abandoned=lambda folder: newest_mtime(folder) < registered.get(folder.name, 0))

    def _bases_registered(self) -> dict[str, float]:
        """When each basis was registered (a UNIX time), at the newest snapshot."""
        if not self._has_catalog():
            return {}
        con = self._open(read_only=True)
        try:
            if not _initialised(con):
                return {}
            return {name: created.timestamp() for name, created in con.execute(
                f"SELECT name, created_at FROM {LAKE}.bases").fetchall()}
        finally:
            con.close()

    def _check_catalog_not_lost(self) -> None:
        if error := self._lost_catalog():
            raise error

    def _lost_catalog(self) -> NotFoundError | None:
        """Table files but no catalog: the catalog was deleted or lost. A new catalog would not
        know those files, and compaction would delete them as orphans."""
        if not self._has_table_files():
            return None
        backup = self.catalog_backup
        restore = ("`featurestore catalog restore`" if backup is not None and backup.exists()
                   else "`featurestore catalog restore --from FILE` (FILE: a copy made with "
                        "`featurestore catalog backup`)")
        return NotFoundError(
            f"{self.root} holds table files ({DATA_FOLDER}/) but no catalog "
            f"({self.catalog.describe()}): it was deleted or lost, or --catalog / "
            f"$FEATURESTORE_CATALOG names another one. Restore it with {restore}; no job writes "
            "to this warehouse until then.")

    def backup_catalog(self, out: Path) -> Path:
        """A consistent copy of the SQLite catalog at `out`, taken while jobs may be writing
        (SQLite's online backup). With it and the data folder the warehouse can be restored to
        the snapshot of the backup."""
        if self.catalog.kind != "sqlite":
            raise FeaturestoreError(
                "catalog backup copies a SQLite catalog; back up a PostgreSQL catalog with "
                "pg_dump (or continuous archiving) of its database")
        if not self._has_catalog():
            raise self._missing()
        out = Path(out).expanduser().resolve()
        if out.exists():
            raise FeaturestoreError(f"--out {out} exists; choose a new file name")
        _sqlite_copy(Path(self.catalog.target), out)
        return out

    def refresh_catalog_backup(self) -> None:
        """Replace the automatic backup of a SQLite catalog (catalog.sqlite.backup) with a copy
        of the catalog as it is now, unless it already holds a newer snapshot (two jobs that
        commit at once may finish their copies in either order)."""
        if self.catalog_backup is None:
            return
        temp = self.catalog_backup.with_name(
            f"{self.catalog_backup.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            _sqlite_copy(Path(self.catalog.target), temp)
            if _newest_snapshot(temp) >= _newest_snapshot(self.catalog_backup):
                os.replace(temp, self.catalog_backup)
        finally:
            temp.unlink(missing_ok=True)

    def _remove_uncommitted_catalog(self, made_root: bool, remove_file: bool) -> None:
        """After a first job that never committed: the SQLite catalog it created, its empty
        folders, and the root if the job made it. What a failed job keeps on purpose (a
        training state for --resume, a rejected fit) stays, and so does a catalog file that was
        there before the job."""
        if self.catalog.kind == "sqlite" and remove_file:
            con = None
            try:  # only a catalog with no featurestore tables in it
                con = self._open(read_only=True)
                initialised = _initialised(con)
            except FeaturestoreError:
                initialised = False
            finally:
                if con is not None:
                    con.close()
            if not initialised:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(self.catalog.target + suffix).unlink(missing_ok=True)
        for folder, _, _ in sorted(os.walk(self.root), key=lambda entry: -len(entry[0])):
            if Path(folder) != self.root or made_root:
                try:
                    os.rmdir(folder)  # only succeeds when empty
                except OSError:
                    pass


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database, taken while others may be writing to it. The copy
    is one self-contained file (rollback journal, not WAL): nothing beside it to lose."""
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    writer = sqlite3.connect(target)
    try:
        reader.backup(writer)
        writer.execute("PRAGMA journal_mode=DELETE")
    finally:
        writer.close()
        reader.close()


def _newest_snapshot(catalog: Path) -> int:
    """The newest snapshot id in a SQLite catalog file; -1 when there is none to read."""
    if not catalog.exists():
        return -1
    try:
        db = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
        try:
            (snapshot,) = db.execute("SELECT max(snapshot_id) FROM ducklake_snapshot").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return -1
    return -1 if snapshot is None else int(snapshot)


def _initialised(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the attached lake holds featurestore's tables (its first commit happened). Asked
    of DuckLake's own table list in the catalog database: cheaper than loading the catalog."""
    return bool(con.execute(
        f"SELECT 1 FROM __ducklake_metadata_{LAKE}.ducklake_table "
        "WHERE table_name = 'schema_version' AND end_snapshot IS NULL").fetchall())


def check_schema_version(con: duckdb.DuckDBPyConnection, root: Path) -> int:
    versions = [v for (v,) in con.execute("SELECT version FROM schema_version").fetchall()]
    if not versions:
        raise SchemaVersionError(
            f"the warehouse at {root} records no schema version (its schema_version table is "
            "empty); it was not written by featurestore, or was damaged. Recreate it by "
            "re-running the jobs, or restore its catalog from a backup."
        )
    version = max(versions)
    if version not in KNOWN_SCHEMA_VERSIONS:
        newer = version > SCHEMA_VERSION
        fix = (
            "upgrade featurestore (pip install -U featurestore) to read it"
            if newer
            else "it cannot be read by this featurestore; recreate it by re-running the jobs"
        )
        raise SchemaVersionError(
            f"the warehouse at {root} has schema version {version}, which this featurestore "
            f"(schema {SCHEMA_VERSION}) does not know: {fix}."
        )
    return version


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the lake tables the DDL declares and the lake lacks, and add columns a newer DDL
    added (with their DEFAULT), inside the caller's transaction. No statement runs when the
    lake already matches, so this adds nothing to a commit (and no conflict with another)."""
    present = _lake_columns(con)
    first = "schema_version" not in present
    if first:
        for option, value in LAKE_OPTIONS.items():
            con.execute(f"CALL {LAKE}.set_option(?, ?)", [option, value])
    if COMMIT_TOKENS not in present:
        con.execute(f"CREATE TABLE {LAKE}.{COMMIT_TOKENS} (table_name VARCHAR NOT NULL, "
                    "job VARCHAR, committed_at TIMESTAMP WITH TIME ZONE)")
        con.execute(f"COMMENT ON TABLE {LAKE}.{COMMIT_TOKENS} IS 'featurestore''s own: one row "
                    "per table, replaced by each commit that writes it, so that concurrent "
                    "commits to one table conflict and are retried'")
    for table in table_specs().values():
        if table.name not in present:
            _create_lake_table(con, table)
            con.execute(f"INSERT INTO {LAKE}.{COMMIT_TOKENS} VALUES (?, NULL, NULL)",
                        [table.name])
            continue
        for column in table.columns:
            if column.name not in present[table.name]:
                default = f" DEFAULT {column.default}" if column.default else ""
                con.execute(f"ALTER TABLE {LAKE}.{table.name} ADD COLUMN {column.name} "
                            f"{column.type}{default}")
                con.execute(f"COMMENT ON COLUMN {LAKE}.{table.name}.{column.name} IS "
                            f"{_sql_string(column.comment)}")
    if first:
        con.execute(f"INSERT INTO {LAKE}.schema_version VALUES (?, ?, ?)",
                    [SCHEMA_VERSION, package_version(), utc_now()])


def _create_lake_table(con: duckdb.DuckDBPyConnection, table: TableSpec) -> None:
    """The DDL's table in the lake. DuckLake has no PRIMARY KEY: the Writer keeps keys unique
    by deleting the rows a commit replaces. Partitioned tables get one folder of files per
    partition; every table's files are sorted by its sort_by columns (else its key)."""
    columns = ", ".join(
        f"{c.name} {c.type}{'' if c.nullable else ' NOT NULL'}"
        + (f" DEFAULT {c.default}" if c.default else "") for c in table.columns)
    con.execute(f"CREATE TABLE {LAKE}.{table.name} ({columns})")
    con.execute(f"COMMENT ON TABLE {LAKE}.{table.name} IS {_sql_string(table.comment)}")
    for c in table.columns:
        con.execute(f"COMMENT ON COLUMN {LAKE}.{table.name}.{c.name} IS "
                    f"{_sql_string(c.comment)}")
    if table.partition_by:
        con.execute(f"ALTER TABLE {LAKE}.{table.name} SET PARTITIONED BY "
                    f"({', '.join(table.partition_by)})")
    order = table.sort_by or table.key
    if order:
        con.execute(f"ALTER TABLE {LAKE}.{table.name} SET SORTED BY ({', '.join(order)})")


def _is_race(error: BaseException) -> bool:
    text = str(error).lower()
    return any(message in text for message in _RACE_MESSAGES)


def new_version() -> str:
    """A version for an artefact folder: the UTC time to the second, for people reading the
    folder names, and a random suffix, so a name is never reused."""
    return f"{utc_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


class Writer:
    """What one job writes: table rows and artefact folders, committed as one snapshot."""

    def __init__(self, warehouse: Warehouse, job: str):
        self.warehouse = warehouse
        self.job = job
        # Scratch of this job alone (other jobs may be writing to the same warehouse), locked
        # while the job runs: the next writer deletes it if the job is killed.
        self.tmp_dir = warehouse.tmp_dir / f"job-{uuid.uuid4().hex}"
        self._scratch = Claim(self.tmp_dir, make=False)
        self._rows: dict[str, list[pa.Table]] = {}
        self._replace: dict[str, list[dict]] = {}  # table -> filters whose old rows are dropped
        # Partitioned tables: table -> partition key -> (values, file holding it, rows)
        self._partitions: dict[str, dict[str, tuple[dict, Path, int]]] = {}
        self._versions: dict[str, str] = {}  # artefact name -> its versioned relative path
        self._remove_after: list[str] = []  # untracked folders to delete once committed
        self.committed = False
        self.attempts = 0  # commit attempts: more than one when other jobs committed first
        self._dropped: set[str] = set()  # tables whose damaged files this job took out

    # -- artefact folders -----------------------------------------------------------------------

    def versioned(self, relative: str) -> str:
        """The folder this job writes `relative` to, relative to the root: <relative>@<version>,
        the same for every call in one job. Store this path in the rows that point at it."""
        if relative not in self._versions:
            check_name(Path(relative).name, f"{relative} (it names a folder)")
            self._versions[relative] = f"{relative}@{new_version()}"
        return self._versions[relative]

    def stage_dir(self, relative: str) -> Path:
        """A new, empty folder for an artefact (at `versioned(relative)`): only the rows of this
        job's commit point at it, so it is invisible until then, and deleted if the job fails."""
        path = self.warehouse.path(self.versioned(relative))
        path.mkdir(parents=True)
        return path

    def remove_dir(self, relative: str) -> None:
        """Delete <root>/<relative> once this job has committed: for folders no table tracks
        (a rejected fit kept aside). Tracked artefacts are never deleted by a job: the rows
        stop pointing at them, and `featurestore compact` removes them later."""
        self._remove_after.append(relative)

    # -- table rows -----------------------------------------------------------------------------

    def put(self, table: str, rows: pa.Table | list[dict],
            replace_where: dict | None = None) -> None:
        """Add rows to a table; at commit they replace existing rows with the same key.

        `replace_where` ({column: value}) also drops every existing row that matches it: a job
        that owns a whole slice of a table (all checkpoints of a run) replaces the slice. A key
        may also be a SQL expression of the table's columns (see UPSTREAM_BASIS).
        Rows of a partitioned table replace whole partitions instead, and are written to this
        job's scratch right away, so a job can put a large table one partition at a time.
        """
        table_spec = spec(table)
        if replace_where:
            if table_spec.partition_by and not set(replace_where) <= set(table_spec.partition_by):
                raise ValueError(f"{table}: replace_where may only name its partition columns "
                                 f"{table_spec.partition_by}")
            self._replace.setdefault(table, []).append(replace_where)
        if isinstance(rows, list):
            rows = pa.Table.from_pylist(rows, schema=table_spec.arrow_schema)
        else:
            rows = rows.select(table_spec.arrow_schema.names).cast(table_spec.arrow_schema)
        for column in table_spec.columns:
            if not column.nullable and rows[column.name].null_count:
                raise FeaturestoreError(
                    f"{self.job}: column {table}.{column.name} may not be NULL "
                    f"({rows[column.name].null_count} NULL values given)"
                )
        if table_spec.partition_by:
            self._put_partitions(table_spec, rows)
        else:
            self._rows.setdefault(table, []).append(rows)

    def _put_partitions(self, table: TableSpec, rows: pa.Table) -> None:
        groups = rows.group_by(list(table.partition_by)).aggregate([]).to_pylist()
        for values in groups:
            mask = None
            for column, value in values.items():
                match = pc.equal(rows[column], value)
                mask = match if mask is None else pc.and_(mask, match)
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            temp = self.tmp_dir / f"{table.name}-{uuid.uuid4().hex}.parquet"
            write_partition_file(table, values, rows.filter(mask), temp)
            self.adopt_partition(table.name, values, temp)

    def adopt_partition(self, table: str, values: dict, temp: Path) -> None:
        """Commit a partition file written by write_partition_file (e.g. by a worker process,
        into this job's tmp_dir); it replaces the partition's rows."""
        table_spec = spec(table)
        key = partition_key(table_spec, values)
        for column, value in zip(table_spec.partition_by, json.loads(key)):
            check_name(str(value), f"{table}.{column} value (it names a partition folder)")
        parts = self._partitions.setdefault(table, {})
        if key in parts:
            raise FeaturestoreError(f"{self.job}: partition {table} {key} was written twice")
        stored = pq.read_schema(temp)
        if (stored.metadata or {}).get(PARTITION_KEY_METADATA, b"").decode() != key:
            raise FeaturestoreError(f"{self.job}: {temp} does not hold partition {table} {key}")
        values = dict(zip(table_spec.partition_by, json.loads(key)))
        parts[key] = (values, temp, pq.read_metadata(temp).num_rows)

    # -- commit ---------------------------------------------------------------------------------

    def commit(self) -> None:
        """Every table write of the job in one DuckLake transaction: one snapshot, whose commit
        message is the job and whose extra info holds its command line. A commit that loses a
        race with another job's is run again from the start, so its deletes see the other job's
        rows: of two jobs writing the same rows, the one that commits last wins."""
        wh = self.warehouse
        new_rows = {table: _unique_rows(pa.concat_tables(parts), spec(table), self.job)
                    for table, parts in self._rows.items()}
        partition_files = self._place_partition_files()
        extra = commit_info()
        low, high = COMMIT_WAIT_SECONDS
        for attempt in range(COMMIT_ATTEMPTS):
            self.attempts = attempt + 1
            con = wh._open(read_only=False, create=True)
            try:
                con.execute("BEGIN TRANSACTION")
                con.execute(f"CALL {LAKE}.set_commit_message('featurestore', ?, "
                            "extra_info => ?)", [self.job, extra])
                ensure_schema(con)
                _renew_tokens(con, sorted({*new_rows, *self._replace, *partition_files}),
                              self.job)
                for table, rows in new_rows.items():
                    self._write_rows(con, spec(table), rows)
                for table, filters in self._replace.items():
                    if spec(table).partition_by:
                        for where in filters:
                            _delete_where(con, table, where)
                for table, files in partition_files.items():
                    for values, path in files:
                        _delete_where(con, table, values)
                        con.execute("CALL ducklake_add_data_files(?, ?, ?)",
                                    [LAKE, table, str(path)])
                con.execute("COMMIT")
                self.committed = True
                self._after_commit(con, extra)
                break
            except duckdb.Error as error:
                _rollback(con)
                if self._drop_damaged_files(str(error)):
                    continue  # the job replaces rows of that table: run the commit again
                if _is_race(error) and attempt + 1 < COMMIT_ATTEMPTS:
                    time.sleep(random.uniform(low, min(high, low * 1.5 ** attempt)))
                    continue
                if _is_race(error):
                    raise WarehouseBusyError(
                        f"{self.job}: could not commit after {COMMIT_ATTEMPTS} tries, other jobs "
                        f"kept committing to {wh.catalog.describe()} first ({error}). Run it "
                        "again when fewer jobs write at once.") from None
                raise FeaturestoreError(f"{self.job}: the commit failed and nothing was "
                                        f"written: {error}.{damage_hint(str(error))}") from None
            finally:
                con.close()
        for relative in self._remove_after:
            remove_tree(wh.path(relative), warn=self.job)

    def _drop_damaged_files(self, error: str) -> bool:
        """When the commit failed on a damaged file of a table this job writes: take the damaged
        files of that table out of the catalog (its own snapshot, as `featurestore check
        --repair` does), say so, and return True so the commit runs again. Once per table."""
        match = TABLE_FILE.search(error)
        if not match or match.group(1) in self._dropped or not self._writes(match.group(1)):
            return False
        from featurestore.integrity import drop_damaged_files

        table = match.group(1)
        self._dropped.add(table)
        problems = drop_damaged_files(self.warehouse, table, self.job)
        for problem in problems:
            rerun = f"; re-run {problem.rerun} to write them again" if problem.rerun else ""
            print(f"featurestore: warning: {self.job}: {problem.path} of table {table} is "
                  f"damaged ({problem.reason}); its {problem.rows} rows could not be read and "
                  f"are dropped from the catalog{rerun}", file=sys.stderr)
        return bool(problems)

    def _writes(self, table: str) -> bool:
        return table in self._rows or table in self._replace or table in self._partitions

    def _after_commit(self, con: duckdb.DuckDBPyConnection, extra: str) -> None:
        """Record the SHA-256 of every table file the commit added (see featurestore.integrity)
        and refresh the catalog's automatic backup. The commit stands whatever happens here: a
        failure costs only the checksums or a fresh backup, and is reported as a warning."""
        from featurestore.integrity import METADATA, record_checksums

        try:
            (snapshot,) = con.execute(
                f"SELECT max(snapshot_id) FROM {METADATA}.ducklake_snapshot_changes "
                "WHERE commit_extra_info = ?", [extra]).fetchone()
            record_checksums(con, self.warehouse.data_path, snapshot)
            self.warehouse.refresh_catalog_backup()
        except (duckdb.Error, OSError, sqlite3.Error) as error:
            print(f"featurestore: warning: {self.job} committed, but the checksums of its table "
                  f"files or the catalog's backup could not be written ({error})",
                  file=sys.stderr)

    def _write_rows(self, con: duckdb.DuckDBPyConnection, table: TableSpec,
                    rows: pa.Table) -> None:
        """Delete what `rows` replace (same key, or a replace_where slice); insert `rows`."""
        for where in self._replace.get(table.name, []):
            _delete_where(con, table.name, where)
        if rows.num_rows == 0:
            return
        con.register("new_rows", rows)
        try:
            if table.key:
                match = " AND ".join(f"n.{c} IS NOT DISTINCT FROM old.{c}" for c in table.key)
                con.execute(f"DELETE FROM {LAKE}.{table.name} AS old WHERE EXISTS "
                            f"(SELECT 1 FROM new_rows AS n WHERE {match})")
            names = ", ".join(c.name for c in table.columns)
            con.execute(f"INSERT INTO {LAKE}.{table.name} ({names}) SELECT {names} FROM new_rows")
        finally:
            con.unregister("new_rows")

    def _place_partition_files(self) -> dict[str, list[tuple[dict, Path]]]:
        """Move this job's partition files into the table's data folder under new names (they
        become visible only when the commit registers them; a failed job's are orphans that
        `featurestore compact` deletes)."""
        placed: dict[str, list[tuple[dict, Path]]] = {}
        for table, parts in self._partitions.items():
            for key, (values, temp, _) in parts.items():
                folder = (self.warehouse.data_path / "main" / table
                          / partition_folder(spec(table), key))
                folder.mkdir(parents=True, exist_ok=True)
                final = folder / f"featurestore-{new_version()}.parquet"
                try:
                    os.replace(temp, final)
                except OSError:  # another filesystem (a data path elsewhere)
                    shutil.copyfile(temp, final)
                    _fsync_file(final)
                _fsync_dir(folder)
                placed.setdefault(table, []).append((values, final))
        return placed

    def discard(self) -> None:
        """Delete this job's scratch; if it did not commit, also the artefact folders it made.
        What cannot be deleted is left with a warning, for a later job or compaction."""
        self._scratch.release(remove=True, warn=self.job)
        try:
            self.warehouse.tmp_dir.rmdir()  # only when no other job's scratch is in it
        except OSError:
            pass
        if not self.committed:
            for relative in self._versions.values():
                remove_tree(self.warehouse.path(relative), warn=self.job)


TABLE_FILE = re.compile(rf"{DATA_FOLDER}/main/(\w+)/\S*?\.parquet")


def damage_hint(error: str) -> str:
    """For an error that names a table file: what to do about a damaged one (a job cannot
    replace rows it cannot read)."""
    from featurestore.resource_errors import resource_problem

    match = TABLE_FILE.search(error)
    if not match or resource_problem(OSError(error)) is not None:  # a full disk, not damage
        return ""
    return (f" A file of table {match.group(1)} cannot be read: `featurestore check` confirms "
            "it, and `featurestore check --repair` takes it out of the catalog and names the "
            "command that writes its rows again.")


def commit_info() -> str:
    """A snapshot's extra info: the command line that made it (when run from the CLI), and
    where and by which featurestore."""
    return json.dumps({"command_line": COMMAND_LINE, "host": socket.gethostname(),
                       "pid": os.getpid(), "featurestore": package_version(),
                       "commit": uuid.uuid4().hex})  # finds the snapshot once committed


def _renew_tokens(con: duckdb.DuckDBPyConnection, tables: list[str], job: str) -> None:
    """Replace the commit-token rows of `tables` (see COMMIT_TOKENS)."""
    if not tables:
        return
    marks = ", ".join("?" for _ in tables)
    con.execute(f"DELETE FROM {LAKE}.{COMMIT_TOKENS} WHERE table_name IN ({marks})", tables)
    con.execute(f"INSERT INTO {LAKE}.{COMMIT_TOKENS} SELECT unnest(?::VARCHAR[]), ?, ?",
                [tables, job, utc_now()])


def _delete_where(con: duckdb.DuckDBPyConnection, table: str, where: dict) -> None:
    condition = " AND ".join(f"{column} = ?" for column in where)
    con.execute(f"DELETE FROM {LAKE}.{table} WHERE {condition}", list(where.values()))


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # the failed COMMIT already ended the transaction


def _unique_rows(rows: pa.Table, table: TableSpec, job: str) -> pa.Table:
    """`rows` sorted as the table's files are, refusing two rows with one key."""
    if table.key and rows.num_rows:
        keys = rows.group_by(list(table.key)).aggregate([([], "count_all")])
        if keys.num_rows != rows.num_rows:
            raise FeaturestoreError(
                f"{job}: rows for {table.name} repeat a key ({', '.join(table.key)}); each "
                "must be unique")
    order = table.sort_by or table.key
    return rows.sort_by([(c, "ascending") for c in order]) if order and rows.num_rows else rows


def write_partition_file(table: TableSpec, values: dict, rows: pa.Table, path: Path) -> None:
    """One partition of a partitioned table as a Parquet file, sorted by the table's sort_by
    columns, with the partition named in its metadata (checked when a job adopts the file)."""
    rows = rows.select(table.arrow_schema.names).cast(table.arrow_schema)
    if table.sort_by and not _is_sorted(rows, table.sort_by):
        rows = rows.sort_by([(c, "ascending") for c in table.sort_by])
    metadata = {PARTITION_KEY_METADATA: partition_key(table, values).encode()}
    rows = rows.replace_schema_metadata({**(rows.schema.metadata or {}), **metadata})
    # Dictionary pages only for the partition columns, which hold one value: for the sorted
    # numeric columns plain pages under zstd are smaller and a fifth faster to write.
    pq.write_table(rows, path, compression="zstd", row_group_size=ROW_GROUP,
                   use_dictionary=list(table.partition_by))
    _fsync_file(path)


def _is_sorted(rows: pa.Table, columns: tuple[str, ...]) -> bool:
    """Whether `rows` are already in ascending order of `columns` (checked pairwise, in well
    under a millisecond per 100k rows, against tens of milliseconds for sorting them again)."""
    if rows.num_rows < 2:
        return True
    tied = np.ones(rows.num_rows - 1, dtype=bool)  # rows i, i+1 equal on every column so far
    for column in columns:
        values = rows[column].to_numpy()
        if (tied & (values[1:] < values[:-1])).any():
            return False
        tied &= values[1:] == values[:-1]
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@cache
def package_version() -> str:
    from importlib.metadata import version

    return version("featurestore")


# Connections that carry Python UDFs must be closed before the interpreter exits, or the DuckDB
# bindings print reference-leak warnings at exit. Weak references: a connection the caller drops
# is not kept alive by this.
_open_connections: weakref.WeakSet[duckdb.DuckDBPyConnection] = weakref.WeakSet()


@atexit.register
def _close_connections() -> None:
    for con in list(_open_connections):
        con.close()


def records(con: duckdb.DuckDBPyConnection, sql: str, params=None) -> list[dict]:
    """A query's rows as dicts keyed by column name."""
    cursor = con.execute(sql, params or [])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def connect(warehouse: str | os.PathLike | None = None, as_of: int | str | datetime | None = None,
            catalog: str | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection on the warehouse (default: $FEATURESTORE_WAREHOUSE or ./warehouse).

    Every table is a view over its DuckLake table, with the views and macros of sql/ and the
    Python UDFs of featurestore.queries.udfs. The connection is in memory and read-only: it
    holds no lock, and it sees the warehouse as it was when it was opened, or at `as_of` (a
    snapshot id from `featurestore snapshots`, or a time).
    """
    return Warehouse(warehouse, catalog).connect(as_of)


@dataclass
class InitResult:
    path: str
    created: bool  # False: a warehouse was already there, and nothing changed
    schema_version: int
    tables: int

    def to_dict(self) -> dict:
        return {"path": self.path, "created": self.created,
                "schema_version": self.schema_version, "tables": self.tables}


def init_warehouse(warehouse: str | os.PathLike | None = None,
                   catalog: str | None = None) -> InitResult:
    """Create an empty warehouse (its catalog, with every table empty, and the schema version)
    in a missing or empty folder. A warehouse already there is left as it is. Jobs create the
    warehouse themselves on their first commit; this makes it explicit."""
    wh = Warehouse(warehouse, catalog)
    created = not wh.exists()
    if created:
        with wh.writer("init"):
            pass  # the first commit writes the schema version and the catalog
    con = wh.connect()
    try:
        version = check_schema_version(con, wh.root)
    finally:
        con.close()
    return InitResult(str(wh.root), created, version, len(table_specs()))


def list_tables(warehouse: str | os.PathLike | None = None) -> list[dict]:
    """Every table and view: name, kind, row count, description and status ('ok', or why it
    cannot be read: a table file missing or not the size it was written at, or the error its
    query gives). A damaged table does not stop the others from being listed."""
    from featurestore.integrity import table_files

    wh = Warehouse(warehouse)
    con = wh.connect()
    try:
        damage = {}
        for file in table_files(con, wh.data_path):
            if file.table not in damage and (
                    not file.path.exists() or file.path.stat().st_size != file.size):
                damage[file.table] = (f"damaged: {file.path.relative_to(wh.root)} is missing or "
                                      "not the size it was written at; see `featurestore check`")
        objects = con.execute(
            "SELECT view_name, comment FROM duckdb_views() WHERE NOT internal "
            "AND database_name = 'memory' AND schema_name = 'main' ORDER BY view_name"
        ).fetchall()
        tables = table_specs()
        result = []
        for name, comment in objects:
            rows, status = None, damage.get(name, "ok")
            try:
                (rows,) = con.execute(f"SELECT count(*) FROM {name}").fetchall()[0]
            except duckdb.Error as error:
                if status == "ok":
                    status = f"cannot be read: {str(error).splitlines()[0]}"
            result.append({"name": name, "kind": "table" if name in tables else "view",
                           "rows": rows, "status": status, "description": comment or ""})
        return sorted(result, key=lambda t: (t["kind"] != "table", t["name"]))
    finally:
        con.close()


def describe_table(table: str, warehouse: str | os.PathLike | None = None) -> list[dict]:
    """Columns of a table or view: name, type and description."""
    con = connect(warehouse)
    try:
        rows = con.execute(
            "SELECT column_name, data_type, comment FROM duckdb_columns() "
            "WHERE table_name = ? AND database_name = 'memory' AND schema_name = 'main' "
            "ORDER BY column_index", [table]
        ).fetchall()
        if not rows:
            names = [n for (n,) in con.execute(
                "SELECT view_name FROM duckdb_views() WHERE NOT internal "
                "AND database_name = 'memory' AND schema_name = 'main'"
                " ORDER BY view_name").fetchall()]
            raise NotFoundError(f"unknown table {table!r}; tables and views: {', '.join(names)}")
        return [{"column": n, "type": t, "description": c or ""} for n, t, c in rows]
    finally:
        con.close()
