"""`featurestore serve`'s pages, through starlette's test client on the analysed tiny warehouse:
what each page shows is checked against the warehouse read independently (numpy, a fresh
connection), bad ids and parameters get 404/400 pages without a traceback, the SQL page refuses
writes and leaves the warehouse unchanged to the byte, its row and time limits hold, and a
commit made while the app runs shows after a reload."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from featurestore.cli import cli
from featurestore.ingest.crosscoder_sweep import crosscoder_sweep
from featurestore.queries.page_queries import page_query, page_query_names
from featurestore.queries.web_app import FEATURE_TABLE_ROWS, SQL_ROW_LIMIT, create_app
from featurestore.warehouse import Warehouse, connect

from .conftest import TINY_RUN, query, snapshot


@pytest.fixture(scope="module")
def warehouse(analysed_warehouse, tmp_path_factory) -> Path:
    """The analysed warehouse, with the crosscoder's per-source statistics and contexts."""
    root = tmp_path_factory.mktemp("web") / "warehouse"
    shutil.copytree(analysed_warehouse, root)
    crosscoder_sweep("tiny-diff", warehouse=root, progress=False)
    return root


@pytest.fixture(scope="module")
def client(warehouse) -> TestClient:
    return TestClient(create_app(warehouse, time_limit=2.0), raise_server_exceptions=False)


def chart_spec(page: str, chart_id: str) -> dict:
    found = re.search(rf'<script type="application/json" id="spec-{chart_id}">(.*?)</script>',
                      page, re.S)
    assert found, f"no chart {chart_id} on the page"
    return json.loads(found.group(1).replace("<\\/", "</"))


def section_html(page: str, section_id: str) -> str:
    found = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert found, f"no section {section_id} on the page"
    return found.group(1)


def table_rows(fragment: str) -> list[list[str]]:
    """The body cells of the first table in an HTML fragment, as text."""
    body = re.search(r"<tbody>(.*?)</tbody>", fragment, re.S).group(1)
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
             for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def sql_links(page: str) -> list[str]:
    return [html.unescape(parse_qs(urlparse(html.unescape(href)).query)["q"][0])
            for href in re.findall(r'href="(/sql\?q=[^"]+)"', page)]


def test_home_lists_every_run_and_basis(client, warehouse):
    page = client.get("/")
    assert page.status_code == 200
    runs = [r for (r,) in query(warehouse, "SELECT run FROM runs ORDER BY run")]
    bases = [b for (b,) in query(warehouse, "SELECT name FROM bases ORDER BY name")]
    assert [row[0] for row in table_rows(section_html(page.text, "runs"))] == runs
    assert [row[0] for row in table_rows(section_html(page.text, "bases"))] == bases
    for basis in bases:
        assert f'href="/bases/{basis}"' in page.text


def test_run_page_charts_every_checkpoint(client, warehouse):
    page = client.get(f"/runs/{TINY_RUN}")
    assert page.status_code == 200
    steps = [s for (s,) in query(warehouse, "SELECT step FROM checkpoints WHERE run = ? "
                                            "ORDER BY step", [TINY_RUN])]
    assert [int(r[0]) for r in table_rows(section_html(page.text, "run_checkpoints"))] == steps
    spec = chart_spec(page.text, "run-metrics")
    (rows,) = spec["datasets"].values()  # altair names the inline rows
    assert sorted({row["step"] for row in rows}) == steps


def test_feature_table_sorts_filters_and_pages(client, warehouse):
    births = dict(query(warehouse, "SELECT feature_id, birth_step FROM births "
                                   "WHERE basis = 'tiny-l2'"))
    born = sorted(f for f, step in births.items() if step is not None)
    page = client.get("/bases/tiny-l2?born=born&sort=birth_step&order=asc")
    assert page.status_code == 200
    rows = table_rows(section_html(page.text, "feature-table"))
    assert [int(r[0]) for r in rows] == sorted(born, key=lambda f: (births[f], f))
    assert f"{len(born)} matching" in page.text
    assert [int(r[1]) for r in rows] == sorted(births[f] for f in born)

    by_rate = table_rows(section_html(client.get("/bases/tiny-l2?sort=final_rate").text,
                                      "feature-table"))
    rates = [float(r[6]) for r in by_rate if r[6]]
    assert rates == sorted(rates, reverse=True) and len(by_rate) == min(64, FEATURE_TABLE_ROWS)

    split = by_rate[0][9]
    only = table_rows(section_html(client.get(f"/bases/tiny-l2?split={split}").text,
                                   "feature-table"))
    assert only and all(r[9] == split for r in only)


