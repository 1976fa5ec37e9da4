"""`featurestore serve`: the warehouse as a local web app.

    from featurestore.queries.web_app import create_app, serve
    serve("warehouse")                       # http://127.0.0.1:8765, until Ctrl-C
    app = create_app("warehouse")            # the ASGI app, for another server or a test client

Pages (server-rendered; charts are the Vega-Lite specs of featurestore.queries.plots, drawn by
the Vega bundle the app serves itself, so nothing comes from the network):

    /                                  runs and bases
    /runs/<run>                        a run's checkpoints and metric curves
    /bases/<basis>                     fit quality, births against the null, the feature table
    /bases/<basis>/features/<id>       one feature across training (?step=, ?source=&target=)
    /bases/<basis>/model-diff          a two-source crosscoder's relative norms and exclusives
    /sql?q=...                         read-only SQL; /sql/download.csv and .parquet

Every section of a page is one query of sql/pages/, shown under it with a link that opens it
in the SQL page. The app reads through one read-only connection (featurestore.readonly_sql),
pinned to a snapshot: before each page it asks the catalog for the newest snapshot, and reopens
when a job has committed since, so a reload shows new results and the app never holds a lock a
job waits for. Requests take turns on the connection; the SQL page's time limit bounds the wait.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlencode

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from featurestore.errors import (
    FeaturestoreError,
    NotFoundError,
    QueryRefusedError,
    QueryTimeoutError,
)
from featurestore.lake import LAKE
from featurestore.queries import plots
from featurestore.queries.page_queries import PageQuery, QueryResult, page_query, sql_literal
from featurestore.readonly_sql import ReadOnlySQL, open_read_only
from featurestore.schema import table_specs
from featurestore.warehouse import Warehouse

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
SQL_TIME_LIMIT_S = 10.0
SQL_ROW_LIMIT = 1_000  # rows shown on the SQL page
DOWNLOAD_ROW_LIMIT = 1_000_000  # rows in a CSV or Parquet download
CACHED_ROWS = 1_000_000  # tables up to this size are read into memory once per snapshot
# In-memory copies in the order a page's filter needs (DuckDB skips row groups by their min and
# max): a feature page reads the edges into one feature, not the edges of one step.
CACHE_ORDER = {"lineage_edges": ("basis", "dst_type", "dst_id")}
FEATURE_TABLE_ROWS = 100  # features per page of a basis's feature table
NEIGHBOURS = 10
HISTOGRAM_BINS = 20
# Latent scaling: a ratio of the other source above this flags Complete Shrinkage (nu_error) or
# Latent Decoupling (nu_recon) on the model-diff page.
FLAG_NU = 0.3

log = logging.getLogger("featurestore.serve")
HERE = Path(__file__).parent


class BadRequest(FeaturestoreError):
    """A page parameter that cannot be used: the 400 page names it and what it takes."""


# -- the warehouse, read-only and fresh -------------------------------------------------------


class LiveWarehouse:
    """One read-only session on the warehouse, reopened when a job has committed since it was
    opened (opening costs a catalog read; asking for the newest snapshot is one small query).

    Every query of a DuckLake table costs a catalog lookup of its files, which a page of a
    dozen queries would pay a dozen times. The session's snapshot never changes, so on
    opening, the tables of up to CACHED_ROWS rows are copied into memory under their own names
    (views read them the same way), and the larger ones read the snapshot's Parquet files
    straight (read_files_directly), where a query naming a basis, step or feature reads only the
    row groups it needs.
    """

    def __init__(self, warehouse: str | os.PathLike | None = None, catalog: str | None = None,
                 cached_rows: int = CACHED_ROWS, direct_files: bool = True):
        self.warehouse = Warehouse(warehouse, catalog)
        self.catalog = catalog
        self.cached_rows = cached_rows
        self.direct_files = direct_files
        self._session: ReadOnlySQL | None = None
        self._snapshot: int | None = None
        self._lock = threading.Lock()

    @contextmanager
    def session(self) -> Iterator[ReadOnlySQL]:
        with self._lock:
            if self._session is not None:
                (newest,) = self._session.con.execute(
                    f"SELECT id FROM {LAKE}.current_snapshot()").fetchone()
                if newest != self._snapshot:
                    self.close()
            if self._session is None:
                session = open_read_only(self.warehouse.root, catalog=self.catalog)
                try:
                    (self._snapshot,) = session.con.execute(
                        f"SELECT id FROM {LAKE}.current_snapshot()").fetchone()
                    cache_small_tables(session.con, self.cached_rows)
                    if self.direct_files:
                        read_files_directly(session.con, self._snapshot)
                except BaseException:
                    session.close()
                    raise
                self._session = session
            yield self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


def cache_small_tables(con: duckdb.DuckDBPyConnection, max_rows: int) -> list[str]:
    """Replace the view of each table of up to `max_rows` rows (but the partitioned ones) by an
    in-memory copy of the rows it reads; return the tables copied."""
    cached = []
    con.execute("BEGIN TRANSACTION")  # one catalog read for every count and copy
    try:
        for table in table_specs().values():
            if table.partition_by:
                continue
            (rows,) = con.execute(f"SELECT count(*) FROM {table.name}").fetchone()
            if rows > max_rows:
                continue
            order = CACHE_ORDER.get(table.name)
            con.execute(f"CREATE TABLE {table.name}_rows AS FROM {table.name}"
                        + (f" ORDER BY {', '.join(order)}" if order else ""))
            cached.append(table.name)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    for name in cached:
        comment = table_specs()[name].comment
        con.execute(f"DROP VIEW {name}")
        con.execute(f"ALTER TABLE {name}_rows RENAME TO {name}")
        con.execute(f"COMMENT ON TABLE {name} IS {sql_literal(comment)}")
    return cached


def read_files_directly(con: duckdb.DuckDBPyConnection, snapshot: int) -> list[str]:
    """Point the view of each table still on the lake at the Parquet files that hold its rows at
    `snapshot`, as DuckLake would read them, minus DuckLake's catalog lookup on every query.
    Only where that is exact: no file has rows deleted by a later write (DuckLake keeps those in
    delete files) and every file has every column (one written before a column existed gets
    its default from DuckLake). Returns the tables switched."""
    switched = []
    for table in table_specs().values():
        if con.execute("SELECT table_name FROM duckdb_tables() WHERE table_name = ? "
                       "AND database_name = 'memory'", [table.name]).fetchall():
            continue  # copied into memory
        files = con.execute(f"SELECT data_file, delete_file FROM ducklake_list_files("
                            f"'{LAKE}', ?, snapshot_version => ?)",
                            [table.name, snapshot]).fetchall()
        if not files or any(delete is not None for _, delete in files):
            continue
        paths = [path for path, _ in files]
        columns = {name for (name,) in con.execute(
            "SELECT name FROM parquet_schema(?) GROUP BY name HAVING count(DISTINCT file_name) "
            "= ?", [paths, len(paths)]).fetchall()}
        if not {c.name for c in table.columns} <= columns:
            continue
        select = ", ".join(f"CAST({c.name} AS {c.type}) AS {c.name}" for c in table.columns)
        con.execute(f"CREATE OR REPLACE VIEW {table.name} AS SELECT {select} "
                    f"FROM read_parquet({sql_literal(paths)})")
        con.execute(f"COMMENT ON VIEW {table.name} IS {sql_literal(table.comment)}")
        switched.append(table.name)
    return switched


# -- what a page is made of ---------------------------------------------------------------------


@dataclass
class Section:
    """One query's result on a page, with the SQL that produced it."""

    title: str
    query: PageQuery
    result: QueryResult
    sql: str  # the query with its parameters as literals
    links: dict[str, str]  # column -> URL template with {column} placeholders

    @property
    def sql_url(self) -> str:
        return "/sql?" + urlencode({"q": self.sql})


