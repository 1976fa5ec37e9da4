"""The SQL behind the web app's pages: one file per query in sql/pages/, with named parameters.

    from featurestore.queries.page_queries import page_query
    trajectory = page_query("feature_trajectory")
    result = trajectory.run(con, {"basis": "demo-l2", "feature": 12})   # a QueryResult
    print(trajectory.shown({"basis": "demo-l2", "feature": 12}))          # SQL to paste

A query names its parameters as $name (DuckDB's named parameters); `run` binds them, so a value
never becomes SQL text. `shown` writes the same query with each parameter as a SQL literal: the
text a page shows under "SQL" and links to the SQL page, where it runs as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from importlib import resources

import duckdb

from featurestore.errors import FeaturestoreError
from featurestore.schema import load_query

PARAMETER = re.compile(r"\$([A-Za-z_]\w*)")


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple]

    def records(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]

    def first(self) -> dict | None:
        return dict(zip(self.columns, self.rows[0])) if self.rows else None


@dataclass(frozen=True)
class PageQuery:
    name: str
    text: str  # the file, its leading comment included

    @property
    def description(self) -> str:
        """The file's leading comment, as one paragraph."""
        lines = []
        for line in self.text.splitlines():
            if not line.startswith("--"):
                break
            lines.append(line.removeprefix("--").strip())
        return " ".join(lines)

    @property
    def parameters(self) -> list[str]:
        return sorted(set(PARAMETER.findall(self.text)))

    def run(self, con: duckdb.DuckDBPyConnection, params: dict) -> QueryResult:
        missing = [name for name in self.parameters if name not in params]
        if missing:
            raise FeaturestoreError(f"sql/pages/{self.name}.sql needs the parameter(s) "
                                    f"{', '.join(missing)}")
        cursor = con.execute(self.text, {name: params[name] for name in self.parameters})
        return QueryResult([d[0] for d in cursor.description], cursor.fetchall())

    def shown(self, params: dict) -> str:
        """The query with its parameters written as SQL literals."""
        return PARAMETER.sub(lambda match: sql_literal(params[match.group(1)]), self.text)


def sql_literal(value) -> str:
    """A Python value as a DuckDB literal of the same type."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value!r}::DOUBLE"
    if isinstance(value, (date, datetime)):
        return f"'{value.isoformat()}'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(sql_literal(v) for v in value) + "]"
    return "'" + str(value).replace("'", "''") + "'"


@cache
def page_query(name: str) -> PageQuery:
    """The query of sql/pages/<name>.sql."""
    return PageQuery(name, load_query(f"pages/{name}"))


def page_query_names() -> list[str]:
    folder = resources.files("featurestore.sql").joinpath("pages")
    return sorted(f.name.removesuffix(".sql") for f in folder.iterdir() if f.name.endswith(".sql"))
