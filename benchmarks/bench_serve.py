"""The web app's pages on a large warehouse: server time of `featurestore serve`.

The warehouse is bench_warehouse_scale's synthetic basis (its generator: FEATURES features x
CHECKPOINTS checkpoints of trajectories, about 105M feature_activations rows at full size),
plus a second commit with the rest of what the pages read, as a sweep and a fit would leave it:
the basis's bases row (a pooled basis), its run and checkpoints, a token vocabulary, features,
decoder_directions, checkpoint_summary, birth_summary, split_profiles at every checkpoint,
feature_examples at enough checkpoints to stay on the lake at full size (the sweep writes them at
every checkpoint, far more than the app copies into memory), and feature_directions at the first
and last checkpoints only (at every checkpoint they would be features x checkpoints x D_MODEL
floats), the pair the feature page compares by default.

Pages are requested through starlette's TestClient in this process: server time (the queries,
the charts' specs, the template), not the browser's. Figures, against baselines measured in the
same run, interleaved round-robin:

    feature page        /bases/<basis>/features/<id>, on a warm app (session open, small tables
                        in memory); each sample asks for a feature never requested before, at
                        its default checkpoint or at one of the checkpoints holding contexts.
                        Baseline: the same requests to an app that caches nothing
                        (cached_rows=0, direct_files=False: every query reads the lake)
    terminal card       feature_card(), which opens a connection of its own each call
    basis page          /bases/<basis>: fit quality, birth timeline, the first page of the
                        feature table; baseline the app that caches nothing
    first page          a new app's first feature page: the session opened and the small tables
                        copied, as after every commit; baseline the same without the copies

Figures are pages/s; the notes give each median, min and max in ms. Before timing, the cached
and the uncached app must return the same HTML for the same pages. After timing, every query
of the feature page and of the basis page is timed as the page runs it, on both apps (where the
time goes), and a fresh process serves one page to measure the app's memory with its tables
copied (its peak resident set, read as the harness does: ru_maxrss would count the parent's).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
from bench_warehouse_scale import (
    BASIS,
    CHECKPOINTS,
    FEATURES,
    QUICK_CHECKPOINTS,
    QUICK_FEATURES,
    QUICK_K,
    QUICK_TOKENS,
    SEQUENCE_LENGTH,
    SPLITS,
    TOKENS,
    K,
    cycled,
    directory_bytes,
    generate_warehouse,
)
from harness import BenchmarkResult, Figure, RunOptions, in_fresh_process, measure
from starlette.testclient import TestClient

from featurestore.queries.feature_card import feature_card
from featurestore.queries.page_queries import page_query, page_query_names
from featurestore.queries.web_app import CACHED_ROWS, create_app
from featurestore.schema import package_version, spec
from featurestore.warehouse import Warehouse, connect
from featurestore.writer import utc_now

RUN = "scale-run"
D_MODEL = 64
VOCABULARY = 512
EXAMPLES = 8  # contexts per feature and checkpoint, as the sweep keeps
CONTEXT_BEFORE, CONTEXT_AFTER = 8, 4  # tokens around an activating one, as the sweep keeps
POOLED_CHECKPOINTS = 4  # the checkpoints the basis was fitted on (bases.sources)
TARGET_MS = 200.0  # a warm feature page at full size


@dataclass(frozen=True)
class Samples:
    """Timed samples per figure (each after one warm-up), and pages whose queries are timed one
    by one: the basis page takes seconds at full size, so it gets fewer."""

    feature_pages: int
    basis_pages: int
    new_sessions: int
    breakdown_feature_pages: int
    breakdown_basis_pages: int


SAMPLES = Samples(feature_pages=15, basis_pages=4, new_sessions=3, breakdown_feature_pages=5,
                  breakdown_basis_pages=2)
QUICK_SAMPLES = Samples(feature_pages=4, basis_pages=2, new_sessions=2, breakdown_feature_pages=3,
                        breakdown_basis_pages=1)


# ---------------------------------------------------------------------------------------------
# The rest of the warehouse


def add_page_tables(root: Path, features: int, steps: list[int], tokens: int,
                    seed: int = 1) -> dict:
    """Commit the tables the pages read that generate_warehouse leaves out; return their row
    counts and the checkpoints holding contexts."""
    rng = np.random.default_rng(seed)
    steps_array = np.asarray(steps, dtype=np.int64)
    # Enough checkpoints of contexts that the table is too big to copy into memory, as the
    # sweep's (contexts at every checkpoint) is: the page reads it from the lake.
    n_example_steps = min(len(steps), CACHED_ROWS // (features * EXAMPLES) + 1)
    example_steps = steps_array[np.linspace(0, len(steps) - 1, n_example_steps).round()
                                .astype(int)]
    pooled = steps_array[np.linspace(0, len(steps) - 1, POOLED_CHECKPOINTS).round().astype(int)]
    sources = [{"label": f"step_{s}", "activation_set": f"{RUN}-{s}", "run": RUN, "step": int(s),
                "stage": "layer_0_post_mlp", "norm_scale": 1.0} for s in pooled]
    con = connect(root)
    try:
        births = birth_summary_table(con, steps_array)
    finally:
        con.close()
    tables = {
        "runs": [{
            "run": RUN, "kind": "pretrain", "model_family": "demo", "seed": 0,
            "steps": int(steps[-1]), "d_model": D_MODEL, "n_layers": 2,
            "featurestore_version": package_version(), "created_at": utc_now()}],
        "checkpoints": checkpoints_table(rng, steps_array, tokens),
        "token_strings": pa.table({
            "run": pa.repeat(RUN, VOCABULARY), "token_id": np.arange(VOCABULARY),
            "token_text": [f" tok{i}" for i in range(VOCABULARY)],
            "tokenizer": pa.repeat("synthetic vocabulary", VOCABULARY)}),
        "bases": [{
            "name": BASIS, "kind": "pooled", "arch": "batchtopk", "n_sources": 1,
            "d_model": D_MODEL, "d_hidden": features, "k": K, "sources": sources,
            "config": json.dumps({"d_model": D_MODEL, "d_hidden": features}),
            "trainer_config": json.dumps({"seed": 0}), "path": f"bases/{BASIS}",
            "steps": 1000, "tokens": 1000 * 4096, "run": RUN, "stage": "layer_0_post_mlp",
            "created_at": utc_now()}],
        "features": features_table(rng, features),
        "decoder_directions": pa.table({
            "basis": pa.repeat(BASIS, features), "feature_id": np.arange(features, dtype=np.int32),
            "source": pa.repeat(sources[0]["label"], features),
            "source_index": np.zeros(features, dtype=np.int32),
            "norm": np.ones(features), "direction": unit_rows(rng, features)}),
        "feature_directions": feature_directions_table(rng, features, steps_array[[0, -1]]),
        "checkpoint_summary": checkpoint_summary_table(rng, steps_array, tokens, features),
        "birth_summary": births,
        "split_profiles": split_profiles_table(rng, features, steps_array, tokens),
        "feature_examples": examples_table(rng, features, example_steps, tokens),
    }
    tables = {name: complete(name, rows) for name, rows in tables.items()}
    with Warehouse(root).writer("bench-serve") as writer:
        for name, rows in tables.items():
            writer.put(name, rows)
    return {"rows": {name: rows.num_rows for name, rows in tables.items()},
            "example_steps": [int(s) for s in example_steps]}


def complete(table: str, rows: pa.Table | list[dict]) -> pa.Table:
    """`rows` with the table's schema, its columns not given as NULLs."""
    schema = spec(table).arrow_schema
    if isinstance(rows, list):
        return pa.Table.from_pylist(rows, schema=schema)
    for field in schema:
        if field.name not in rows.column_names:
            rows = rows.append_column(field, pa.nulls(rows.num_rows, field.type))
    return rows.select(schema.names).cast(schema)


