"""The warehouse's tables as this featurestore declares them: the DDL of sql/tables/ parsed into
TableSpecs, the views and macros of sql/ in the order they are created, and the schema version.

Separate from the catalog (featurestore.warehouse) and the writer (featurestore.writer) because
both build on it and it needs neither: it reads only the SQL files and a DuckDB connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import duckdb
import pyarrow as pa

from featurestore.errors import NotFoundError, SchemaVersionError
from featurestore.lake import LAKE

SCHEMA_VERSION = 3
KNOWN_SCHEMA_VERSIONS = frozenset({3})


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
    with duckdb.connect(":memory:") as scratch:
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
        rollback(con)
        for table in table_specs().values():
            present = _columns_at(con, table.name, snapshot) if snapshot is not None else None
            con.execute(_table_view_sql(table, snapshot, present))
    for table in table_specs().values():
        con.execute(f"COMMENT ON VIEW {table.name} IS {sql_string(table.comment)}")
        for c in table.columns:
            con.execute(f"COMMENT ON COLUMN {table.name}.{c.name} IS {sql_string(c.comment)}")
    # Views call macros, so macros come first; a table macro that reads a view (DuckDB binds it
    # when it is created) says so on a `-- depends_on:` line and comes after the views.
    macros = sql_text("macros")
    for _, text in macros:
        if not _declared(text, "depends_on"):
            con.execute(text)
    for _, text in views_in_order():
        con.execute(text)
    for _, text in macros:
        if _declared(text, "depends_on"):
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


def sql_string(value: str) -> str:
    """`value` as a SQL string literal, for the statements DuckDB takes no parameters in
    (COMMENT ON, ATTACH, SET)."""
    return "'" + value.replace("'", "''") + "'"


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the connection's transaction, if a failed statement left one open."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # the failed COMMIT already ended the transaction


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


@cache
def package_version() -> str:
    from importlib.metadata import version

    return version("featurestore")