def section(con: duckdb.DuckDBPyConnection, title: str, name: str, params: dict,
            links: dict[str, str] | None = None, query: PageQuery | None = None) -> Section:
    query = query or page_query(name)
    return Section(title, query, query.run(con, params), query.shown(params), links or {})


@dataclass
class Chart:
    """A chart of featurestore.queries.plots as its Vega-Lite spec, or why it is not there."""

    id: str
    spec_json: str | None
    missing: str | None = None


def chart(id: str, build) -> Chart:
    """`build` returns an altair chart or a Vega-Lite spec."""
    try:
        spec = build()
        if not isinstance(spec, dict):
            spec = spec.to_dict(validate=False)
    except plots.NoPlotData as why:
        return Chart(id, None, str(why))
    # The spec goes into a <script type="application/json">: "</" must not end that element.
    return Chart(id, json.dumps(spec, allow_nan=False, default=str).replace("</", "<\\/"))


def births_rule(con: duckdb.DuckDBPyConnection, basis: str) -> dict | None:
    """The births rule the graphs and plots show for this basis (feature-birth-analyze's
    defaults when stored, else the closest stored set)."""
    from featurestore.birth_rules import BIRTH_RULE_COLUMNS, shown_births_rule

    rule = shown_births_rule(con, basis)
    return None if rule is None else {column: rule[column] for column in BIRTH_RULE_COLUMNS}


