"""Every .sql file under sql/ runs against the analysed tiny warehouse: each table's DDL is the lake
table's, each view reads, each macro is called, and each query file runs with parameters the
warehouse has rows for. The files are listed from the folder, so a new file fails here until
CASES says how to exercise it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pytest

from featurestore.birth_rules import BIRTH_RULE_COLUMNS, births_rule_sets
from featurestore.ingest.shared_feature_fit import MATCH_COSINE
from featurestore.queries.grokking_report import TOP_FEATURES
from featurestore.queries.page_queries import PARAMETER
from featurestore.queries.report import QUERY_PARAMETERS
from featurestore.queries.web_app import FLAG_NU, HISTOGRAM_BINS, NEIGHBOURS
from featurestore.schema import load_query
from featurestore.warehouse import LAKE, connect

from .conftest import TINY_RUN

SQL = Path(__file__).resolve().parent.parent / "sql"
FILES = sorted(p.relative_to(SQL).with_suffix("").as_posix() for p in SQL.rglob("*.sql"))
TABLES = [name for name in FILES if name.startswith("tables/")]
OTHERS = [name for name in FILES if not name.startswith("tables/")]


@dataclass(frozen=True)
class Case:
    """How the analysed warehouse exercises one file (views and macros exist on every
    connection; a query file is run)."""

    # SQL run after the file, whose rows are checked instead of the file's: a macro's calls,
    # what a statement created.
    checks: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)  # $parameters other than the warehouse's values
    setup: str = ""  # a query file run first, on the same connection (a temp table it reads)
    empty: str = ""  # why the warehouse has no rows for it; "" when it must return some


CROSSCODER = {"basis": "tiny-diff", "feature": 0}
NO_SWEEP = "the fixture has no crosscoder-sweep of tiny-diff"
NO_EXCLUSIVE = "tiny-diff has no exclusive latents"
NO_GROKKING = "the fixture has no grokking run"
ONE_SEED = "tiny-l2 was fitted with one seed"
NO_FREQUENCIES = "the fixture has no feature-frequencies"
BIRTH_QUERY = Case(setup="birth_analysis/all_births")

CASES = {
    "birth_analysis/all_births": Case(checks=("SELECT * FROM all_births",)),
    "birth_analysis/births": BIRTH_QUERY,
    "birth_analysis/seed_agreement": BIRTH_QUERY,  # one row of zero counts
    "birth_analysis/seeds": Case(empty=ONE_SEED),
    "birth_analysis/summary": BIRTH_QUERY,
    "birth_analysis/trajectory_counts": Case(),
    "demo/activation_sets": Case(),
    "demo/births": Case(),
    "demo/fit_quality": Case(),
    "demo/last_checkpoint_accuracy": Case(),
    "demo/lineage_sources": Case(),
    "demo/model_diff_classes": Case(),
    "demo/patch_effects": Case(),
    "demo/runs": Case(),
    "demo/top_born_features": Case(),
    "demo/top_exclusive_features": Case(empty=NO_EXCLUSIVE),
    "grokking_experiment/answer_share": Case(empty=NO_FREQUENCIES),
    "grokking_experiment/feature_kinds": Case(empty=NO_FREQUENCIES),
    "grokking_experiment/phases": Case(empty=NO_GROKKING),
    "grokking_report/answer_features": Case(empty=NO_GROKKING),
    "grokking_report/births_against_jump": Case(empty=NO_GROKKING),
    "grokking_report/causal_checks": Case(empty=NO_GROKKING),
    "grokking_report/features_and_frequencies": Case(empty=NO_GROKKING),
    "grokking_report/features_over_training": Case(empty=NO_GROKKING),
    "grokking_report/phases": Case(empty=NO_GROKKING),
    "grokking_report/plot_births": Case(empty=NO_GROKKING),
    "grokking_report/plot_feature_trajectories": Case(empty=NO_GROKKING),
    "grokking_report/plot_phase_steps": Case(empty=NO_GROKKING),
    "grokking_report/plot_progress_measures": Case(empty=NO_GROKKING),
    "grokking_report/progress_measures": Case(empty=NO_GROKKING),
    "macros/context_tokens": Case(checks=("SELECT context_tokens([1, 2, 3], $run)",)),
    "macros/example_context": Case(checks=("SELECT example_context(NULL, [5, 6, 7], 11, 10)",
                                           "SELECT example_token(NULL, [5, 6, 7], 11, 10)")),
    "macros/feature_births": Case(checks=(
        "SELECT * FROM feature_births($basis, $metric, $threshold, $persistence, $stable_eps, "
        "$stable_cos, presence := $presence)",)),
    "macros/feature_compare": Case(checks=(
        "SELECT * FROM feature_compare($basis, $source, $target)",)),
    "macros/model_diff_class": Case(checks=("SELECT model_diff_class(0.1, 'a', 'b', 0.3, 0.7)",)),
    "macros/most_exclusive_latents": Case(
        checks=("SELECT * FROM most_exclusive_latents($basis, 2)",), params=CROSSCODER),
    "macros/stage_layer": Case(checks=("SELECT stage_layer('layer_2_post_mlp')",)),
    "pages/bases": Case(),
    "pages/basis": Case(),
    "pages/basis_features": Case(),
    "pages/basis_fit_quality": Case(),
    "pages/basis_latents": Case(params=CROSSCODER),
    "pages/basis_steps": Case(),
    "pages/crosscoder_examples": Case(params=CROSSCODER, empty=NO_SWEEP),
    "pages/feature": Case(),
    "pages/feature_activations": Case(),
    "pages/feature_birth": Case(),
    "pages/feature_diff": Case(),
    "pages/feature_examples": Case(),
    "pages/feature_lineage": Case(),
    "pages/feature_neighbours": Case(),
    "pages/feature_patches": Case(),
    "pages/feature_sources": Case(params=CROSSCODER, empty=NO_SWEEP),
    "pages/feature_splits": Case(),
    "pages/feature_trajectory": Case(),
    "pages/model_diff_exclusive": Case(params=CROSSCODER, empty=NO_EXCLUSIVE),
    "pages/model_diff_summary": Case(params=CROSSCODER),
    "pages/run": Case(),
    "pages/run_bases": Case(),
    "pages/run_checkpoints": Case(),
    "pages/runs": Case(),
    "report/births": Case(),
    "report/births_across_seeds": Case(empty=ONE_SEED),
    "report/causal_importance": Case(),
    "report/crosscoder_training": Case(params=CROSSCODER),
    "report/fit_quality": Case(),
    "report/latent_classes": Case(params=CROSSCODER),
    "report/lineage": Case(),
    "report/most_exclusive_contexts": Case(params=CROSSCODER, empty=NO_SWEEP),
    "report/most_exclusive_latents": Case(params=CROSSCODER, empty=NO_SWEEP),
    "report/stability": Case(empty=ONE_SEED),
    "report/top_examples": Case(),
    "views/checkpoint_metrics": Case(),
    "views/frequency_births": Case(empty=NO_FREQUENCIES),
    "views/grokking_phases": Case(empty=NO_GROKKING),
    "views/model_diff": Case(),
    "views/model_diff_summary": Case(),
    "views/relative_norm_histogram": Case(),
    "views/run_summary": Case(),
}


@pytest.fixture(scope="module")
def con(analysed_warehouse):
    con = connect(analysed_warehouse)
    yield con
    con.close()


@pytest.fixture(scope="module")
def values(con) -> dict:
    """A value for every $parameter of the files, naming rows the warehouse has: tiny-l2 (a
    shared basis), a feature of it that was patched and mapped by feature-lineage, its first and
    last swept steps, its stored births rule, and the constants the callers pass."""
    (feature,), = con.execute(
        "SELECT min(dst_id::BIGINT) FROM lineage_edges "
        "WHERE basis = 'tiny-l2' AND dst_type = 'feature'").fetchall()
    (first, step, n_steps), = con.execute(
        "SELECT min(step), max(step), count(DISTINCT step) FROM trajectories "
        "WHERE basis = 'tiny-l2'").fetchall()
    rule = births_rule_sets(con, "tiny-l2")[0]
    return {"run": TINY_RUN, "basis": "tiny-l2", "feature": feature, "step": step,
            "source": first, "target": step, **{c: rule[c] for c in BIRTH_RULE_COLUMNS},
            "diff_basis": "tiny-diff", "patch_basis": "tiny-l2",
            "bins": HISTOGRAM_BINS, "limit": NEIGHBOURS, "flag_nu": FLAG_NU,
            **QUERY_PARAMETERS, "top_features": TOP_FEATURES,
            "orders": [list(range(n_steps))[::-1]], "permutations": 1, "seed": 0,
            "agreement": None, "matched": None, "other": 1, "cosine": MATCH_COSINE}


def run(cursor: duckdb.DuckDBPyConnection, sql: str, values: dict) -> list[tuple]:
    """`sql`'s rows, each $name bound from `values`."""
    names = set(PARAMETER.findall(sql))
    missing = sorted(names - set(values))
    assert not missing, f"no value for ${', $'.join(missing)}: add one to `values`"
    result = cursor.execute(sql, {name: values[name] for name in names})
    return result.fetchall() if result.description else []


