"""Read-only SQL on a warehouse: what `featurestore sql` runs, and what a web app should run.

A warehouse connection (`Warehouse.connect`) attaches the lake read-only, but DuckDB can do far
more than read it: COPY a result over a table's data file, ATTACH the catalog database and
delete from it, call DuckLake's maintenance functions (which delete files), read any file the
process can read (read_text('/etc/hostname')), install extensions. Three layers stop that:

1. Only queries run. Every statement must be a SELECT (to DuckDB, DESCRIBE, SHOW, SUMMARIZE,
   PIVOT ... IN (...) and the PRAGMAs that only report are SELECTs too) or an EXPLAIN of one.
2. Only table functions that read. DuckLake's maintenance (ducklake_cleanup_old_files,
   ducklake_add_data_files, ...), sqlite_query, query() and enable_logging are table functions
   called inside a SELECT, so every table function a query names must be on READ_FUNCTIONS or
   be one of the warehouse's own table macros.
3. No files outside the warehouse's data folder. External access is off, with data/ the one
   directory allowed (DuckLake reads its table files there; the catalog, attached before, stays
   reachable through the lake), and the configuration is then locked, so a query can neither
   turn it back on nor change any other setting.

Layer 3 alone would still let a query COPY over a data file (data/ must stay readable) and
layers 1 and 2 alone would not stop a file read by a function DuckDB adds later: each covers
what the others cannot. Python code (the UDFs of featurestore.sql_functions) is not bound by
DuckDB's settings.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime

import duckdb
import pyarrow as pa

from featurestore.errors import FeaturestoreError, QueryRefusedError, QueryTimeoutError
from featurestore.writer import damage_hint

TRUSTED_HINT = "pass --trusted to run it with full DuckDB access"
QUERY_STATEMENTS = "SELECT, EXPLAIN, DESCRIBE, SHOW, SUMMARIZE"

# Table functions that only read: generators, DuckDB's catalog, DuckLake's snapshot and file
# lists (also as lake.snapshots() etc.), and file readers, which layer 3 keeps inside data/.
READ_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    "histogram", "histogram_values",
    "duckdb_columns", "duckdb_constraints", "duckdb_databases", "duckdb_dependencies",
    "duckdb_extensions", "duckdb_functions", "duckdb_indexes", "duckdb_keywords",
    "duckdb_memory", "duckdb_optimizers", "duckdb_schemas", "duckdb_sequences",
    "duckdb_settings", "duckdb_tables", "duckdb_temporary_files", "duckdb_types",
    "duckdb_variables", "duckdb_views", "pragma_collations", "pragma_database_size",
    "pragma_metadata_info", "pragma_platform", "pragma_show", "pragma_storage_info",
    "pragma_table_info", "pragma_user_agent", "pragma_version", "pg_timezone_names",
    "icu_calendar_names",
    "ducklake_snapshots", "ducklake_current_snapshot", "ducklake_last_committed_snapshot",
    "ducklake_table_info", "ducklake_list_files", "ducklake_table_changes",
    "ducklake_table_insertions", "ducklake_table_deletions", "ducklake_options",
    "ducklake_settings", "snapshots", "current_snapshot", "last_committed_snapshot",
    "table_info", "table_changes", "table_insertions", "table_deletions", "options", "settings",
    "read_parquet", "parquet_scan", "parquet_metadata", "parquet_schema", "parquet_file_metadata",
    "parquet_kv_metadata", "parquet_full_metadata", "parquet_bloom_probe", "read_csv",
    "read_csv_auto", "sniff_csv", "read_json", "read_json_auto", "read_ndjson",
    "read_ndjson_auto", "read_json_objects", "read_json_objects_auto", "read_ndjson_objects",
    "read_text", "read_blob", "glob",
})
_EXPLAIN_OPTIONS = {"ANALYZE", "ANALYSE", "VERBOSE"}


def lock_down(con: duckdb.DuckDBPyConnection, data_path: os.PathLike | str) -> None:
    """Layer 3 on a warehouse connection: DuckDB reaches no file outside `data_path` (the
    warehouse's data folder) and loads no extension; then the configuration is locked, last, so
    no statement can undo it."""
    con.execute("SET python_enable_replacements = false")  # no Python variables as tables
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allowed_directories = ?", [[os.path.join(str(data_path), "")]])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def check_query(con: duckdb.DuckDBPyConnection, sql: str) -> list[duckdb.Statement]:
    """Layers 1 and 2: the statements of `sql`, each a query whose table functions only read;
    else QueryRefusedError naming the first statement or function that is not. Parse on a
    locked-down connection: DuckDB's parser reads files for IMPORT DATABASE."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.PermissionException as error:
        raise _outside_data(error) from None
    except duckdb.Error as error:
        raise FeaturestoreError(f"SQL error: {error}") from None
    if not statements:
        raise FeaturestoreError("SQL error: the query is empty")
    allowed = READ_FUNCTIONS | _own_table_macros(con)
    for number, statement in enumerate(statements, 1):
        where = f"statement {number}" if len(statements) > 1 else "the statement"
        query = statement.query
        if statement.type == duckdb.StatementType.EXPLAIN:
            query = _explained(con, statement.query)
            if query is None:
                raise QueryRefusedError(
                    f"read-only SQL explains only queries (SELECT, DESCRIBE, SHOW, SUMMARIZE), "
                    f"and {where} is an EXPLAIN of something else; {TRUSTED_HINT}")
        elif statement.type != duckdb.StatementType.SELECT:
            raise QueryRefusedError(
                f"read-only SQL runs only queries ({QUERY_STATEMENTS}), and {where} is "
                f"{_kind(statement)}; {TRUSTED_HINT}")
        for name in _table_functions(con, query, where):
            if name.lower() not in allowed:
                raise QueryRefusedError(
                    f"read-only SQL calls only table functions that read, and {where} calls "
                    f"{name}(), which may change the warehouse or reach outside it; "
                    f"{TRUSTED_HINT}")
    return statements


def _kind(statement: duckdb.Statement) -> str:
    name = statement.type.name
    if name == "CREATE" and not statement.query.strip():
        return "a PIVOT without an IN (...) list of its values (DuckDB creates a type for it)"
    return f"{'an' if name[0] in 'AEIOU' else 'a'} {name} statement"


def _explained(con: duckdb.DuckDBPyConnection, text: str) -> str | None:
    """The query an EXPLAIN statement explains (its text after EXPLAIN, its options and
    ANALYZE); None if that is not a single query. EXPLAIN ANALYZE runs what it explains."""
    tokens = duckdb.tokenize(text)
    words = [(start, text[start:end].strip()) for (start, _), end in
             zip(tokens, [start for start, _ in tokens[1:]] + [len(text)])]
    position, depth = 1, 0  # words[0] is EXPLAIN
    while position < len(words):
        word = words[position][1]
        if word == "(":
            depth += 1
        elif word == ")":
            depth -= 1
        elif depth == 0 and word.upper() not in _EXPLAIN_OPTIONS:
            break
        position += 1
    if position == len(words):
        return None
    inner = text[words[position][0]:]
    try:
        statements = con.extract_statements(inner)
    except duckdb.Error:
        return None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        return None
    return statements[0].query


def _own_table_macros(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The warehouse's table macros (sql/macros), which read its views."""
    return {name.lower() for (name,) in con.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() "
        "WHERE function_type = 'table_macro' AND NOT internal").fetchall()}


def _table_functions(con: duckdb.DuckDBPyConnection, query: str, where: str) -> list[str]:
    """Every table function a query names, at any depth (subqueries, CTEs, joins), from
    DuckDB's own parse of it."""
    (serialized,) = con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()
    tree = json.loads(serialized)
    if tree.get("error"):
        raise QueryRefusedError(
            f"read-only SQL could not check {where} ({tree.get('error_message')}); "
            f"{TRUSTED_HINT}")
    names: list[str] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if node.get("type") == "TABLE_FUNCTION":
                name = (node.get("function") or {}).get("function_name")
                if not isinstance(name, str):
                    raise QueryRefusedError(
                        f"read-only SQL could not tell which table function {where} calls; "
                        f"{TRUSTED_HINT}")
                names.append(name)
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return names


def _outside_data(error: duckdb.Error) -> QueryRefusedError:
    reason = str(error).strip().splitlines()[0]
    return QueryRefusedError(
        f"read-only SQL reads no files outside the warehouse's data folder ({reason}); "
        f"{TRUSTED_HINT}")


@dataclass
class LimitedResult:
    table: pa.Table  # at most the row limit
    truncated: bool  # the query had more rows than the limit


@dataclass
class ReadOnlySQL:
    """A locked-down warehouse connection that runs read-only SQL: open it once (a connection
    costs a catalog read), run many queries, close it. Every query reads the snapshot pinned
    when it was opened."""

    con: duckdb.DuckDBPyConnection

    def query(self, sql: str) -> pa.Table:
        """The result of the last statement of `sql` (every statement must be a query)."""
        statements = check_query(self.con, sql)
        try:
            for statement in statements[:-1]:
                self.con.execute(statement)
            return self.con.sql(statements[-1]).to_arrow_table()
        except duckdb.PermissionException as error:
            raise _outside_data(error) from None
        except duckdb.Error as error:
            raise FeaturestoreError(f"SQL error: {error}.{damage_hint(str(error))}") from None

    def query_limited(self, sql: str, max_rows: int, timeout_s: float) -> LimitedResult:
        """Like `query`, for SQL typed by a person: at most `max_rows` rows are read (the result
        says whether there were more), and the query is interrupted after `timeout_s` seconds
        with a QueryTimeoutError."""
        statements = check_query(self.con, sql)
        timer = threading.Timer(timeout_s, self.con.interrupt)
        timer.start()
        try:
            for statement in statements[:-1]:
                self.con.execute(statement)
            reader = self.con.sql(statements[-1]).fetch_record_batch(min(max_rows + 1, 65_536))
            batches, rows = [], 0
            for batch in reader:
                batches.append(batch)
                rows += batch.num_rows
                if rows > max_rows:
                    break
            table = pa.Table.from_batches(batches, schema=reader.schema)
        except duckdb.InterruptException:
            raise QueryTimeoutError(
                f"the query ran past the time limit of {timeout_s:g} s and was stopped; narrow "
                "it (a WHERE on basis, step or feature_id reads far less)") from None
        except duckdb.PermissionException as error:
            raise _outside_data(error) from None
        except duckdb.Error as error:
            raise FeaturestoreError(f"SQL error: {error}.{damage_hint(str(error))}") from None
        finally:
            timer.cancel()
        return LimitedResult(table.slice(0, max_rows), truncated=table.num_rows > max_rows)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> ReadOnlySQL:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def open_read_only(warehouse: str | os.PathLike | None = None,
                   as_of: int | str | datetime | None = None,
                   catalog: str | None = None) -> ReadOnlySQL:
    """A ReadOnlySQL on the warehouse (default: $FEATURESTORE_WAREHOUSE or ./warehouse), at its
    current snapshot or `as_of`, with every table, view, macro and UDF of `connect()`."""
    from featurestore.warehouse import Warehouse

    wh = Warehouse(warehouse, catalog)
    con = wh.connect(as_of)
    try:
        lock_down(con, wh.data_path)
    except BaseException:
        con.close()
        raise
    return ReadOnlySQL(con)


def query_read_only(sql: str, warehouse: str | os.PathLike | None = None,
                    as_of: int | str | datetime | None = None,
                    catalog: str | None = None) -> pa.Table:
    """One read-only query (see open_read_only) as an Arrow table."""
    with open_read_only(warehouse, as_of, catalog) as session:
        return session.query(sql)