def basis_row(con: duckdb.DuckDBPyConnection, basis: str) -> Section:
    found = section(con, "Basis", "basis", {"basis": basis})
    if not found.result.rows:
        raise NotFoundError(f"no basis named {basis!r}; the home page lists the bases")
    return found


# -- pages --------------------------------------------------------------------------------------


def home(request: Request) -> Response:
    with request.app.state.live.session() as session:
        con = session.con
        sections = [
            section(con, "Runs", "runs", {}, {"run": "/runs/{run}"}),
            section(con, "Bases", "bases", {}, {"basis": "/bases/{basis}", "run": "/runs/{run}"}),
        ]
    return render(request, "home.html", title="featurestore", sections=sections)


def run_page(request: Request) -> Response:
    run = request.path_params["run"]
    with request.app.state.live.session() as session:
        con = session.con
        head = section(con, "Run", "run", {"run": run}, {"parent_run": "/runs/{parent_run}"})
        if not head.result.rows:
            raise NotFoundError(f"no run named {run!r}; the home page lists the runs")
        metrics = chart("run-metrics", lambda: plots.run_metrics(con, run))
        sections = [head,
                    section(con, "Bases", "run_bases", {"run": run}, {"basis": "/bases/{basis}"}),
                    section(con, "Checkpoints", "run_checkpoints", {"run": run})]
    return render(request, "run.html", title=f"run {run}", run=run, sections=sections,
                  charts=[metrics])


FEATURE_SORTS = ("feature_id", "birth_step", "stabilization_step", "death_step", "final_rate",
                 "final_energy", "drift", "frequency", "relative_decoder_norm", "decoder_cosine",
                 "max_activation")


def basis_page(request: Request) -> Response:
    basis = request.path_params["basis"]
    with request.app.state.live.session() as session:
        con = session.con
        head = basis_row(con, basis)
        info = head.result.first()
        shared = info["run"] is not None
        if shared:
            rule = births_rule(con, basis)
            charts = [chart("fit-quality", lambda: plots.checkpoint_summary(con, basis)),
                      chart("birth-timeline", lambda: plots.birth_timeline(con, basis))]
            table, filters = feature_table(con, request, basis, "basis_features",
                                           {"basis": basis, **(rule or no_births_rule())})
            sections = [head, section(con, "Fit quality per checkpoint", "basis_fit_quality",
                                      {"basis": basis}), table]
        else:
            rule = None
            charts = [chart("training-curves", lambda: plots.training_curves(con, basis))]
            table, filters = feature_table(con, request, basis, "basis_latents",
                                           {"basis": basis})
            sections = [head, table]
        # Every trajectory row names every split: one row is enough.
        row = con.execute("SELECT map_keys(split_activation_rates) FROM trajectories "
                          "WHERE basis = ? LIMIT 1", [basis]).fetchone() if shared else None
        splits = sorted(row[0]) if row else []
        classes = [r[0] for r in con.execute(
            "SELECT DISTINCT class FROM model_diff WHERE basis = ? ORDER BY class",
            [basis]).fetchall()]
    return render(request, "basis.html", title=f"basis {basis}", basis=basis, info=info,
                  shared=shared, rule=rule, charts=charts, sections=sections, features=table,
                  filters=filters, splits=splits, classes=classes)


