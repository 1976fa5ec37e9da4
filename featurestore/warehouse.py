"""The warehouse: Parquet files as the source of truth, one DuckDB file as their catalog.

On disk (see warehouse/README.md for the full layout)::

    <root>/featurestore.duckdb          catalog: manifest of live Parquet files, views, macros
    <root>/tables/<table>/part-*.parquet   one live file per table
    <root>/tables/<table>/<col>=<value>/.../part-*.parquet
                                           one per partition of a partitioned table
                                           (feature_activations/basis=<b>/step=<s>/)
    <root>/runs/, <root>/activations/      checkpoints and activation sets the tables point to
    <root>/tmp/                            files being written; never read by queries
    <root>/.lock                           held by the one job writing

How a write stays atomic: a job takes the writer lock, writes every file it produces to tmp/
(fsync), and at commit renames them into place under new names, then records the new files in the
catalog's manifest and recreates the views in one DuckDB transaction. Queries only ever read files
named in the manifest, so a job killed at any point leaves the warehouse as it was: at worst an
unreferenced file, which the next writer deletes. A file replaced by a commit is "retired": it
stays for RETIRED_GRACE so that connections opened earlier keep reading their snapshot.

Readers never hold the catalog file open: `connect()` reads the manifest once and builds the views
in an in-memory DuckDB connection, so a notebook left open does not block jobs.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shutil
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
    FeaturestoreError,
    NotFoundError,
    SchemaVersionError,
    WarehouseBusyError,
)
from featurestore.settings import check_name, resolve_warehouse

SCHEMA_VERSION = 2
KNOWN_SCHEMA_VERSIONS = frozenset({2})
CATALOG_FILE = "featurestore.duckdb"
MANIFEST = "_manifest"
PARTITIONS = "_partitions"
# Rows of every file are sorted (by the table's sort_by columns, else its key) and written in
# row groups this size unless the table declares its own, so a filter on a leading sort column
# decompresses only the groups whose min/max cover it: one feature's trajectory among 3M rows
# reads one group, not a million rows (bench_warehouse_scale: 66 ms with pyarrow's default
# groups, 10 ms with these); one feature at one step of feature_activations, 2.6 ms against
# 3.0 ms with 64k groups. Smaller groups cost more footer to parse per query than they save
# (4k: trajectory 20 ms), except in tables of a few thousand rows per question (diffs).
ROW_GROUP = 16_384
PARTITION_KEY_METADATA = b"featurestore.partition"
RETIRED = "_retired"
# A replaced Parquet file stays on disk this long, so connections opened before the replacing
# commit keep working; the first writer after that deletes it.
RETIRED_GRACE = timedelta(hours=1)
# How long to wait for a commit that holds the catalog file open before calling it busy.
CATALOG_WAIT_SECONDS = 15.0


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
    # files (default: its key), chosen for the filters its questions use, and
    # `-- row_group_size: N`.
    partition_by: tuple[str, ...] = ()
    sort_by: tuple[str, ...] = ()
    row_group_size: int = ROW_GROUP

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


def sql_text(kind: str) -> list[tuple[str, str]]:
    """(name, text) of every .sql file in sql/<kind>/, in name order."""
    folder = resources.files("featurestore.sql").joinpath(kind)
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


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
            row_group = _declared(ddl, "row_group_size")
            specs[name] = TableSpec(name, comment[0][0] or "", columns,
                                    tuple(key[0][0]) if key else (), schema,
                                    _declared(ddl, "partition_by"), _declared(ddl, "sort_by"),
                                    int(row_group[0]) if row_group else ROW_GROUP)
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
    """The manifest's name for one partition: its column values as JSON, e.g. ["demo-l2", 100]."""
    if isinstance(values, dict):
        values = tuple(values[c] for c in table.partition_by)
    return json.dumps([v.item() if hasattr(v, "item") else v for v in values])


def partition_folder(table: TableSpec, key: str) -> str:
    """The folder of one partition under tables/<table>/, one level per partition column:
    basis=demo-l2/step=100. DuckDB reads the values from the path (hive partitioning), so a
    query on one partition skips every other file without opening it."""
    return "/".join(f"{c}={v}" for c, v in zip(table.partition_by, json.loads(key)))