def checkpoints_table(rng: np.random.Generator, steps: np.ndarray, tokens: int) -> list[dict]:
    loss = 4.0 * np.exp(-steps / max(1, steps[-1]) * 3) + rng.uniform(0, 0.05, len(steps))
    accuracy = 1 - loss / 5

    splits = (("train", 1.0), ("heldout", 1.05), *((split, 1.1) for split in SPLITS))

    def metrics(i: int) -> list[dict]:
        return [{"split": split, "loss": float(loss[i] * scale), "accuracy": float(accuracy[i])}
                for split, scale in splits]

    return [{
        "run": RUN, "step": int(step), "tokens_seen": int(step) * tokens,
        "path": f"runs/{RUN}/step_{step}", "train_loss": float(loss[i]),
        "train_accuracy": float(accuracy[i]), "heldout_loss": float(loss[i] * 1.05),
        "heldout_accuracy": float(accuracy[i]), "split_metrics": metrics(i),
        "created_at": utc_now()} for i, step in enumerate(steps)]


def features_table(rng: np.random.Generator, features: int) -> pa.Table:
    frequency = rng.uniform(0, 0.05, features)
    return pa.table({
        "basis": pa.repeat(BASIS, features),
        "feature_id": np.arange(features, dtype=np.int32),
        "designated_shared": np.zeros(features, dtype=bool),
        "decoder_norms": pa.ListArray.from_arrays(
            pa.array(np.arange(features + 1, dtype=np.int32)), pa.array(np.ones(features))),
        "frequency": frequency,
        "mean_activation": rng.uniform(0.5, 3.0, features),
        "max_activation": rng.uniform(3.0, 12.0, features),
        "dead": frequency < 1e-4,
    })