def no_births_rule() -> dict:
    """Births parameters no row has: the feature table's birth columns stay empty."""
    return {"metric": "", "presence": "", "threshold": -1.0, "persistence": -1,
            "stable_eps": -1.0, "stable_cos": -1.0}


def feature_table(con: duckdb.DuckDBPyConnection, request: Request, basis: str, name: str,
                  params: dict) -> tuple[Section, dict]:
    """The basis's feature table, filtered, sorted and paged by the request's parameters:
    sort (a column), order (asc/desc), born (any/born/unborn/init), split, class, page."""
    args = request.query_params
    inner = page_query(name)
    columns = inner.run(con, {**params, "basis": ""}).columns  # no rows, just the columns
    sort = args.get("sort", "birth_step" if "birth_step" in columns else "frequency")
    if sort not in columns or sort not in FEATURE_SORTS:
        raise BadRequest(f"sort={sort!r}: sort by one of "
                         f"{', '.join(c for c in FEATURE_SORTS if c in columns)}")
    order = args.get("order", "asc" if sort in ("feature_id", "birth_step") else "desc")
    if order not in ("asc", "desc"):
        raise BadRequest(f"order={order!r}: use asc or desc")
    page = int_param(args, "page", 1, low=1)
    conditions, values = [], {}
    born = args.get("born", "any")
    born_conditions = {"any": None, "born": "birth_step IS NOT NULL",
                       "unborn": "birth_step IS NULL AND NOT coalesce(present_at_init, false)",
                       "init": "present_at_init"}
    if born not in born_conditions or (born != "any" and "birth_step" not in columns):
        raise BadRequest(f"born={born!r}: use any"
                         + (", born, unborn or init" if "birth_step" in columns else ""))
    if born_conditions[born]:
        conditions.append(born_conditions[born])
    for column in ("split", "class"):
        value = args.get(column)
        target = "top_split" if column == "split" else "class"
        if value:
            if target not in columns:
                raise BadRequest(f"{column}={value!r}: this basis's table has no {target}")
            conditions.append(f"{target} = $filter_{column}")
            values[f"filter_{column}"] = value
    text = inner.text.rstrip().rstrip(";")
    # One pass: the page of rows, each with the number of rows matching (the window runs
    # before LIMIT), so the table's count costs no second scan.
    wrapped = (f"SELECT *, count(*) OVER () AS matching FROM (\n{text}\n)"
               + (f"\nWHERE {' AND '.join(conditions)}" if conditions else "")
               + f"\nORDER BY {sort} {order.upper()} NULLS LAST, feature_id"
               + f"\nLIMIT {FEATURE_TABLE_ROWS} OFFSET {(page - 1) * FEATURE_TABLE_ROWS}")
    result = section(con, "Features", name, {**params, **values},
                     {"feature_id": f"/bases/{basis}/features/{{feature_id}}"},
                     query=PageQuery(name, wrapped))
    if not result.result.rows and page > 1:
        raise BadRequest(f"page={page}: past the last page of the features that match")
    total = result.result.rows[0][-1] if result.result.rows else 0
    result.result = QueryResult(result.result.columns[:-1],
                                [row[:-1] for row in result.result.rows])
    filters = {"sort": sort, "order": order, "born": born, "split": args.get("split", ""),
               "class": args.get("class", "")}
    pages = max(1, math.ceil(total / FEATURE_TABLE_ROWS))

    def page_url(number: int) -> str:
        return "?" + urlencode({**{k: v for k, v in filters.items() if v}, "page": number})

    return result, {**filters, "page": page, "pages": pages, "total": total,
                    "sortable": FEATURE_SORTS,
                    "previous": page_url(page - 1) if page > 1 else None,
                    "next": page_url(page + 1) if page < pages else None}


