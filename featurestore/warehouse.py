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
import sqlite3
import sys
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb

from featurestore.errors import (
    DamagedCatalogError,
    FeaturestoreError,
    NotFoundError,
    SchemaVersionError,
)
from featurestore.lake import (
    DATA_FOLDER,
    LAKE,
    CatalogLocation,
    attach_sql,
    catalog_location,
    lake_connection,
    prepare_sqlite,
    sqlite_catalog_damage,
    sqlite_has_ducklake,
)
from featurestore.results import Result
from featurestore.schema import (
    SCHEMA_VERSION,
    build_views,
    check_schema_version,
    spec,
    sql_string,
    table_specs,
)
from featurestore.scratch import TRAINING_FOLDER, newest_mtime, sweep
from featurestore.settings import resolve_warehouse
from featurestore.sql_functions import register_sql_functions
from featurestore.writer import (
    COMMIT_ATTEMPTS,
    COMMIT_TOKENS,
    COMMIT_WAIT_SECONDS,
    Writer,
    is_commit_race,
)

BACKUP_SUFFIX = ".backup"
# The catalog of schema 2: a manifest of Parquet files in one DuckDB file (see migrate.py).
LEGACY_CATALOG = "featurestore.duckdb"
# Scratch of a killed job from a featurestore that did not lock its scratch (featurestore.scratch)
# is deleted by the next writer once this old; a job still running holds its lock.
LOCKLESS_SCRATCH_AGE = timedelta(days=1)
# The jobs this process committed, in order: what the CLI reports as kept when a later step fails.
_committed_jobs: list[str] = []


def committed_jobs() -> list[str]:
    """The jobs this process has committed so far, oldest first."""
    return list(_committed_jobs)


# ---------------------------------------------------------------------------------------------
# What a new fit or a new training run under an existing name makes stale


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
    with wh.connect() as con:  # inside the writer: an empty warehouse if there is none yet
        stale = bases_computed_from(con, run)
    for basis in stale:
        drop_basis(writer, basis)


# ---------------------------------------------------------------------------------------------
# The warehouse


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
            con.execute(f"SET file_search_path = {sql_string(str(self.root))}")
            attach = attach_sql(self.catalog, self.data_path, read_only=read_only, create=create)
            for attempt in range(COMMIT_ATTEMPTS):  # a catalog being created or recovered
                try:
                    con.execute(attach)
                    break
                except duckdb.Error as error:
                    if not is_commit_race(error) or attempt + 1 == COMMIT_ATTEMPTS:
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
        register_sql_functions(con, self)
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
    Python UDFs of featurestore.sql_functions. The connection is in memory and read-only: it
    holds no lock, and it sees the warehouse as it was when it was opened, or at `as_of` (a
    snapshot id from `featurestore snapshots`, or a time).
    """
    return Warehouse(warehouse, catalog).connect(as_of)


@dataclass
class InitResult(Result):
    path: str
    created: bool  # False: a warehouse was already there, and nothing changed
    schema_version: int
    tables: int

    def summary(self) -> str:
        if self.created:
            return (f"created an empty warehouse at {self.path} (schema version "
                    f"{self.schema_version}, {self.tables} tables)")
        return (f"{self.path} is already a warehouse (schema version {self.schema_version}); "
                "nothing changed")


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
    with wh.connect() as con:
        version = check_schema_version(con, wh.root)
    return InitResult(str(wh.root), created, version, len(table_specs()))


def list_tables(warehouse: str | os.PathLike | None = None) -> list[dict]:
    """Every table and view: name, kind, row count, description and status ('ok', or why it
    cannot be read: a table file missing or not the size it was written at, or the error its
    query gives). A damaged table does not stop the others from being listed."""
    from featurestore.integrity import table_files

    wh = Warehouse(warehouse)
    with wh.connect() as con:
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


def describe_table(table: str, warehouse: str | os.PathLike | None = None) -> list[dict]:
    """Columns of a table or view: name, type and description."""
    with connect(warehouse) as con:
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
