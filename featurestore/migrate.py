"""Convert a warehouse of schema 2 (a manifest of Parquet files in featurestore.duckdb) to the
DuckLake layout of schema 3, in place.

Every live table file the old manifest names is copied into the lake in one transaction (one
snapshot, "catalog migrate"), so a kill leaves the old warehouse as it was and the next run
starts again. Artefact folders (runs/, activations/, bases/) stay where they are: the rows keep
pointing at them. Once committed, the old catalog and table files move to schema2-backup/,
which can be deleted when the new warehouse has been checked.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import duckdb
import pyarrow.parquet as pq

from featurestore.errors import FeaturestoreError
from featurestore.lake import LAKE
from featurestore.results import Result
from featurestore.schema import rollback, sql_string, table_specs
from featurestore.warehouse import LEGACY_CATALOG, Warehouse
from featurestore.writer import PARTITION_KEY_METADATA, commit_info, ensure_schema

BACKUP_FOLDER = "schema2-backup"


@dataclass
class MigrateResult(Result):
    path: str
    migrated: bool  # False: nothing to do (no schema-2 catalog, or already converted)
    tables: dict[str, int]  # table -> rows copied
    backup: str | None

    def summary(self) -> str:
        if self.migrated:
            return (f"converted {self.path} to DuckLake ({len(self.tables)} tables, "
                    f"{sum(self.tables.values())} rows); the old files are in {self.backup}")
        return f"{self.path} holds no schema-2 catalog to convert; nothing changed"


def migrate_warehouse(warehouse: Warehouse | str | None = None,
                      catalog: str | None = None) -> MigrateResult:
    wh = warehouse if isinstance(warehouse, Warehouse) else Warehouse(warehouse, catalog)
    if not wh.legacy_catalog.exists():
        return MigrateResult(str(wh.root), False, {}, None)
    if wh.exists():
        _back_up(wh)  # converted before, killed before the old files were moved aside
        return MigrateResult(str(wh.root), False, {}, str(wh.root / BACKUP_FOLDER))
    live = _legacy_files(wh)
    con = wh._open(read_only=False, create=True)
    copied: dict[str, int] = {}
    try:
        con.execute("BEGIN TRANSACTION")
        con.execute(f"CALL {LAKE}.set_commit_message('featurestore', 'catalog migrate', "
                    "extra_info => ?)", [commit_info()])
        ensure_schema(con)
        for table in table_specs().values():
            paths = live.get(table.name, [])
            if table.name == "schema_version" or not paths:
                continue
            files = ", ".join(sql_string(str(wh.path(p))) for p in paths)
            present = {name for (name,) in con.execute(
                f"SELECT name FROM parquet_schema([{files}])").fetchall()}
            select = ", ".join(_column_expression(c, c.name in present) for c in table.columns)
            names = ", ".join(c.name for c in table.columns)
            (inserted,) = con.execute(
                f"INSERT INTO {LAKE}.{table.name} ({names}) SELECT {select} "
                f"FROM read_parquet([{files}], union_by_name = true)").fetchone()
            copied[table.name] = int(inserted)
        con.execute("COMMIT")
    except duckdb.Error as error:
        rollback(con)
        raise FeaturestoreError(f"catalog migrate: the conversion of {wh.root} failed and the "
                                f"schema-2 warehouse is unchanged: {error}") from None
    finally:
        con.close()
    _back_up(wh)
    return MigrateResult(str(wh.root), True, copied, str(wh.root / BACKUP_FOLDER))


def _column_expression(column, present: bool) -> str:
    """A column of the old files in the DDL's type. Files of one table may differ in columns
    (some written before a column was added): union_by_name reads a missing one as NULL, and
    the DDL's DEFAULT stands in for it, as the schema-2 views did."""
    if not present:
        return f"CAST({column.default or 'NULL'} AS {column.type})"
    value = f"coalesce({column.name}, {column.default})" if column.default else column.name
    return f"CAST({value} AS {column.type})"


def _legacy_files(wh: Warehouse) -> dict[str, list[str]]:
    """table -> live files (relative to the root) of the schema-2 warehouse: those its manifest
    names, or, where this DuckDB cannot open the catalog (a newer DuckDB wrote it), the newest
    file of each table and of each partition, as the files alone tell."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH {sql_string(str(wh.legacy_catalog))} AS old (READ_ONLY)")
    except duckdb.Error:
        con.close()
        return _newest_files(wh)
    try:
        live: dict[str, list[str]] = {}
        for table, path in con.execute("SELECT table_name, path FROM old._manifest").fetchall():
            live.setdefault(table, []).append(path)
        for table, path in con.execute(
                "SELECT table_name, path FROM old._partitions ORDER BY partition").fetchall():
            live.setdefault(table, []).append(path)
        return live
    except duckdb.Error as error:
        raise FeaturestoreError(
            f"catalog migrate: cannot read the schema-2 catalog {wh.legacy_catalog}: {error}. "
            "Restore it from a backup, or re-run the jobs into a new warehouse.") from None
    finally:
        con.close()


def _newest_files(wh: Warehouse) -> dict[str, list[str]]:
    """Schema 2 wrote every file under a new, time-ordered name (part-<ns>-<id>.parquet) and
    kept a replaced one for an hour: the newest file of a table, or of a partition (named in
    each partition file's metadata), is the live one."""
    live: dict[str, list[str]] = {}
    for table in table_specs().values():
        folder = wh.root / "tables" / table.name
        if not folder.exists():
            continue
        files = sorted(folder.rglob("part-*.parquet"), key=lambda f: f.name)
        if table.partition_by:
            newest: dict[bytes, str] = {}
            for file in files:
                metadata = pq.read_schema(file).metadata or {}
                newest[metadata.get(PARTITION_KEY_METADATA, file.name.encode())] = str(
                    file.relative_to(wh.root))
            live[table.name] = sorted(newest.values())
        elif files:
            live[table.name] = [str(files[-1].relative_to(wh.root))]
    if "schema_version" not in live:
        raise FeaturestoreError(
            f"catalog migrate: {wh.root} has a {LEGACY_CATALOG} that this DuckDB cannot read "
            "and no tables/schema_version/ files: it is not a featurestore warehouse of "
            "schema 2.")
    return live


def _back_up(wh: Warehouse) -> None:
    """Move the schema-2 catalog and table files to schema2-backup/ (after the commit)."""
    backup = wh.root / BACKUP_FOLDER
    backup.mkdir(exist_ok=True)
    for name in ("tables", LEGACY_CATALOG, ".lock"):
        source = wh.root / name
        if source.exists():
            if name == ".lock":
                source.unlink()
            else:
                shutil.move(str(source), str(backup / name))
    fd = os.open(wh.root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