def feature_page(request: Request) -> Response:
    basis, feature = request.path_params["basis"], request.path_params["feature"]
    args = request.query_params
    with request.app.state.live.session() as session:
        con = session.con
        head = basis_row(con, basis)
        info = head.result.first()
        d_hidden = info["d_hidden"]
        if feature >= d_hidden:
            raise NotFoundError(f"{basis} has features 0..{d_hidden - 1}; there is no feature "
                                f"{feature}")
        params = {"basis": basis, "feature": feature}
        row = section(con, "Feature", "feature", params)
        neighbours = section(con, "Decoder-cosine neighbours", "feature_neighbours",
                             {**params, "limit": NEIGHBOURS},
                             {"feature_id": f"/bases/{basis}/features/{{feature_id}}"})
        context = {"basis": basis, "feature": feature, "info": info, "row": row,
                   "neighbours": neighbours, "d_hidden": d_hidden}
        if info["run"] is None:
            page = crosscoder_feature(con, info, params)
        else:
            page = shared_feature(con, info, params, args)
    return render(request, "feature.html", title=f"{basis} feature {feature}",
                  **context, **page)


def shared_feature(con: duckdb.DuckDBPyConnection, info: dict, params: dict, args) -> dict:
    basis, feature = params["basis"], params["feature"]
    steps = [s for (s,) in page_query("basis_steps").run(con, {"basis": basis}).rows]
    if not steps:
        return {"steps": [], "missing": f"no trajectories for {basis} yet: run featurestore "
                                        f"feature-trajectory-sweep --basis {basis}"}
    trajectory = section(con, "Trajectory", "feature_trajectory", params)
    # Contexts default to the checkpoint where the feature fires most: at the last one a
    # feature that died has none to show.
    peak = max(trajectory.result.records(), key=lambda r: r["activation_rate"],
               default={"step": steps[-1]})["step"]
    step = step_param(args, "step", steps, peak)
    source = step_param(args, "source", steps, steps[0])
    target = step_param(args, "target", steps, steps[-1])
    rule = births_rule(con, basis)
    birth = (section(con, "Birth", "feature_birth", {**params, **rule}) if rule else None)
    at_step = {**params, "step": step}
    run = info["run"]
    return {
        "steps": steps, "step": step, "source": source, "target": target, "rule": rule,
        "birth": birth,
        "charts": [chart("trajectory", lambda: plots.feature_trajectory_spec(
                       basis, feature, trajectory.result.records(),
                       birth.result.first() if birth else None, rule)),
                   chart("activations", lambda: activation_histogram(con, at_step))],
        "trajectory": trajectory,
        "examples": section(con, f"Top activating contexts at step {step}", "feature_examples",
                            {**at_step, "run": run}),
        "splits": section(con, f"Split profile at step {step}", "feature_splits", at_step),
        "diff": section(con, f"From step {source} to step {target}", "feature_diff",
                        {**params, "source": source, "target": target}),
        "patches": section(con, "Patch effects", "feature_patches", params),
        "lineage": section(con, "Lineage", "feature_lineage", {**params, "run": run}),
    }


def activation_histogram(con: duckdb.DuckDBPyConnection, params: dict) -> dict:
    rows = page_query("feature_activations").run(con, {**params, "bins": HISTOGRAM_BINS})
    if not rows.rows:
        raise plots.NoPlotData(f"feature {params['feature']} does not fire at step "
                               f"{params['step']} (no feature_activations rows)")
    return plots.activation_histogram_spec(params["feature"], params["step"], rows.records())


def crosscoder_feature(con: duckdb.DuckDBPyConnection, info: dict, params: dict) -> dict:
    runs = [s["run"] for s in con.execute("SELECT sources FROM bases WHERE name = ?",
                                          [params["basis"]]).fetchone()[0]]
    return {
        "sources": section(con, "Per source", "feature_sources", params),
        "examples": section(con, "Top activating contexts", "crosscoder_examples",
                            {**params, "run": runs[0]}),
    }