def test_feature_page_matches_the_warehouse(client, warehouse):
    con = connect(warehouse)
    try:
        feature = con.execute(
            "SELECT feature_id FROM trajectories WHERE basis = 'tiny-l2' GROUP BY feature_id "
            "HAVING min(activation_rate) > 0 ORDER BY max(energy) DESC LIMIT 1").fetchone()[0]
        trajectory = con.execute(
            "SELECT step, activation_rate, energy, n_tokens, mean_activation, "
            "direction_cosine_previous FROM trajectories WHERE basis = 'tiny-l2' "
            "AND feature_id = ? ORDER BY step", [feature]).fetchall()
        steps = [t[0] for t in trajectory]
        peak_step = max(trajectory, key=lambda t: t[1])[0]
        examples = con.execute(
            "SELECT context_token_ids, position - context_start + 1 FROM feature_examples "
            "WHERE basis = 'tiny-l2' AND feature_id = ? AND step = ? ORDER BY rank",
            [feature, peak_step]).fetchall()
        strings = dict(con.execute("SELECT token_id, token_text FROM token_strings "
                                   "WHERE run = ?", [TINY_RUN]).fetchall())
        values = np.array([v for (v,) in con.execute(
            "SELECT value FROM feature_activations WHERE basis = 'tiny-l2' AND step = ? "
            "AND feature_id = ?", [peak_step, feature]).fetchall()])
        directions = dict(con.execute(
            "SELECT feature_id, direction FROM decoder_directions WHERE basis = 'tiny-l2'"
        ).fetchall())
    finally:
        con.close()

    page = client.get(f"/bases/tiny-l2/features/{feature}")
    assert page.status_code == 200
    # The trajectory chart carries the trajectory, its drift the running sum of 1 - cosine.
    spec = chart_spec(page.text, "trajectory")
    shown = spec["datasets"]["trajectory"]
    assert [r["step"] for r in shown] == steps
    np.testing.assert_allclose([r["activation_rate"] for r in shown],
                               [t[1] for t in trajectory], atol=1e-6)
    drift = np.cumsum([0 if t[5] is None else 1 - t[5] for t in trajectory])
    np.testing.assert_allclose([r["drift"] for r in shown], drift, atol=1e-4)

    # Contexts default to the checkpoint where the feature fires most, the activating token
    # marked: the token of the context at the stored offset, as the run's tokenizer spells it.
    contexts = section_html(page.text, "feature_examples")
    assert f"at step {peak_step}" in contexts
    marked = [html.unescape(m) for m in re.findall(r'<mark class="active"[^>]*>(.*?)</mark>',
                                                   contexts)]
    assert marked == [strings[ids[offset - 1]] for ids, offset in examples]

    # The activation histogram: 20 bins from 0 to the largest activation, counted by numpy.
    bins = chart_spec(page.text, "activations")["datasets"]["bins"]
    counts, _ = np.histogram(values, bins=20, range=(0, values.max()))
    assert sum(b["n_tokens"] for b in bins) == len(values)
    assert {b["bin"]: b["n_tokens"] for b in bins} == {
        i: int(c) for i, c in enumerate(counts) if c}

    # Neighbours: the closest decoder directions by cosine, by numpy.
    matrix = np.array([directions[f] for f in sorted(directions)])
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    cosine = unit @ unit[feature]
    order = [f for f in np.argsort(-cosine, kind="stable") if f != feature][:10]
    neighbours = table_rows(section_html(page.text, "feature_neighbours"))
    assert [int(r[0]) for r in neighbours] == order
    np.testing.assert_allclose([float(r[1]) for r in neighbours], cosine[order], atol=1e-4)

    # The diff between two chosen checkpoints, as feature-compare defines it.
    first, last = trajectory[0], trajectory[-1]
    diff = table_rows(section_html(client.get(
        f"/bases/tiny-l2/features/{feature}?source={first[0]}&target={last[0]}").text,
        "feature_diff"))[0]
    pseudo = 1 / min(first[3], last[3])
    assert float(diff[4]) == pytest.approx(last[1] - first[1], abs=1e-6)
    assert float(diff[5]) == pytest.approx(np.log((last[1] + pseudo) / (first[1] + pseudo)),
                                           abs=1e-4)