def _is_json(column: Column) -> bool:
    return column.type == "JSON"


def spec(table: str) -> TableSpec:
    specs = table_specs()
    if table not in specs:
        raise NotFoundError(f"unknown table {table!r}; tables are: {', '.join(sorted(specs))}")
    return specs[table]


# ---------------------------------------------------------------------------------------------
# Building the catalog: views over the live files, then sql/views and sql/macros


def _table_view_sql(table: TableSpec, paths: list[str], hive: bool,
                    file_columns: set[str] | None = None) -> str:
    """The view over a table's files. Explicit casts keep the view's types fixed by the DDL
    whatever the file holds; a column the DDL added after a file was written (not in
    `file_columns`, given for unpartitioned tables) reads as its DEFAULT, or NULL."""
    if not paths:
        select = ", ".join(f"CAST(NULL AS {c.type}) AS {c.name}" for c in table.columns)
        return f"CREATE OR REPLACE VIEW {table.name} AS SELECT {select} WHERE false"
    select = ", ".join(c.select(file_columns is None or c.name in file_columns)
                       for c in table.columns)
    files = ", ".join(_sql_string(p) for p in paths)
    options = ""
    if hive:
        # A filter on a partition column is then checked against each path at planning time:
        # only the matching partitions' files are opened. Without this, DuckDB opens every
        # file's footer to learn its min/max (200 checkpoints: 150 ms for a one-step query).
        types = ", ".join(f"{_sql_string(c)}: {table.column(c).type}" for c in table.partition_by)
        options = f", hive_partitioning = true, hive_types = {{{types}}}"
    return (f"CREATE OR REPLACE VIEW {table.name} AS SELECT {select} "
            f"FROM read_parquet([{files}]{options})")


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def build_catalog(con: duckdb.DuckDBPyConnection, live: Manifest, root: Path) -> None:
    """Create every table view (over its live files, or empty), with comments, views and macros.
    `root`: the warehouse folder the manifest's paths are relative to."""
    for table in table_specs().values():
        hive = bool(table.partition_by) and not live.legacy_partitions(table)
        paths = live.paths(table.name)
        file_columns = None
        if paths and not table.partition_by:
            file_columns = set(pq.read_schema(root / paths[0]).names)
        con.execute(_table_view_sql(table, paths, hive, file_columns))
        con.execute(f"COMMENT ON VIEW {table.name} IS {_sql_string(table.comment)}")
        for c in table.columns:
            con.execute(f"COMMENT ON COLUMN {table.name}.{c.name} IS {_sql_string(c.comment)}")
    for _, text in sql_text("macros"):
        con.execute(text)
    for _, text in sql_text("views"):
        con.execute(text)


@dataclass
class Manifest:
    """What the catalog says is live: one file per table, and one per partition of a partitioned
    table, plus the retired files kept for readers of older snapshots."""

    files: dict[str, str]  # table -> live file (unpartitioned tables)
    partitions: dict[str, dict[str, str]]  # table -> partition key -> live file
    retired: set[str]

    def paths(self, table: str) -> list[str]:
        if table in self.partitions:
            return [self.partitions[table][k] for k in sorted(self.partitions[table])]
        return [self.files[table]] if table in self.files else []

    def legacy_partitions(self, table: TableSpec) -> list[str]:
        """Partitions whose file is not in its partition folder: written before featurestore
        used the folder layout (flat in tables/<table>/). The next commit links them into place;
        until then the table is read without partition pruning (DuckDB needs every path of one
        scan in the same layout)."""
        return [key for key, path in self.partitions.get(table.name, {}).items()
                if Path(path).parent != Path("tables", table.name, partition_folder(table, key))]

    def all_paths(self) -> set[str]:
        return {*self.files.values(), *(p for parts in self.partitions.values()
                                         for p in parts.values()), *self.retired}


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