def model_diff_page(request: Request) -> Response:
    basis = request.path_params["basis"]
    with request.app.state.live.session() as session:
        con = session.con
        head = basis_row(con, basis)
        info = head.result.first()
        if info["n_sources"] != 2:
            raise NotFoundError(f"{basis} has {info['n_sources']} source(s): a model diff needs "
                                "a two-source crosscoder (train-crosscoder)")
        params = {"basis": basis}
        charts = [chart("relative-norms", lambda: plots.relative_norm_histogram(con, basis))]
        sections = [
            section(con, "Latents per class", "model_diff_summary", params),
            section(con, "Exclusive latents", "model_diff_exclusive",
                    {**params, "flag_nu": FLAG_NU},
                    {"feature_id": f"/bases/{basis}/features/{{feature_id}}"}),
        ]
    return render(request, "model_diff.html", title=f"model diff {basis}", basis=basis,
                  info=info, charts=charts, sections=sections, flag_nu=FLAG_NU)


def sql_page(request: Request) -> Response:
    sql = request.query_params.get("q", "").strip()
    result = error = None
    if sql:
        with request.app.state.live.session() as session:
            try:
                result = session.query_limited(sql, SQL_ROW_LIMIT, request.app.state.time_limit)
            except FeaturestoreError as why:  # refused, timed out or an SQL error: say which
                error = str(why)
    status = 400 if error else 200
    tables = []
    if not sql:
        with request.app.state.live.session() as session:
            tables = session.query(
                "SELECT table_name AS name, 'table' AS kind, comment FROM duckdb_tables() "
                "WHERE database_name = 'memory' UNION ALL "
                "SELECT view_name, 'view', comment FROM duckdb_views() "
                "WHERE database_name = 'memory' AND NOT internal ORDER BY kind, name").to_pylist()
    return render(request, "sql.html", status_code=status, title="SQL", sql=sql,
                  result=arrow_rows(result.table) if result else None,
                  truncated=result.truncated if result else False, error=error,
                  row_limit=SQL_ROW_LIMIT, time_limit=request.app.state.time_limit,
                  tables=tables, download=urlencode({"q": sql}))


def sql_download(request: Request) -> Response:
    fmt = request.path_params["format"]
    if fmt not in ("csv", "parquet"):
        raise HTTPException(404, f"no download format {fmt!r}: use csv or parquet")
    sql = request.query_params.get("q", "").strip()
    if not sql:
        raise BadRequest("q: give the query to download, e.g. /sql/download.csv?q=SELECT+1")
    with request.app.state.live.session() as session:
        limited = session.query_limited(sql, DOWNLOAD_ROW_LIMIT, request.app.state.time_limit)
    buffer = io.BytesIO()
    if fmt == "csv":
        pa_csv.write_csv(flat_for_csv(limited.table), buffer)
        media = "text/csv"
    else:
        pq.write_table(limited.table, buffer)
        media = "application/vnd.apache.parquet"
    headers = {"Content-Disposition": f'attachment; filename="query.{fmt}"'}
    if limited.truncated:
        headers["X-Featurestore-Truncated"] = f"first {DOWNLOAD_ROW_LIMIT} rows"
    return Response(buffer.getvalue(), media_type=media, headers=headers)


def vega_script(request: Request) -> Response:
    return Response(vega_bundle(), media_type="text/javascript",
                    headers={"Cache-Control": "max-age=86400"})


def stylesheet(request: Request) -> Response:
    return Response((HERE / "web_static" / "style.css").read_text(), media_type="text/css")