@pytest.mark.parametrize("name", OTHERS)
def test_every_view_macro_and_query_runs(name, con, values):
    if name not in CASES:
        pytest.fail(f"sql/{name}.sql is not exercised: add it to CASES in {Path(__file__).name}")
    case = CASES[name]
    kind, _, short = name.partition("/")
    values = {**values, **case.params}
    cursor = con.cursor()  # its own temporary tables
    try:
        if kind == "views":
            rows = run(cursor, f"SELECT * FROM {short}", values)
        elif kind == "macros":  # created on every connection, like the views
            rows = [row for check in case.checks for row in run(cursor, check, values)]
        else:
            if case.setup:
                run(cursor, load_query(case.setup), values)
            rows = run(cursor, load_query(name), values)
            for check in case.checks:
                rows = run(cursor, check, values)
    finally:
        cursor.close()
    assert rows or case.empty, f"sql/{name}.sql returned no rows from the analysed warehouse"


def test_every_case_names_a_file():
    assert sorted(set(CASES) - set(OTHERS)) == []


@pytest.fixture(scope="module")
def declared():
    """Every table as its DDL alone creates it, in a scratch DuckDB."""
    scratch = duckdb.connect(":memory:")
    for name in TABLES:
        scratch.execute(load_query(name))
    yield scratch
    scratch.close()


@pytest.mark.parametrize("name", TABLES)
def test_every_table_is_the_lake_table_its_ddl_declares(name, con, declared):
    table = name.removeprefix("tables/")
    ddl = declared.execute(f"SELECT * FROM {table} LIMIT 0").description
    lake = con.execute(f"SELECT * FROM {LAKE}.{table} LIMIT 0").description
    view = con.execute(f"SELECT * FROM {table} LIMIT 0").description
    # The lake stores JSON as text, and a column added later comes last there; the view over it
    # has the DDL's columns, in its order, with its types.
    assert {d[0] for d in lake} == {d[0] for d in ddl}
    assert [(d[0], str(d[1])) for d in view] == [(d[0], str(d[1])) for d in ddl]


@pytest.mark.parametrize("name", FILES)
def test_every_file_says_what_it_is(name):
    assert load_query(name).startswith("-- "), f"sql/{name}.sql: start with a comment"