class Warehouse:
    """A warehouse directory. Cheap to construct; touches the disk only when used."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = resolve_warehouse(root)
        self.catalog_path = self.root / CATALOG_FILE
        self.tables_dir = self.root / "tables"
        self.tmp_dir = self.root / "tmp"
        self.lock_path = self.root / ".lock"
        # True while this object's writer is held: a warehouse with no catalog yet then reads
        # as empty to the job (see connect), instead of "no warehouse".
        self._writing = False

    def __repr__(self) -> str:
        return f"Warehouse({str(self.root)!r})"

    def path(self, relative: str) -> Path:
        """Absolute path of a path stored in a table (relative to the root, or already absolute)."""
        return self.root / relative

    def exists(self) -> bool:
        return self.catalog_path.exists()

    # -- reading --------------------------------------------------------------------------------

    def live_files(self) -> dict[str, str]:
        """The manifest: table -> live Parquet file (relative to the root), unpartitioned tables."""
        return self.manifest().files

    def manifest(self) -> Manifest:
        """Every live file, partitions included, and the retired files still kept."""
        if not self.exists():
            raise NotFoundError(
                f"no warehouse at {self.root} (no {CATALOG_FILE}). Create an empty one with "
                "`featurestore init`, or run a job that writes one, e.g. `featurestore "
                "train-model --run demo`, or point --warehouse / FEATURESTORE_WAREHOUSE at an "
                "existing warehouse; if its tables/ folder is there but the catalog was deleted, "
                "run `featurestore catalog rebuild`."
            )
        con = duckdb.connect(":memory:")
        try:
            self._attach_catalog(con, read_only=True)
            rows = con.execute(f"SELECT table_name, path FROM catalog.{MANIFEST}").fetchall()
            retired = con.execute(f"SELECT path FROM catalog.{RETIRED}").fetchall()
            partitions: dict[str, dict[str, str]] = {}
            for table, key, path in con.execute(
                    f"SELECT table_name, partition, path FROM catalog.{PARTITIONS}").fetchall():
                partitions.setdefault(table, {})[key] = path
            con.execute("DETACH catalog")
        finally:
            con.close()
        return Manifest(dict(rows), partitions, {path for (path,) in retired})

    def _attach_catalog(self, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        mode = " (READ_ONLY)" if read_only else ""
        deadline = time.monotonic() + CATALOG_WAIT_SECONDS
        while True:
            try:
                con.execute(f"ATTACH {_sql_string(str(self.catalog_path))} AS catalog{mode}")
                return
            except duckdb.IOException as error:
                if "lock" not in str(error).lower() or time.monotonic() > deadline:
                    raise WarehouseBusyError(
                        f"warehouse busy: the catalog {self.catalog_path} is held open by another "
                        "process. Close other DuckDB sessions on that file (featurestore's own "
                        "connections never hold it) and retry."
                    ) from error
                time.sleep(0.1)

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with every table, view, macro and UDF of the warehouse.

        Inside this warehouse's own writer, a warehouse with no catalog yet (a missing or empty
        folder) reads as empty: every table is there with no rows, and the job's commit creates
        the catalog. Anywhere else a missing catalog is a NotFoundError.
        """
        first_write = self._writing and not self.exists()
        if first_write:
            self._check_catalog_not_lost()
        live = Manifest({}, {}, set()) if first_write else self.manifest()
        con = duckdb.connect(":memory:")
        _open_connections.add(con)
        # Relative paths in the views resolve against the root, wherever the process runs.
        con.execute(f"SET file_search_path = {_sql_string(str(self.root))}")
        # Parquet footers are parsed once per connection, not once per query: a warm lookup in
        # the 3M-row trajectories file (a 350 kB footer of 200 row groups) drops from 12.8 to
        # 9.9 ms. Safe because a live file never changes: a commit writes new files.
        con.execute("SET parquet_metadata_cache = true")
        build_catalog(con, live, self.root)
        if not first_write:  # the first commit writes the schema version
            check_schema_version(con, self.root)
        from featurestore.queries.udfs import register_udfs

        register_udfs(con, self)
        return con

    # -- writing --------------------------------------------------------------------------------

    @contextmanager
    def writer(self, job: str) -> Iterator[Writer]:
        """Hold the writer lock for a job; commit what it wrote when the block exits cleanly.

        Take it at the start of the job, so a second writer is refused before doing any work.
        The warehouse need not exist yet: its first commit creates it, and a job that fails
        before any commit leaves no catalog, tmp/ or lock behind (nor the folder, if it made it).
        """
        made_root = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown job"
                raise WarehouseBusyError(
                    f"warehouse busy: {self.root} is being written by {holder}. Wait for that "
                    "job to finish (or stop it) and run this command again."
                ) from None
            lock.seek(0)
            lock.truncate()
            lock.write(json.dumps({"pid": os.getpid(), "job": job, "since": utc_now().isoformat()}))
            lock.flush()
            try:
                self._clean_leftovers()
                writer = Writer(self, job)
                self._writing = True
                try:
                    yield writer
                    writer.commit()
                finally:
                    self._writing = False
                    writer.discard()
                    if not self.exists():  # no commit ever happened here
                        self._remove_scaffolding(made_root)
            finally:
                lock.seek(0)
                lock.truncate()
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _check_catalog_not_lost(self) -> None:
        """A folder with table files but no catalog lost its catalog; starting a new warehouse
        there would make the next writer delete those files as unreferenced."""
        if self.tables_dir.exists() and next(self.tables_dir.rglob("part-*.parquet"), None):
            raise NotFoundError(
                f"{self.root} holds table files (tables/) but no catalog ({CATALOG_FILE}): it was "
                "deleted or lost. Run `featurestore catalog rebuild` to recreate it from the "
                "files before writing to this warehouse."
            )

    def _remove_scaffolding(self, made_root: bool) -> None:
        """After a job that never committed to a warehouse with no catalog: remove its tmp/,
        its lock (still held, so no other writer can be between open and lock) and any folder
        left empty, the root too if this job made it. What a failed job keeps on purpose (a
        training state for --resume, a rejected fit) stays."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.lock_path.unlink(missing_ok=True)
        for folder, _, _ in sorted(os.walk(self.root), key=lambda entry: -len(entry[0])):
            if Path(folder) != self.root or made_root:
                try:
                    os.rmdir(folder)  # only succeeds when empty
                except OSError:
                    pass

    def _clean_leftovers(self) -> None:
        """Remove what killed jobs left: tmp/ and Parquet files the catalog does not know."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        if not self.exists() or not self.tables_dir.exists():
            return
        known = {self.path(p) for p in self.manifest().all_paths()}
        for file in self.tables_dir.rglob("part-*.parquet"):
            if file not in known:
                file.unlink()

    def rebuild_catalog(self) -> dict[str, list[str]]:
        """Recreate featurestore.duckdb from the Parquet files alone: the newest file per table,
        or per partition (named in each partition file's metadata) of a partitioned table.

        A partition dropped less than RETIRED_GRACE ago still has its file, and comes back.
        """
        with self.writer("catalog rebuild"):
            live = Manifest({}, {}, set())
            for table in table_specs().values():
                folder = self.tables_dir / table.name
                if table.partition_by:  # in partition folders, or flat (older warehouses)
                    files = sorted(folder.rglob("part-*.parquet"), key=lambda f: f.name)
                else:
                    files = sorted(folder.glob("part-*.parquet"))
                if files and table.partition_by:
                    newest = {}
                    for file in files:  # time-ordered names: later files win
                        key = pq.read_schema(file).metadata[PARTITION_KEY_METADATA].decode()
                        newest[key] = str(file.relative_to(self.root))
                    live.partitions[table.name] = newest
                elif files:
                    live.files[table.name] = str(files[-1].relative_to(self.root))
            if "schema_version" not in live.files:
                raise SchemaVersionError(
                    f"cannot rebuild the catalog of {self.root}: tables/schema_version/ holds no "
                    "Parquet file, so the warehouse layout is unknown. Is this a featurestore "
                    "warehouse?"
                )
            fresh = self.tmp_dir / CATALOG_FILE
            con = duckdb.connect(str(fresh))
            try:
                _create_manifest(con)
                for table, path in live.files.items():
                    rows = pq.read_metadata(self.path(path)).num_rows
                    con.execute(
                        f"INSERT INTO {MANIFEST} VALUES (?, ?, ?, 'catalog rebuild', ?)",
                        [table, path, rows, utc_now()],
                    )
                for table, parts in live.partitions.items():
                    for key, path in parts.items():
                        rows = pq.read_metadata(self.path(path)).num_rows
                        con.execute(
                            f"INSERT INTO {PARTITIONS} VALUES (?, ?, ?, ?, 'catalog rebuild', ?)",
                            [table, key, path, rows, utc_now()],
                        )
                con.execute(f"SET file_search_path = {_sql_string(str(self.root))}")
                build_catalog(con, live, self.root)
                check_schema_version(con, self.root)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            os.replace(fresh, self.catalog_path)
            _fsync_dir(self.root)
            return {table: live.paths(table) for table in [*live.files, *live.partitions]}


