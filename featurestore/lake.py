"""Where a warehouse's DuckLake catalog lives, and how a DuckDB connection reaches it.

A warehouse is a DuckLake: a SQL catalog (which tables exist, which Parquet files hold their rows
at which snapshot) plus the Parquet files themselves. The catalog is, by default, a SQLite file in
the warehouse folder, which several local processes can read and write at once; for many
machines it is a PostgreSQL database, named with `--catalog` or $FEATURESTORE_CATALOG:

    postgres:dbname=featurestore host=db.cluster user=me     (libpq key=value)
    postgresql://me@db.cluster:5432/featurestore             (libpq URI)
    sqlite:/shared/wh/catalog.sqlite                         (another SQLite file)

The DuckDB extensions (ducklake, sqlite_scanner, postgres_scanner) are loaded from the Python
wheels installed with featurestore, so nothing is downloaded; where a wheel is missing, DuckDB's
own INSTALL is tried, which needs a network.
"""

from __future__ import annotations

import importlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import duckdb

from featurestore.errors import FeaturestoreError

CATALOG_ENV = "FEATURESTORE_CATALOG"
SQLITE_CATALOG_FILE = "catalog.sqlite"
DATA_FOLDER = "data"
LAKE = "lake"  # the name the DuckLake is attached under in every connection

# Set once, when the catalog is created. Files DuckLake writes itself (tables, compaction) use
# these; partition files that featurestore writes (feature_activations) use the same settings
# (write_partition_file). No data inlining: every row lives in a Parquet file, none in the
# catalog database, so any Parquet reader sees the whole warehouse.
LAKE_OPTIONS = {"parquet_compression": "zstd", "parquet_row_group_size": 16_384,
                "data_inlining_row_limit": 0}


@dataclass(frozen=True)
class CatalogLocation:
    """Which database holds the catalog: kind 'sqlite' (path) or 'postgres' (libpq string)."""

    kind: str
    target: str

    def describe(self) -> str:
        return self.target if self.kind == "sqlite" else f"PostgreSQL ({_redacted(self.target)})"

    def attach_string(self) -> str:
        return f"ducklake:{self.kind}:{self.target}"

    def exists(self) -> bool:
        """Whether the catalog was created (cheap for SQLite; PostgreSQL is always asked)."""
        return self.kind != "sqlite" or Path(self.target).exists()


def catalog_location(root: Path, catalog: str | None = None) -> CatalogLocation:
    """The catalog for the warehouse at `root`: `catalog`, else $FEATURESTORE_CATALOG, else
    <root>/catalog.sqlite."""
    value = catalog or os.environ.get(CATALOG_ENV)
    if not value:
        return CatalogLocation("sqlite", str(root / SQLITE_CATALOG_FILE))
    if value.startswith(("postgres://", "postgresql://")):
        return CatalogLocation("postgres", value)
    for prefix in ("postgres:", "postgresql:"):
        if value.startswith(prefix):
            return CatalogLocation("postgres", value[len(prefix):])
    if value.startswith("sqlite:"):
        value = value[len("sqlite:"):]
    if value.endswith((".sqlite", ".db", ".sqlite3")):
        return CatalogLocation("sqlite", str(Path(value).expanduser().resolve()))
    raise FeaturestoreError(
        f"--catalog / ${CATALOG_ENV} = {value!r} is not a catalog featurestore knows: give "
        "'postgres:dbname=NAME host=HOST', 'postgresql://USER@HOST/NAME', or a SQLite file "
        "ending in .sqlite; leave it unset for the default catalog.sqlite in the warehouse."
    )


def _redacted(conninfo: str) -> str:
    """A libpq string without its password, for messages."""
    parts = [p if not p.lower().startswith("password=") else "password=***"
             for p in conninfo.split()]
    text = " ".join(parts)
    if "://" in text and "@" in text:  # postgresql://user:secret@host
        scheme, rest = text.split("://", 1)
        credentials, host = rest.split("@", 1)
        text = f"{scheme}://{credentials.split(':', 1)[0]}@{host}"
    return text


# Extension files whose signature DuckDB has checked in this process, with their size and time.
_verified: set[tuple[str, int, int]] = set()