def unit_rows(rng: np.random.Generator, rows: int) -> pa.Array:
    """`rows` random unit vectors of length D_MODEL as a FLOAT[] column."""
    vectors = rng.standard_normal((rows, D_MODEL)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    offsets = np.arange(0, rows * D_MODEL + 1, D_MODEL, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(vectors.ravel()))


def feature_directions_table(rng: np.random.Generator, features: int,
                             steps: np.ndarray) -> pa.Table:
    n = features * len(steps)
    return pa.table({
        "basis": pa.repeat(BASIS, n),
        "feature_id": np.repeat(np.arange(features, dtype=np.int32), len(steps)),
        "step": np.tile(steps, features),
        "norm": rng.uniform(0.5, 2.0, n),
        "direction": unit_rows(rng, n),
    })


def checkpoint_summary_table(rng: np.random.Generator, steps: np.ndarray, tokens: int,
                             features: int) -> pa.Table:
    n = len(steps)
    explained = np.clip(0.6 + 0.3 * steps / max(1, steps[-1]) + rng.normal(0, 0.01, n), 0, 1)
    l0 = rng.uniform(0.8, 1.0, n) * K
    return pa.table({
        "basis": pa.repeat(BASIS, n), "step": steps, "n_tokens": np.full(n, tokens),
        "explained_variance": explained, "relative_reconstruction_error": np.sqrt(1 - explained),
        "l0": l0, "active_fraction": l0 / features, "dead_fraction": rng.uniform(0, 0.05, n),
    })


def birth_summary_table(con, steps: np.ndarray) -> pa.Table:
    """Births per window between consecutive checkpoints, from the generated births, under the
    generated births' rule, with a flat null."""
    rule, = con.execute(f"SELECT DISTINCT {', '.join(RULE_COLUMNS)} FROM births WHERE basis = ?",
                        [BASIS]).fetchall()
    counts = dict(((step, (n, censored)) for step, n, censored in con.execute(
        "SELECT birth_step, count(*), count(*) FILTER (birth_censored) FROM births "
        "WHERE basis = ? AND birth_step IS NOT NULL GROUP BY birth_step", [BASIS]).fetchall()))
    (features, at_init), = con.execute(
        "SELECT count(*), count(*) FILTER (present_at_init) FROM births WHERE basis = ?",
        [BASIS]).fetchall()
    ends = steps[1:]
    births = np.array([counts.get(int(s), (0, 0))[0] for s in ends], dtype=np.int32)
    censored = np.array([counts.get(int(s), (0, 0))[1] for s in ends], dtype=np.int32)
    n = len(ends)
    null_mean = np.full(n, births.sum() / max(1, n))
    columns = {c: pa.repeat(v, n) for c, v in zip(RULE_COLUMNS, rule)}
    return pa.table({
        "basis": pa.repeat(BASIS, n), **columns, "window_start": steps[:-1], "window_end": ends,
        "births": births, "censored_births": censored, "null_births_mean": null_mean,
        "null_censored_births_mean": np.zeros(n), "null_births_sd": np.sqrt(null_mean),
        "n_features": np.full(n, features, dtype=np.int32),
        "n_present_at_init": np.full(n, at_init, dtype=np.int32),
        "birth_rate": births / features, "null_false_birth_rate": null_mean / features,
        "permutations": np.full(n, 100, dtype=np.int32), "seed": np.zeros(n, dtype=np.int64),
    })


RULE_COLUMNS = ("metric", "presence", "threshold", "persistence", "stable_eps", "stable_cos")


def split_profiles_table(rng: np.random.Generator, features: int, steps: np.ndarray,
                         tokens: int) -> pa.Table:
    """Every feature at every checkpoint on each token split, in key order."""
    n = features * len(steps) * len(SPLITS)
    rate = rng.uniform(0, 0.05, n)
    return pa.table({
        "basis": pa.repeat(BASIS, n),
        "feature_id": np.repeat(np.arange(features, dtype=np.int32), len(steps) * len(SPLITS)),
        "step": np.tile(np.repeat(steps, len(SPLITS)), features),
        "split": cycled(SPLITS, features * len(steps)),
        "n_tokens": np.full(n, tokens // len(SPLITS), dtype=np.int64),
        "activation_rate": rate,
        "mean_activation": rate * rng.uniform(0.5, 3.0, n),
    })


def examples_table(rng: np.random.Generator, features: int, steps: np.ndarray,
                   tokens: int) -> pa.Table:
    """EXAMPLES top contexts per feature and checkpoint, in key order, each with the token ids
    around the activating token (cut at the sequence's ends)."""
    n = features * len(steps) * EXAMPLES
    token = rng.integers(0, tokens, n)
    sequence, position = token // SEQUENCE_LENGTH, token % SEQUENCE_LENGTH
    start = np.maximum(position - CONTEXT_BEFORE, 0)
    end = np.minimum(position + CONTEXT_AFTER, SEQUENCE_LENGTH - 1)
    offsets = np.concatenate([[0], np.cumsum(end - start + 1)]).astype(np.int32)
    context = rng.integers(0, VOCABULARY, offsets[-1], dtype=np.int32)
    value = -np.sort(-rng.exponential(1.0, (n // EXAMPLES, EXAMPLES)), axis=1).ravel() + 1.0
    return pa.table({
        "basis": pa.repeat(BASIS, n),
        "feature_id": np.repeat(np.arange(features, dtype=np.int32), len(steps) * EXAMPLES),
        "step": np.tile(np.repeat(steps, EXAMPLES), features),
        "rank": np.tile(np.arange(1, EXAMPLES + 1, dtype=np.int32), n // EXAMPLES),
        "value": value.astype(np.float32),
        "sequence_id": sequence,
        "position": position.astype(np.int32),
        "split": pa.DictionaryArray.from_arrays((sequence % len(SPLITS)).astype(np.int32),
                                                pa.array(SPLITS)).cast(pa.string()),
        "context_token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(context)),
        "context_start": start.astype(np.int32),
        "token_text": pa.nulls(n, pa.string()),
        "context_text": pa.nulls(n, pa.string()),
    })


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class FeatureRequests:
    """Feature pages no request has asked for yet: feature ids in a scattered order (never the
    same twice, so no row group or result of one sample was read for an earlier one), each at
    the next checkpoint of `steps` (None: the page's default, the feature's peak)."""

    features: int
    steps: list[int | None]
    issued: int = 0

    def next(self) -> tuple[int, int | None]:
        # An odd stride is coprime to a power-of-two feature count: a permutation of the ids.
        feature = (self.issued * 7919 + 13) % self.features
        step = self.steps[self.issued % len(self.steps)]
        self.issued += 1
        return feature, step


def feature_url(feature: int, step: int | None) -> str:
    return f"/bases/{BASIS}/features/{feature}" + (f"?step={step}" if step is not None else "")


def get(client: TestClient, url: str) -> str:
    response = client.get(url)
    if response.status_code != 200:
        raise AssertionError(f"{url}: status {response.status_code}: {response.text[:500]}")
    return response.text


def run(options: RunOptions) -> BenchmarkResult:
    if options.quick:
        features, checkpoints, tokens, k = QUICK_FEATURES, QUICK_CHECKPOINTS, QUICK_TOKENS, QUICK_K
        samples = QUICK_SAMPLES
    else:
        features, checkpoints, tokens, k = FEATURES, CHECKPOINTS, TOKENS, K
        samples = SAMPLES
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp) / "warehouse"
        generated = generate_warehouse(root, features, checkpoints, tokens, k)
        started = time.perf_counter()
        added = add_page_tables(root, features, generated["steps"], tokens)
        add_seconds = time.perf_counter() - started
        warehouse_bytes = directory_bytes(root)
        example_steps = added["example_steps"]
        # The default checkpoint, then checkpoints holding contexts (the last, the middle one).
        requests = FeatureRequests(features, [None, example_steps[-1],
                                              example_steps[len(example_steps) // 2]])
        apps = {"cached": create_app(root),
                "lake": create_app(root, cached_rows=0, direct_files=False)}
        try:
            clients = {name: TestClient(app) for name, app in apps.items()}
            checked = check_same_pages(clients, requests)
            measurements = measure(feature_figures(clients, requests, root),
                                   replace(options, repeats=samples.feature_pages))
            measurements += measure(basis_figures(clients),
                                    replace(options, repeats=samples.basis_pages))
            measurements += measure(open_figures(root, requests),
                                    replace(options, repeats=samples.new_sessions))
            feature_pages = [feature_url(*requests.next())
                             for _ in range(samples.breakdown_feature_pages)]
            breakdown = {
                "feature page": {name: query_breakdown(app, feature_pages)
                                 for name, app in apps.items()},
                "basis page": {name: query_breakdown(
                    app, [f"/bases/{BASIS}"] * samples.breakdown_basis_pages)
                    for name, app in apps.items()}}
            cached_tables = cached_table_rows(apps["cached"])
        finally:
            for app in apps.values():
                app.state.live.close()
        memory, peak_mb = in_fresh_process(serve_one_page, str(root),
                                           feature_url(*requests.next()))

    result = BenchmarkResult(
        name="serve",
        description=(f"featurestore serve's pages, server time: {features:,} features x "
                     f"{checkpoints} checkpoints, {generated['activation_rows']:,} "
                     "feature_activations rows; small tables in memory against every query on "
                     "the lake"),
        measurements=measurements,
        config={"features": features, "checkpoints": checkpoints, "tokens_per_checkpoint": tokens,
                "k": k, "d_model": D_MODEL, "cached_rows": CACHED_ROWS,
                "example_steps": example_steps, "samples": asdict(samples),
                "pages_checked": checked},
        details={
            "feature_activation_rows": generated["activation_rows"],
            "rows_added": added["rows"],
            "generation_seconds": {**generated["timings"], "page_tables_s": add_seconds},
            "warehouse_bytes": warehouse_bytes,
            "cached_tables": cached_tables,
            "memory_mb": {**memory, "peak_rss": peak_mb},
            "query_ms": breakdown,
        },
    )
    result.details["latency_ms"] = {m.label: {"median": 1000 / m.median, "min": 1000 / m.max,
                                              "max": 1000 / m.min} for m in measurements}
    result.notes += [
        f"generated in {generated['timings']['total_s']:.0f} s + {add_seconds:.0f} s for the "
        f"page tables; warehouse on disk {warehouse_bytes / 1e6:,.0f} MB; "
        f"{len(cached_tables)} tables copied into memory "
        f"({sum(cached_tables.values()):,} rows)",
        "latency per page, ms:"]
    result.notes += [f"  {label}: median {ms['median']:,.0f}, min {ms['min']:,.0f}, "
                     f"max {ms['max']:,.0f}" for label, ms in result.details["latency_ms"].items()]
    warm = result.details["latency_ms"]["feature page"]["median"]
    verdict = "met" if warm <= TARGET_MS else "missed"
    sizes = "; quick sizes, not the target's" if options.quick else ""
    result.notes.append(f"target: a warm feature page in at most {TARGET_MS:.0f} ms at full size "
                        f"({verdict} here{sizes})")
    result.notes.append(f"cached and uncached apps returned the same HTML for {len(checked)} "
                        "pages")
    result.notes.append(
        f"memory of a fresh process serving one feature page: peak RSS {peak_mb:,.0f} MB "
        f"({memory['before_session']:,.0f} MB with the app imported, before its session; "
        f"DuckDB holds {memory['duckdb']:,.0f} MB)")
    pages = {"feature page": samples.breakdown_feature_pages,
             "basis page": samples.breakdown_basis_pages}
    for page, times in breakdown.items():
        result.notes.append(f"{page}, where the time goes (median ms over {pages[page]} "
                            "page(s), cached app / every query on the lake):")
        cached, lake = times["cached"], times["lake"]
        for name in sorted(cached, key=lambda n: -max(cached[n], lake.get(n, 0))):
            result.notes.append(f"  {name}: {cached[name]:.1f} / "
                                f"{lake.get(name, float('nan')):.1f}")
    return result


def check_same_pages(clients: dict[str, TestClient], requests: FeatureRequests) -> list[str]:
    """The copies in memory answer as the lake does: both apps return the same HTML."""
    urls = ["/", f"/runs/{RUN}", f"/bases/{BASIS}"]
    urls += [feature_url(*requests.next()) for _ in range(len(requests.steps))]
    for url in urls:
        cached, lake = (get(client, url) for client in clients.values())
        if cached != lake:
            line = next(i for i, (a, b) in enumerate(zip(cached.splitlines(),
                                                         lake.splitlines())) if a != b)
            raise AssertionError(f"{url}: the cached app's page differs from the uncached "
                                 f"one's from line {line + 1}")
    return urls


def feature_figures(clients: dict[str, TestClient], requests: FeatureRequests, root: Path
                    ) -> list[Figure]:
    def feature_page(client: TestClient):
        def work() -> float:
            get(client, feature_url(*requests.next()))
            return 1
        return work

    def card() -> float:
        feature, step = requests.next()
        feature_card(BASIS, feature, step, warehouse=str(root))
        return 1

    return [
        Figure("feature page (no cache)", "pages/s", feature_page(clients["lake"])),
        Figure("feature page", "pages/s", feature_page(clients["cached"]),
               baseline="feature page (no cache)"),
        Figure("terminal card (feature_card)", "pages/s", card,
               note="fewer parts than the page, and a new connection each call"),
    ]


def basis_figures(clients: dict[str, TestClient]) -> list[Figure]:
    def basis_page(client: TestClient):
        def work() -> float:
            get(client, f"/bases/{BASIS}")
            return 1
        return work

    return [
        Figure("basis page (no cache)", "pages/s", basis_page(clients["lake"])),
        Figure("basis page", "pages/s", basis_page(clients["cached"]),
               baseline="basis page (no cache)"),
    ]


def open_figures(root: Path, requests: FeatureRequests) -> list[Figure]:
    """A new app's first feature page: what the first reload after each commit pays."""
    def first_page(prepared: bool):
        def work() -> float:
            app = (create_app(root) if prepared
                   else create_app(root, cached_rows=0, direct_files=False))
            try:
                get(TestClient(app), feature_url(*requests.next()))
            finally:
                app.state.live.close()
            return 1
        return work

    return [
        Figure("first page of a session (no cache)", "pages/s", first_page(False)),
        Figure("first page of a session", "pages/s", first_page(True),
               baseline="first page of a session (no cache)",
               note="opens the session, copies the small tables and points the large ones at "
                    "their files, then renders"),
    ]


# ---------------------------------------------------------------------------------------------
# Where the time goes


class TimedConnection:
    """A session's connection whose every `execute` is timed, under the sql/pages name of the
    query (other queries by their first words); everything else goes to the connection."""

    def __init__(self, con, times: dict[str, float]):
        self._con = con
        self._times = times

    def execute(self, sql: str, *parameters):
        started = time.perf_counter()
        self._con.execute(sql, *parameters)
        name = page_query_name(sql)
        self._times[name] = self._times.get(name, 0.0) + time.perf_counter() - started
        return self._con

    def __getattr__(self, name: str):
        return getattr(self._con, name)


class TimedLive:
    """An app's LiveWarehouse whose sessions hand out a TimedConnection, and whose entry (the
    check for a newer snapshot) is timed too."""

    def __init__(self, live):
        self.live = live
        self.times: dict[str, float] = {}

    @contextmanager
    def session(self) -> Iterator:
        started = time.perf_counter()
        with self.live.session() as session:
            self.times["(newest snapshot check)"] = time.perf_counter() - started
            yield TimedSession(TimedConnection(session.con, self.times))


@dataclass
class TimedSession:
    con: TimedConnection


def page_query_name(sql: str) -> str:
    """The sql/pages name of a query; a page query inside a bigger one (the basis page's feature
    table pages and counts its query) as the name and the words before it."""
    for text, name in page_query_texts().items():
        if sql == text:
            return name
        inner = text.rstrip().rstrip(";")
        if inner in sql:
            return f"{name} in {' '.join(sql[:sql.index(inner)].split())}"
    return " ".join(sql.split())[:60]


@cache
def page_query_texts() -> dict[str, str]:
    return {page_query(name).text: name for name in page_query_names()}


def query_breakdown(app, urls: list[str]) -> dict[str, float]:
    """Median ms per query over the pages of `urls`, plus the page in all and what is not a
    query (charts' specs, the template, the request)."""
    live = app.state.live
    client = TestClient(app)
    per_page: list[dict[str, float]] = []
    try:
        app.state.live = timed = TimedLive(live)
        for url in urls:
            timed.times = {}
            started = time.perf_counter()
            get(client, url)
            total = time.perf_counter() - started
            times = {name: 1000 * s for name, s in timed.times.items()}
            times["(not a query)"] = 1000 * total - sum(times.values())
            times["(whole page)"] = 1000 * total
            per_page.append(times)
    finally:
        app.state.live = live
    names = {name for times in per_page for name in times}
    return {name: statistics.median(times.get(name, 0.0) for times in per_page)
            for name in names}


def cached_table_rows(app) -> dict[str, int]:
    with app.state.live.session() as session:
        tables = session.con.execute(
            "SELECT table_name, estimated_size FROM duckdb_tables() "
            "WHERE database_name = 'memory' ORDER BY table_name").fetchall()
    return dict(tables)


def serve_one_page(root: str, url: str) -> dict[str, float]:
    """In a fresh process: the resident set with the app imported, then after its first page
    (its small tables copied), and what DuckDB itself holds."""
    before = resident_mb()
    app = create_app(root)
    try:
        get(TestClient(app), url)
        after = resident_mb()
        with app.state.live.session() as session:
            (duckdb_bytes,) = session.con.execute(
                "SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()
    finally:
        app.state.live.close()
    return {"before_session": before, "after_first_page": after, "duckdb": duckdb_bytes / 1e6}


def resident_mb() -> float:
    """This process's resident set now, in MB (VmRSS, Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass  # no /proc: not Linux
    return float("nan")