@cache
def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed in one script (vl-convert's own copies): a few seconds to
    build, so once per process."""
    import vl_convert

    return vl_convert.javascript_bundle()


# -- parameters, errors and rendering ---------------------------------------------------------


def int_param(args, name: str, default: int, low: int | None = None) -> int:
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}={raw!r}: give a whole number") from None
    if low is not None and value < low:
        raise BadRequest(f"{name}={raw!r}: give a number >= {low}")
    return value


def step_param(args, name: str, steps: list[int], default: int) -> int:
    value = int_param(args, name, default)
    if value not in steps:
        raise BadRequest(f"{name}={value}: not a swept checkpoint of this basis; steps: "
                         f"{', '.join(map(str, steps))}")
    return value


def arrow_rows(table: pa.Table) -> QueryResult:
    return QueryResult(table.column_names, [tuple(r.values()) for r in table.to_pylist()])


def flat_for_csv(table: pa.Table) -> pa.Table:
    """CSV has no lists, structs or maps: those columns are written as their JSON text."""
    columns = []
    for column in table.columns:
        if pa.types.is_nested(column.type):
            column = pa.array([None if v is None else json.dumps(v, default=str)
                               for v in column.to_pylist()], pa.string())
        columns.append(column)
    return pa.table(columns, names=table.column_names)


def format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return f"{value:.6g}" if value != 0 else "0"  # no "-0" from a rounded -0.0001
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_cell(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_cell(v)}" for k, v in value.items()) + "}"
    return str(value)


templates = Jinja2Templates(directory=str(HERE / "web_templates"))
templates.env.filters["cell"] = format_cell
templates.env.globals["urlencode"] = urlencode


def render(request: Request, template: str, status_code: int = 200, **context) -> Response:
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def error_page(request: Request, status: int, message: str) -> Response:
    titles = {400: "Bad request", 404: "Not found", 500: "Something went wrong"}
    return templates.TemplateResponse(
        request, "error.html", {"title": titles.get(status, "Error"), "status": status,
                                "message": message}, status_code=status)


async def on_http_error(request: Request, error: HTTPException) -> Response:
    message = error.detail if error.status_code != 404 or error.detail != "Not Found" else (
        f"no page at {request.url.path}; the home page links to every run and basis")
    return error_page(request, error.status_code, message)


async def on_bad_request(request: Request, error: BadRequest) -> Response:
    return error_page(request, 400, str(error))


async def on_not_found(request: Request, error: NotFoundError) -> Response:
    return error_page(request, 404, str(error))


async def on_refused(request: Request, error: FeaturestoreError) -> Response:
    status = 400 if isinstance(error, (QueryRefusedError, QueryTimeoutError)) else 500
    return error_page(request, status, str(error))


async def on_crash(request: Request, error: Exception) -> Response:
    log.exception("error on %s", request.url.path)
    return error_page(request, 500, "the page failed to render; the server's log has the "
                                    "details")


def create_app(warehouse: str | os.PathLike | None = None, catalog: str | None = None,
               time_limit: float = SQL_TIME_LIMIT_S, cached_rows: int = CACHED_ROWS,
               direct_files: bool = True) -> Starlette:
    """The web app over the warehouse (default: $FEATURESTORE_WAREHOUSE or ./warehouse).
    `cached_rows` and `direct_files`: how the session reads each snapshot (LiveWarehouse);
    0 and False read every table through DuckLake, as `featurestore sql` does."""
    live = LiveWarehouse(warehouse, catalog, cached_rows, direct_files)
    if not live.warehouse.exists():
        raise NotFoundError(f"no warehouse at {live.warehouse.root}: give --warehouse, or run "
                            "featurestore demo to build one")
    routes = [
        Route("/", home),
        Route("/runs/{run}", run_page),
        Route("/bases/{basis}", basis_page),
        Route("/bases/{basis}/features/{feature:int}", feature_page),
        Route("/bases/{basis}/model-diff", model_diff_page),
        Route("/sql", sql_page),
        Route("/sql/download.{format}", sql_download),
        Route("/static/vega.js", vega_script),
        Route("/static/style.css", stylesheet),
    ]
    handlers = {HTTPException: on_http_error, BadRequest: on_bad_request,
                NotFoundError: on_not_found, FeaturestoreError: on_refused, Exception: on_crash}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.live = live
    app.state.time_limit = time_limit
    return app


def serve(warehouse: str | os.PathLike | None = None, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT, catalog: str | None = None,
          time_limit: float = SQL_TIME_LIMIT_S) -> None:
    """Serve the web app until interrupted. Binding to anything but the loopback address is the
    caller's explicit choice (the CLI's --public): the app has no login."""
    import uvicorn

    app = create_app(warehouse, catalog, time_limit)
    vega_bundle()  # built before the first page asks for it
    uvicorn.run(app, host=host, port=port, log_level="warning")
