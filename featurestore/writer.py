"""The Writer: what one job writes (table rows, partition files, artefact folders), committed as
one DuckLake snapshot, and what its commit needs: the lake tables brought up to the DDL, the
commit tokens that make concurrent commits to one table conflict, and retries of a commit that
lost a race. How commits stay atomic is described in featurestore.warehouse.

Separate from the catalog (featurestore.warehouse) so that the write path reads on its own. It
builds on the schema (featurestore.schema), not on the catalog: the catalog makes Writers, and
hands each the Warehouse it writes to.
"""

from __future__ import annotations

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
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurestore.errors import FeaturestoreError, WarehouseBusyError
from featurestore.lake import DATA_FOLDER, LAKE, LAKE_OPTIONS
from featurestore.schema import (
    SCHEMA_VERSION,
    TableSpec,
    package_version,
    partition_folder,
    partition_key,
    rollback,
    spec,
    sql_string,
    table_specs,
)
from featurestore.scratch import Claim, remove_tree
from featurestore.settings import check_name

if TYPE_CHECKING:
    from featurestore.warehouse import Warehouse

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


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                            f"{sql_string(column.comment)}")
    if first:
        con.execute(f"INSERT INTO {LAKE}.schema_version VALUES (?, ?, ?)",
                    [SCHEMA_VERSION, package_version(), utc_now()])


def _lake_columns(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
    rows = con.execute("SELECT table_name, column_name FROM duckdb_columns() "
                       "WHERE database_name = ? AND schema_name = 'main'", [LAKE]).fetchall()
    columns: dict[str, set[str]] = {}
    for table, column in rows:
        columns.setdefault(table, set()).add(column)
    return columns


def _create_lake_table(con: duckdb.DuckDBPyConnection, table: TableSpec) -> None:
    """The DDL's table in the lake. DuckLake has no PRIMARY KEY: the Writer keeps keys unique
    by deleting the rows a commit replaces. Partitioned tables get one folder of files per
    partition; every table's files are sorted by its sort_by columns (else its key)."""
    columns = ", ".join(
        f"{c.name} {c.type}{'' if c.nullable else ' NOT NULL'}"
        + (f" DEFAULT {c.default}" if c.default else "") for c in table.columns)
    con.execute(f"CREATE TABLE {LAKE}.{table.name} ({columns})")
    con.execute(f"COMMENT ON TABLE {LAKE}.{table.name} IS {sql_string(table.comment)}")
    for c in table.columns:
        con.execute(f"COMMENT ON COLUMN {LAKE}.{table.name}.{c.name} IS "
                    f"{sql_string(c.comment)}")
    if table.partition_by:
        con.execute(f"ALTER TABLE {LAKE}.{table.name} SET PARTITIONED BY "
                    f"({', '.join(table.partition_by)})")
    order = table.sort_by or table.key
    if order:
        con.execute(f"ALTER TABLE {LAKE}.{table.name} SET SORTED BY ({', '.join(order)})")


def is_commit_race(error: BaseException) -> bool:
    """Whether a commit failed because another writer committed first (worth a retry)."""
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
        may also be a SQL expression of the table's columns (see warehouse.UPSTREAM_BASIS).
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
                rollback(con)
                if self._drop_damaged_files(str(error)):
                    continue  # the job replaces rows of that table: run the commit again
                if is_commit_race(error) and attempt + 1 < COMMIT_ATTEMPTS:
                    time.sleep(random.uniform(low, min(high, low * 1.5 ** attempt)))
                    continue
                if is_commit_race(error):
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
    # numeric columns plain pages under zstd are smaller and faster to write.
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