def test_every_section_links_to_sql_that_gives_its_rows(client):
    page = client.get("/bases/tiny-l2/features/5").text
    links = sql_links(page)
    assert len(links) >= 8
    for sql in links:
        result = client.get("/sql", params={"q": sql})
        assert result.status_code == 200, (sql, result.text[-500:])


def test_crosscoder_pages(client, warehouse):
    exclusive = query(warehouse, "SELECT feature_id FROM model_diff WHERE basis = 'tiny-diff' "
                                 "AND class LIKE '%-exclusive' ORDER BY frequency DESC, "
                                 "feature_id")
    page = client.get("/bases/tiny-diff/model-diff")
    assert page.status_code == 200
    rows = table_rows(section_html(page.text, "model_diff_exclusive")) if exclusive else []
    assert [int(r[0]) for r in rows] == [f for (f,) in exclusive]
    spec = chart_spec(page.text, "relative-norms")
    assert spec["layer"], "the relative-norm histogram has its layers"
    (latent,) = query(warehouse, "SELECT feature_id FROM crosscoder_examples WHERE "
                                 "basis = 'tiny-diff' ORDER BY value DESC LIMIT 1")[0]
    sources = client.get(f"/bases/tiny-diff/features/{latent}")
    assert sources.status_code == 200
    labels = [r[0] for r in table_rows(section_html(sources.text, "feature_sources"))]
    assert labels == ["first", "last"]
    values = [float(m) for m in re.findall(
        r"<td>\d+</td><td>([\d.]+)</td>",
        section_html(sources.text, "crosscoder_examples").replace("\n", ""))]
    stored = [v for (v,) in query(warehouse, "SELECT value FROM crosscoder_examples WHERE "
                                             "basis = 'tiny-diff' AND feature_id = ? "
                                             "ORDER BY rank", [latent])]
    np.testing.assert_allclose(values, stored, rtol=1e-3)
    assert len(stored) > 0 and '<mark class="active"' in sources.text
    assert client.get("/bases/tiny-l2/model-diff").status_code == 404


@pytest.mark.parametrize("url, status, names", [
    ("/bases/nope", 404, "no basis named 'nope'"),
    ("/bases/tiny-l2/features/64", 404, "features 0..63"),
    ("/bases/tiny-l2/features/abc", 404, "no page at"),
    ("/runs/nope", 404, "no run named 'nope'"),
    ("/nowhere", 404, "no page at /nowhere"),
    ("/bases/tiny-l2/features/3?step=7", 400, "step=7: not a swept checkpoint"),
    ("/bases/tiny-l2/features/3?source=x", 400, "source='x': give a whole number"),
    ("/bases/tiny-l2?sort=drop", 400, "sort='drop'"),
    ("/bases/tiny-l2?page=0", 400, "page='0'"),
    ("/bases/tiny-l2?born=maybe", 400, "born='maybe'"),
    ("/bases/tiny-l2?page=2", 400, "page=2: past the last page"),
    ("/bases/tiny-diff?split=x", 400, "split='x'"),
    ("/sql/download.xlsx?q=SELECT+1", 404, "csv or parquet"),
])
def test_bad_ids_and_parameters_get_an_error_page(client, url, status, names):
    page = client.get(url)
    assert page.status_code == status
    assert names in html.unescape(page.text)
    assert "Traceback" not in page.text and 'class="error"' in page.text