def _create_manifest(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {MANIFEST} (table_name VARCHAR PRIMARY KEY, path VARCHAR "
        "NOT NULL, n_rows BIGINT NOT NULL, job VARCHAR NOT NULL, committed_at TIMESTAMPTZ "
        "NOT NULL)"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {RETIRED} (path VARCHAR PRIMARY KEY, retired_at "
        "TIMESTAMPTZ NOT NULL)"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {PARTITIONS} (table_name VARCHAR NOT NULL, partition VARCHAR "
        "NOT NULL, path VARCHAR NOT NULL, n_rows BIGINT NOT NULL, job VARCHAR NOT NULL, "
        "committed_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (table_name, partition))"
    )


def check_schema_version(con: duckdb.DuckDBPyConnection, root: Path) -> int:
    versions = [v for (v,) in con.execute("SELECT version FROM schema_version").fetchall()]
    if not versions:
        raise SchemaVersionError(
            f"the warehouse at {root} records no schema version (tables/schema_version/ is empty "
            "or missing); it was not written by featurestore, or was damaged. Recreate it by "
            "re-running the jobs, or restore tables/schema_version/ from a backup."
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


class Writer:
    """What one job writes: table rows and directories, committed together or not at all."""

    def __init__(self, warehouse: Warehouse, job: str):
        self.warehouse = warehouse
        self.job = job
        self._rows: dict[str, list[pa.Table]] = {}
        self._replace: dict[str, list[dict]] = {}  # table -> filters whose old rows are dropped
        # Partitioned tables: table -> partition key -> (file in tmp/ holding it, rows)
        self._partitions: dict[str, dict[str, tuple[Path, int]]] = {}
        self._dirs: dict[Path, Path | None] = {}  # final path -> staged temp path (None: remove)
        self._created: list[Path] = []  # files/dirs to delete if the commit does not happen
        self._expired: list[str] = []  # retired files past their grace, deleted after commit
        self._committed = False

    def put(self, table: str, rows: pa.Table | list[dict],
            replace_where: dict | None = None) -> None:
        """Add rows to a table; at commit they replace existing rows with the same key.

        `replace_where` ({column: value}) also drops every existing row that matches it: a job
        that owns a whole slice of a table (all checkpoints of a run) replaces the slice.
        Rows of a partitioned table replace whole partitions instead, and are written to tmp/
        right away, so a job can put a large table one partition at a time in bounded memory.
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
            part = rows.filter(mask)
            temp = self.warehouse.tmp_dir / f"{table.name}-{uuid.uuid4().hex}.parquet"
            write_partition_file(table, values, part, temp)
            self.adopt_partition(table.name, values, temp)

    def adopt_partition(self, table: str, values: dict, temp: Path) -> None:
        """Commit a partition file written to tmp/ by write_partition_file (e.g. by a worker
        process); it replaces the partition's live file."""
        table_spec = spec(table)
        key = partition_key(table_spec, values)
        for column, value in zip(table_spec.partition_by, json.loads(key)):
            check_name(str(value), f"{table}.{column} value (it names a partition folder)")
        parts = self._partitions.setdefault(table, {})
        if key in parts:
            raise FeaturestoreError(f"{self.job}: partition {table} {key} was written twice")
        stored = pq.read_schema(temp)
        if stored.metadata.get(PARTITION_KEY_METADATA, b"").decode() != key:
            raise FeaturestoreError(f"{self.job}: {temp} does not hold partition {table} {key}")
        self._created.append(temp)
        parts[key] = (temp, pq.read_metadata(temp).num_rows)

    def stage_dir(self, relative: str) -> Path:
        """A fresh temp directory to fill; at commit it becomes <root>/<relative>."""
        final = self.warehouse.path(relative)
        staged = self.warehouse.tmp_dir / f"dir-{uuid.uuid4().hex}"
        staged.mkdir(parents=True)
        self._dirs[final] = staged
        self._created.append(staged)
        return staged

    def remove_dir(self, relative: str) -> None:
        """Delete <root>/<relative> at commit (a job replacing what it wrote before)."""
        self._dirs[self.warehouse.path(relative)] = None

    def commit(self) -> None:
        wh = self.warehouse
        first_write = not wh.exists()
        if first_write:
            wh._check_catalog_not_lost()
            self.put("schema_version", [{
                "version": SCHEMA_VERSION,
                "featurestore_version": package_version(),
                "created_at": utc_now(),
            }])
        live = Manifest({}, {}, set()) if first_write else wh.manifest()

        # 1. New table files, merged with the rows they do not replace; partition files moved
        # next to them under new names.
        new_files: dict[str, tuple[str, int]] = {}
        for table, parts in self._rows.items():
            merged = _merge(live.files.get(table) and wh.path(live.files[table]),
                            pa.concat_tables(parts), spec(table), self._replace.get(table, []))
            new_files[table] = (self._write_parquet(table, merged), merged.num_rows)
        new_partitions: dict[tuple[str, str], tuple[str, int]] = {}
        for table, parts in self._partitions.items():
            for key, (temp, n_rows) in parts.items():
                new_partitions[table, key] = (self._move_into_tables(table, temp, key), n_rows)
        dropped_partitions = [
            (table, key) for table, filters in self._replace.items() if spec(table).partition_by
            for key in live.partitions.get(table, {})
            if (table, key) not in new_partitions
            and any(_partition_matches(spec(table), key, where) for where in filters)
        ]
        # Partition files of an older warehouse, flat in tables/<table>/, get a hard link in
        # their partition folder (no copy); the flat name is retired like a replaced file.
        for table in live.partitions:
            for key in live.legacy_partitions(spec(table)):
                if (table, key) not in new_partitions and (table, key) not in dropped_partitions:
                    temp = wh.tmp_dir / f"{table}-{uuid.uuid4().hex}.parquet"
                    os.link(wh.path(live.partitions[table][key]), temp)
                    self._created.append(temp)
                    n_rows = pq.read_metadata(temp).num_rows
                    new_partitions[table, key] = (self._move_into_tables(table, temp, key),
                                                  n_rows)

        # 2. Staged directories into place; the old contents wait in tmp/ until the catalog
        # commit, so a failure before it can put them back.
        moved_in: list[tuple[Path, Path | None]] = []  # (final path, where its old contents are)
        try:
            for final, staged in self._dirs.items():
                final.parent.mkdir(parents=True, exist_ok=True)
                old = None
                if final.exists():
                    old = wh.tmp_dir / f"old-{uuid.uuid4().hex}"
                    os.rename(final, old)
                if staged is not None:
                    os.rename(staged, final)
                moved_in.append((final, old))
                _fsync_dir(final.parent)

            # 3. One transaction: manifest and views.
            con = duckdb.connect(":memory:")
            try:
                wh._attach_catalog(con, read_only=False)
                con.execute("USE catalog")
                con.execute(f"SET file_search_path = {_sql_string(str(wh.root))}")
                con.execute("BEGIN TRANSACTION")
                _create_manifest(con)
                now = utc_now()
                for table, (path, n_rows) in new_files.items():
                    if table in live.files:
                        con.execute(f"INSERT INTO {RETIRED} VALUES (?, ?)",
                                    [live.files[table], now])
                    con.execute(
                        f"INSERT OR REPLACE INTO {MANIFEST} VALUES (?, ?, ?, ?, ?)",
                        [table, path, n_rows, self.job, now],
                    )
                    live.files[table] = path
                for table, key in dropped_partitions:
                    con.execute(f"INSERT INTO {RETIRED} VALUES (?, ?)",
                                [live.partitions[table].pop(key), now])
                    con.execute(f"DELETE FROM {PARTITIONS} WHERE table_name = ? AND partition = ?",
                                [table, key])
                for (table, key), (path, n_rows) in new_partitions.items():
                    parts = live.partitions.setdefault(table, {})
                    if key in parts:
                        con.execute(f"INSERT INTO {RETIRED} VALUES (?, ?)", [parts[key], now])
                    con.execute(
                        f"INSERT OR REPLACE INTO {PARTITIONS} VALUES (?, ?, ?, ?, ?, ?)",
                        [table, key, path, n_rows, self.job, now],
                    )
                    parts[key] = path
                self._expired = [p for (p,) in con.execute(
                    f"DELETE FROM {RETIRED} WHERE retired_at < ? RETURNING path",
                    [now - RETIRED_GRACE]).fetchall()]
                build_catalog(con, live, wh.root)
                con.execute("COMMIT")
                self._committed = True
                con.execute("USE memory")
                con.execute("DETACH catalog")
            finally:
                con.close()
        except BaseException:
            if not self._committed:
                for final, old in reversed(moved_in):
                    shutil.rmtree(final, ignore_errors=True)
                    if old is not None:
                        os.rename(old, final)
            raise
        for _, old in moved_in:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def _write_parquet(self, table: str, rows: pa.Table) -> str:
        """Write to tmp/, fsync, rename into tables/<table>/ under a new, time-ordered name."""
        temp = self.warehouse.tmp_dir / f"{table}-{uuid.uuid4().hex}.parquet"
        pq.write_table(rows, temp, compression="zstd",
                       row_group_size=spec(table).row_group_size)
        _fsync_file(temp)
        return self._move_into_tables(table, temp)

    def _move_into_tables(self, table: str, temp: Path, partition: str | None = None) -> str:
        """Rename into tables/<table>/ (a partition: into its folder) under a new name."""
        wh = self.warehouse
        folder = wh.tables_dir / table
        if partition is not None:
            folder = folder / partition_folder(spec(table), partition)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        os.rename(temp, final)
        self._created.append(final)
        # The new name, and any folder just created for it, made durable.
        for directory in [folder, *folder.parents]:
            _fsync_dir(directory)
            if directory == wh.tables_dir / table:
                break
        return str(final.relative_to(wh.root))

    def discard(self) -> None:
        """Delete what a job that did not commit wrote; after a commit, expired retired files."""
        if self._committed:
            for path in self._expired:
                self.warehouse.path(path).unlink(missing_ok=True)
            return
        for path in self._created:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()


def write_partition_file(table: TableSpec, values: dict, rows: pa.Table, path: Path) -> None:
    """One partition of a partitioned table as a Parquet file, sorted by the table's sort_by
    columns, with the partition named in its metadata (so the catalog can be rebuilt from it)."""
    rows = rows.select(table.arrow_schema.names).cast(table.arrow_schema)
    if table.sort_by and not _is_sorted(rows, table.sort_by):
        rows = rows.sort_by([(c, "ascending") for c in table.sort_by])
    metadata = {PARTITION_KEY_METADATA: partition_key(table, values).encode()}
    rows = rows.replace_schema_metadata({**(rows.schema.metadata or {}), **metadata})
    # Dictionary pages only for the partition columns, which hold one value: for the sorted
    # numeric columns plain pages under zstd are smaller and a fifth faster to write.
    pq.write_table(rows, path, compression="zstd", row_group_size=table.row_group_size,
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


def _partition_matches(table: TableSpec, key: str, where: dict) -> bool:
    values = dict(zip(table.partition_by, json.loads(key)))
    return all(values[column] == value for column, value in where.items())


def _merge(existing: Path | None, new: pa.Table, table: TableSpec,
           replace_where: list[dict]) -> pa.Table:
    """Existing rows not replaced (same key, or matching a replace_where filter), plus `new`."""
    keys = list(zip(*(new[c].to_pylist() for c in table.key)))
    if len(set(keys)) != len(keys):
        raise FeaturestoreError(
            f"rows for {table.name} repeat a key ({', '.join(table.key)}); each must be unique"
        )
    if existing is not None:
        old = _read_table_file(existing, table)
        replaced = set(keys)
        keep = [k not in replaced for k in zip(*(old[c].to_pylist() for c in table.key))]
        for where in replace_where:
            matches = zip(*(old[c].to_pylist() for c in where))
            keep = [k and m != tuple(where.values()) for k, m in zip(keep, matches)]
        new = pa.concat_tables([old.filter(pa.array(keep, pa.bool_())), new])
    return new.sort_by([(c, "ascending") for c in table.sort_by or table.key])


def _read_table_file(path: Path, table: TableSpec) -> pa.Table:
    """A table's file in the DDL's schema, columns added since it was written at their DEFAULT."""
    present = set(pq.read_schema(path).names)
    if present >= set(table.arrow_schema.names):
        return pq.read_table(path).select(table.arrow_schema.names).cast(table.arrow_schema)
    con = duckdb.connect(":memory:")
    try:
        select = ", ".join(c.select(c.name in present) for c in table.columns)
        rows = con.sql(f"SELECT {select} FROM read_parquet({_sql_string(str(path))})")
        return rows.to_arrow_table().cast(table.arrow_schema)
    finally:
        con.close()


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


def connect(warehouse: str | os.PathLike | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection on the warehouse (default: $FEATURESTORE_WAREHOUSE or ./warehouse).

    Every table is a view over its Parquet file, with the views and macros of sql/ and the Python
    UDFs of featurestore.queries.udfs. The connection is in-memory: it holds no lock on the
    warehouse, and it sees the warehouse as it was when it was opened.
    """
    return Warehouse(warehouse).connect()


@dataclass
class InitResult:
    path: str
    created: bool  # False: a warehouse was already there, and nothing changed
    schema_version: int
    tables: int

    def to_dict(self) -> dict:
        return {"path": self.path, "created": self.created,
                "schema_version": self.schema_version, "tables": self.tables}


def init_warehouse(warehouse: str | os.PathLike | None = None) -> InitResult:
    """Create an empty warehouse (its catalog, with every table empty, and the schema version)
    in a missing or empty folder. A warehouse already there is left as it is. Jobs create the
    warehouse themselves on their first commit; this makes it explicit."""
    wh = Warehouse(warehouse)
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
    """Every table and view: name, kind, row count and description."""
    con = connect(warehouse)
    try:
        objects = con.execute(
            "SELECT view_name, comment FROM duckdb_views() WHERE NOT internal "
            "AND schema_name = 'main' ORDER BY view_name"
        ).fetchall()
        tables = table_specs()
        result = []
        for name, comment in objects:
            (rows,) = con.execute(f"SELECT count(*) FROM {name}").fetchall()[0]
            result.append({"name": name, "kind": "table" if name in tables else "view",
                           "rows": rows, "description": comment or ""})
        return sorted(result, key=lambda t: (t["kind"] != "table", t["name"]))
    finally:
        con.close()


def describe_table(table: str, warehouse: str | os.PathLike | None = None) -> list[dict]:
    """Columns of a table or view: name, type and description."""
    con = connect(warehouse)
    try:
        rows = con.execute(
            "SELECT column_name, data_type, comment FROM duckdb_columns() "
            "WHERE table_name = ? AND schema_name = 'main' ORDER BY column_index", [table]
        ).fetchall()
        if not rows:
            names = [n for (n,) in con.execute(
                "SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'"
                " ORDER BY view_name").fetchall()]
            raise NotFoundError(f"unknown table {table!r}; tables and views: {', '.join(names)}")
        return [{"column": n, "type": t, "description": c or ""} for n, t, c in rows]
    finally:
        con.close()