def lake_connection(kind: str) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB connection with the extensions for a `kind` catalog loaded.

    DuckDB checks an extension's signature on every LOAD, hashing the whole file: for DuckLake's
    large extension that costs more than a typical query on the open warehouse. The first
    connection of a process loads the files with the check; later ones load the same, unchanged
    files without it. A connection that runs SQL from someone else must not rely on this: it
    should also turn off external access (which stops LOAD altogether)."""
    files = _wheel_files(kind)
    if files and all(_identity(f) in _verified for f in files):
        con = duckdb.connect(":memory:", config={"allow_unsigned_extensions": "true"})
    else:
        con = duckdb.connect(":memory:")
    try:
        load_extensions(con, kind)
    except BaseException:
        con.close()
        raise
    _verified.update(_identity(f) for f in files)
    return con


def _wheel_files(kind: str) -> list[str]:
    """Both extension files from their wheels, or none (then DuckDB installs them itself)."""
    files = [_wheel_extension(name) for name in ("ducklake", _scanner(kind))]
    return [f for f in files if f is not None] if all(files) else []


def _identity(path: str) -> tuple[str, int, int]:
    stat = os.stat(path)
    return path, stat.st_size, stat.st_mtime_ns


def _scanner(kind: str) -> str:
    return "sqlite_scanner" if kind == "sqlite" else "postgres_scanner"


def load_extensions(con: duckdb.DuckDBPyConnection, kind: str) -> None:
    """Load ducklake and the catalog's scanner into `con`, from their wheels when installed."""
    for name in ("ducklake", _scanner(kind)):
        path = _wheel_extension(name)
        try:
            if path is not None:
                con.execute(f"LOAD '{path}'")
            else:
                con.execute(f"INSTALL {name}")
                con.execute(f"LOAD {name}")
        except duckdb.Error as error:
            raise FeaturestoreError(
                f"cannot load the DuckDB extension {name!r}: {error}. Install its wheel beside "
                f"DuckDB {duckdb.__version__} (pip install 'duckdb-extension-"
                f"{name.replace('_', '-')}=={duckdb.__version__}') or give DuckDB network "
                "access so it can INSTALL it."
            ) from None


def _wheel_extension(name: str) -> str | None:
    """The extension file shipped in the duckdb-extension-<name> wheel for this DuckDB."""
    try:
        module = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError:
        return None
    path = (Path(module.__file__).parent / "extensions" / f"v{duckdb.__version__}"
            / f"{name}.duckdb_extension")
    return str(path) if path.exists() else None


def prepare_sqlite(path: Path) -> None:
    """Create the SQLite catalog file in WAL mode before DuckLake first opens it: readers then
    never block a committing writer (WAL is a property of the file, kept from then on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()


def sqlite_has_ducklake(path: Path) -> bool:
    """Whether the SQLite file holds DuckLake's tables (DuckLake creates them all at once)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        return bool(db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                               "name = 'ducklake_metadata'").fetchall())
    except sqlite3.Error:
        return False
    finally:
        db.close()


def sqlite_catalog_damage(path: Path) -> str | None:
    """Why a SQLite catalog file cannot serve as a catalog (empty, not SQLite, pages damaged, no
    DuckLake tables in it), or None. Reads the whole file (SQLite's quick_check): for
    diagnosing a catalog that failed to open, not for every open."""
    if path.stat().st_size == 0:
        return "it is empty (0 bytes)"
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            (verdict,) = db.execute("PRAGMA quick_check(1)").fetchone()
            if verdict != "ok":
                return f"SQLite reports it damaged ({verdict})"
            if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                              "name = 'ducklake_metadata'").fetchall():
                return "it holds no DuckLake tables"
        finally:
            db.close()
    except sqlite3.Error as error:
        return f"SQLite cannot read it ({error})"
    return None


def attach_sql(location: CatalogLocation, data_path: Path | None, *, read_only: bool,
               create: bool, snapshot_version: int | None = None,
               snapshot_time: str | None = None) -> str:
    """The ATTACH statement for the lake. `data_path`: where this process finds the data files
    (the warehouse's data/ folder). DuckLake stores file paths relative to it, so a warehouse
    that moved, or is mounted elsewhere on another machine, reads the same files."""
    options = [f"CREATE_IF_NOT_EXISTS {'true' if create else 'false'}"]
    if data_path is not None:
        options.append(f"DATA_PATH {_quote(str(data_path) + os.sep)}")
        options.append("OVERRIDE_DATA_PATH true")
    if read_only:
        options.append("READ_ONLY")
    if snapshot_version is not None:
        options.append(f"SNAPSHOT_VERSION {int(snapshot_version)}")
    if snapshot_time is not None:
        options.append(f"SNAPSHOT_TIME {_quote(snapshot_time)}")
    return f"ATTACH {_quote(location.attach_string())} AS {LAKE} ({', '.join(options)})"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