def test_sql_page_runs_queries_and_downloads_them(client, warehouse):
    sql = "SELECT run, step, heldout_loss FROM checkpoints ORDER BY run, step"
    expected = query(warehouse, sql)
    page = client.get("/sql", params={"q": sql})
    assert page.status_code == 200 and f"{len(expected)} row(s)" in page.text
    csv = pa_csv.read_csv(io.BytesIO(client.get("/sql/download.csv", params={"q": sql}).content))
    assert csv.column("step").to_pylist() == [r[1] for r in expected]
    parquet = pq.read_table(io.BytesIO(
        client.get("/sql/download.parquet", params={"q": sql}).content))
    assert parquet.to_pylist() == [dict(zip(["run", "step", "heldout_loss"], r))
                                   for r in expected]


def test_sql_page_limits_rows_and_time(client):
    page = client.get("/sql", params={"q": "SELECT * FROM range(5000)"})
    assert page.status_code == 200
    assert f"the first {SQL_ROW_LIMIT} of more" in page.text
    assert len(table_rows(page.text)) == SQL_ROW_LIMIT
    slow = client.get("/sql", params={"q": "SELECT count(*) FROM range(100000) a, "
                                           "range(100000) b, range(1000) c"})
    assert slow.status_code == 400 and "time limit of 2 s" in slow.text


@pytest.mark.parametrize("sql, names", [
    ("COPY (SELECT 1 AS x) TO '{data}/x.parquet' (FORMAT parquet)", "COPY"),
    ("ATTACH '{root}/catalog.sqlite' AS c; DELETE FROM c.ducklake_snapshot", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("DELETE FROM checkpoints", "DELETE"),
    ("SELECT * FROM read_text('/etc/hostname')", "data folder"),
    ("SELECT * FROM ducklake_cleanup_old_files('lake', cleanup_all => true)",
     "ducklake_cleanup_old_files()"),
])
def test_sql_page_refuses_writes_and_leaves_the_warehouse_unchanged(client, warehouse, sql,
                                                                    names):
    before = snapshot(warehouse)
    text = sql.format(data=warehouse / "data", root=warehouse)
    page = client.get("/sql", params={"q": text})
    assert page.status_code == 400 and names in html.unescape(page.text)
    download = client.get("/sql/download.csv", params={"q": text})
    assert download.status_code == 400
    assert snapshot(warehouse) == before
    assert client.get("/sql", params={"q": "SELECT count(*) FROM checkpoints"}).status_code == 200


def test_a_commit_shows_after_a_reload(warehouse_copy):
    client = TestClient(create_app(warehouse_copy))
    assert "fresh-run" not in client.get("/").text
    with Warehouse(warehouse_copy).writer("test") as writer:
        writer.put("runs", [{"run": "fresh-run", "kind": "external", "featurestore_version": "0",
                             "created_at": datetime.now(timezone.utc)}])
    assert 'href="/runs/fresh-run"' in client.get("/").text


def test_cached_tables_read_as_the_lake_does(client, warehouse):
    """The app copies small tables into memory per snapshot: every page query must answer the
    same from the copy as from the lake."""
    uncached = TestClient(create_app(warehouse, cached_rows=0, direct_files=False))
    for url in ("/", "/bases/tiny-l2", "/bases/tiny-l2/features/5", "/bases/tiny-diff/model-diff",
                "/bases/tiny-fn/features/2?step=8"):
        assert client.get(url).text == uncached.get(url).text, url


def test_every_page_query_declares_itself():
    """Each sql/pages file opens with a comment saying what it returns (the pages show it)."""
    for name in page_query_names():
        assert len(page_query(name).description) > 20, name


def test_serve_refuses_a_public_address_without_public(warehouse):
    result = CliRunner().invoke(cli, ["--warehouse", str(warehouse), "serve",
                                      "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--public" in result.output
    missing = CliRunner().invoke(cli, ["--warehouse", str(warehouse / "nope"), "serve"])
    assert missing.exit_code == 1 and "no warehouse at" in missing.output
