"""feature-birth-analyze: the birth rule of sql/macros/feature_births.sql against a plain-Python
statement of it, a planted run, the shuffled-order null, idempotent writes, validation, the CLI."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.ingest.birth_analysis import analyze_births
from featurestore.warehouse import Warehouse, connect

from .conftest import snapshot

NOW = datetime(2026, 1, 2, tzinfo=timezone.utc)
# Log-spaced like real checkpoints: births are read off the order, not the spacing.
STEPS = [0, 10, 30, 100, 300, 1000, 3000]
RULE = {"metric": "activation_rate", "presence": "absolute", "threshold": 0.1,
        "persistence": 2, "stable_eps": 0.1, "stable_cos": 0.9}


# --- the rule in plain Python: the statement the SQL is checked against ---------------------------


def reference(values, cos_previous, cos_final, steps, threshold, persistence, stable_eps,
              stable_cos, presence="absolute", metric="activation_rate") -> dict:
    """`values` are the metric's values (write_basis stores them as the activation rate)."""
    assert metric == "activation_rate"
    n = len(values)
    limit = threshold * max(values) if presence == "relative" else threshold

    def is_present(i):
        return values[i] >= limit and values[i] > 0

    def holds(j, present):
        """Present (or absent) at the K checkpoints j..j+K-1, or at every one to the last when
        fewer than K are left: then the run is censored."""
        return all(is_present(i) == present for i in range(j, min(j + persistence, n)))

    def censored(j):
        return None if j is None else j + persistence > n

    present_at_init = is_present(0)
    first_present = next((j for j in range(n) if is_present(j)), None)
    # a birth needs a clean onset: absent at every checkpoint before it
    birth = None if present_at_init or first_present is None or not holds(
        first_present, True) else first_present
    start = 0 if present_at_init else birth
    stabilization = death = None
    if start is not None:
        final = values[-1]

        def stable(i):
            cosine_ok = i == n - 1 or (cos_final[i] is not None and cos_final[i] >= stable_cos)
            return abs(values[i] - final) <= stable_eps * abs(final) and cosine_ok

        stabilization = next(j for j in range(start, n)
                             if all(stable(i) for i in range(j, n)))
        death = next((j for j in range(start + 1, n) if holds(j, False)), None)
    defined = [c for c in cos_previous if c is not None]
    step = lambda j: None if j is None else steps[j]  # noqa: E731
    return {"present_at_init": present_at_init, "birth_step": step(birth),
            "birth_censored": censored(birth), "stabilization_step": step(stabilization),
            "death_step": step(death), "death_censored": censored(death),
            "drift": sum(1 - c for c in defined) if defined else None,
            "feature_threshold": limit, "first_present_step": step(first_present)}


# --- building warehouses --------------------------------------------------------------------------


def silent_cosines(values) -> tuple[list, list]:
    """Cosines as the sweep would give them: undefined (NULL) where the feature is silent."""
    prev = [None] + [0.95 if a > 0 and b > 0 else None for a, b in zip(values, values[1:])]
    final = [(1.0 if j == len(values) - 1 else 0.95) if v > 0 and values[-1] > 0 else None
             for j, v in enumerate(values)]
    return prev, final


def write_basis(root: Path, basis: str, features: dict[int, dict], steps=STEPS,
                kind: str = "pooled") -> None:
    """A bases row and trajectories: features maps id -> {values, cos_previous, cos_final}."""
    with Warehouse(root).writer("test") as writer:
        writer.put("bases", [{
            "name": basis, "kind": kind, "arch": "batchtopk", "n_sources": len(steps),
            "d_model": 8, "d_hidden": len(features), "k": 2,
            "sources": [{"label": f"step_{s}", "activation_set": f"run@{s}:stage", "run": "run",
                         "step": s, "stage": "stage", "norm_scale": 1.0} for s in steps],
            "config": "{}", "trainer_config": "{}", "path": f"bases/{basis}", "steps": 10,
            "tokens": 1000, "created_at": NOW,
        }])
        if features:
            writer.put("trajectories", [{
                "basis": basis, "feature_id": f, "step": step, "n_tokens": 1000,
                "activation_rate": value, "mean_activation": value / 2,
                "mean_active_activation": None, "max_activation": value, "energy": value / 10,
                "split_activation_rates": {},
                "direction_cosine_previous": series["cos_previous"][j],
                "direction_cosine_final": series["cos_final"][j],
                "decoder_norm": value if kind == "crosscoder" else None,
            } for f, series in features.items()
                for j, (step, value) in enumerate(zip(steps, series["values"]))])


def feature(values, cos_previous=None, cos_final=None) -> dict:
    prev, final = silent_cosines(values)
    return {"values": values, "cos_previous": cos_previous or prev,
            "cos_final": cos_final or final}


def stored_births(root: Path, **where) -> dict[int, dict]:
    con = connect(root)
    try:
        clause = " AND ".join(f"{column} = ?" for column in where) or "true"
        rows = con.sql(f"SELECT * FROM births WHERE {clause} ORDER BY feature_id",
                       params=list(where.values())).to_arrow_table().to_pylist()
    finally:
        con.close()
    return {row["feature_id"]: row for row in rows}


RULE_FIELDS = ("present_at_init", "birth_step", "birth_censored", "stabilization_step",
               "death_step", "death_censored", "drift", "feature_threshold", "first_present_step")


def assert_matches_reference(stored: dict, features: dict, steps, rule: dict) -> None:
    for f, series in features.items():
        expected = reference(series["values"], series["cos_previous"], series["cos_final"],
                             steps, **rule)
        got = {k: stored[f][k] for k in RULE_FIELDS}
        assert got == pytest.approx(expected), f"feature {f}: {series}"


# --- hand examples --------------------------------------------------------------------------------

HAND = {
    # born at 30 (two checkpoints >= T in a row), stays: stable from birth
    0: feature([0, 0, .3, .3, .3, .3, .3]),
    # a one-checkpoint blip at 10 is shorter than K = 2, and it spoils the onset at 300: no clean
    # onset, so no birth (first present at 10)
    1: feature([0, .3, 0, 0, .3, .3, .3]),
    # only blips: never born
    2: feature([0, 0, .3, 0, 0, .3, 0]),
    # present at the first checkpoint: not a birth; stable from the start
    3: feature([.3, .3, .3, .3, .3, .3, .3]),
    # born at 10, dies at 300; silent from then on, so its direction cosines are NULL and it is
    # only "stable" at the final checkpoint
    4: feature([0, .3, .3, .3, 0, 0, 0]),
    # stabilisation by value: within 10% of the final 1.0 from 300 on
    5: feature([0, .2, .5, .8, .95, 1.05, 1.0]),
    # the same values, but the direction settles (cosine >= 0.9) only at 1000
    6: feature([0, .2, .5, .8, .95, 1.05, 1.0], cos_final=[None, .5, .6, .7, .85, .95, 1.0]),
    # drift: 0.1 + 0.2 + 0 + 0.05 + 0.01, the NULL skipped
    7: feature([0, .3, .3, .3, .3, .3, .3], cos_previous=[None, .9, .8, None, 1.0, .95, .99]),
    # dies at 100 after two checkpoints below; the rebirth at 1000 is not a second birth
    8: feature([0, .3, .3, 0, 0, .3, .3]),
    # above only at the last checkpoint: K = 2 checkpoints do not exist there, but it is present
    # at every one left, so it is born there, censored
    9: feature([0, 0, 0, 0, 0, 0, .3]),
    # present at init, gone for good from 10
    10: feature([.3, 0, 0, 0, 0, 0, 0]),
    # present at init, and absent only at the last checkpoint: a censored death
    11: feature([.3, .3, .3, .3, .3, .3, 0]),
    # a blip at the second-to-last checkpoint, absent at the last: not a birth
    12: feature([0, 0, 0, 0, 0, .3, 0]),
}


@pytest.fixture(scope="module")
def hand_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hand") / "warehouse"
    write_basis(root, "hand", HAND, kind="crosscoder")
    return root


def test_hand_examples_follow_the_rule(hand_root):
    analyze_births("hand", **RULE, permutations=2, warehouse=hand_root)
    stored = stored_births(hand_root, basis="hand", **RULE)
    assert_matches_reference(stored, HAND, STEPS, RULE)

    # The statement itself, spelled out for the cases the examples are about.
    birth = {f: row["birth_step"] for f, row in stored.items()}
    assert birth == {0: 30, 1: None, 2: None, 3: None, 4: 10, 5: 10, 6: 10, 7: 10, 8: 10,
                     9: 3000, 10: None, 11: None, 12: None}
    assert (stored[1]["first_present_step"], stored[2]["first_present_step"]) == (10, 30)
    assert [f for f, row in stored.items() if row["birth_censored"]] == [9]
    assert [f for f, row in stored.items() if row["present_at_init"]] == [3, 10, 11]
    assert {f: row["death_step"] for f, row in stored.items() if row["death_step"]} == {
        4: 300, 8: 100, 10: 10, 11: 3000}
    assert [f for f, row in stored.items() if row["death_censored"]] == [11]
    stabilization = {f: row["stabilization_step"] for f, row in stored.items()}
    assert (stabilization[0], stabilization[3], stabilization[4]) == (30, 0, 3000)
    assert (stabilization[5], stabilization[6], stabilization[2]) == (300, 1000, None)
    assert stored[7]["drift"] == pytest.approx(0.36)
    assert stored[9]["drift"] is None  # silent but at the end: no cosine between checkpoints
    assert stabilization[9] == 3000


@pytest.mark.parametrize("rule", [
    {"threshold": 0.1, "persistence": 1, "stable_eps": 0.0, "stable_cos": 0.9},
    {"threshold": 0.25, "persistence": 3, "stable_eps": 0.2, "stable_cos": 0.5},
    {"threshold": 0.9, "persistence": 2, "stable_eps": 0.1, "stable_cos": -1.0},
    {"threshold": 0.5, "persistence": 3, "stable_eps": 0.1, "stable_cos": 0.9,
     "presence": "relative"},
    {"threshold": 0.4, "persistence": 3, "stable_eps": 0.1, "stable_cos": 0.9,
     "presence": "relative"},
])
def test_other_parameters_follow_the_rule(hand_root, rule):
    rule = {"metric": "activation_rate", "presence": "absolute", **rule}
    analyze_births("hand", **rule, permutations=1, warehouse=hand_root)
    assert_matches_reference(stored_births(hand_root, basis="hand", **rule), HAND, STEPS, rule)


def test_random_trajectories_follow_the_rule(tmp_path):
    rng = np.random.default_rng(1)
    steps = [0, 1, 3, 10, 30, 100, 300, 1000, 3000]
    features = {}
    for f in range(60):
        # Sparse, bursty values around the threshold, so every branch of the rule is hit.
        values = np.where(rng.random(len(steps)) < 0.5, rng.random(len(steps)) * 0.3, 0.0)
        cos_final = [None if rng.random() < 0.2 else float(c)
                     for c in rng.uniform(0.7, 1.0, len(steps))]
        cos_previous = [None] + [None if rng.random() < 0.2 else float(c)
                                 for c in rng.uniform(0.5, 1.0, len(steps) - 1)]
        features[f] = feature(values.round(3).tolist(), cos_previous, cos_final)
    write_basis(tmp_path, "random", features, steps=steps)
    for rule in ({"metric": "activation_rate", "presence": "absolute", "threshold": 0.1,
                  "persistence": 2, "stable_eps": 0.3, "stable_cos": 0.8},
                 {"metric": "activation_rate", "presence": "relative", "threshold": 0.4,
                  "persistence": 3, "stable_eps": 0.3, "stable_cos": 0.8}):
        analyze_births("random", **rule, permutations=1, warehouse=tmp_path)
        assert_matches_reference(stored_births(tmp_path, basis="random", **rule), features,
                                 steps, rule)


# --- a planted run --------------------------------------------------------------------------------

PLANTED_STEPS = [0, 10, 20, 50, 100, 200, 500, 1000, 2000, 3000, 5000, 7000, 10000, 15000,
                 20000, 30000]
THRESHOLD = 0.01


def planted() -> tuple[dict, dict[int, int], set[int]]:
    """Features switching on at known checkpoints, some present from the start, the rest noise
    with blips shorter than K. Returns (features, planted birth index, present ids)."""
    rng = np.random.default_rng(7)
    n = len(PLANTED_STEPS)
    features, born, present = {}, {}, set()
    for f in range(200):
        off = rng.uniform(0, 0.3 * THRESHOLD, n)
        on = rng.uniform(2 * THRESHOLD, 10 * THRESHOLD, n)
        if f < 100:
            born[f] = b = int(rng.integers(2, n - 3))
            values = np.where(np.arange(n) >= b, on, off)
            values[b] = rng.uniform(0.8, 1.5) * THRESHOLD  # a ramp: sometimes found one late
        elif f < 140:
            present.add(f)
            values = on
        else:
            values = off
            values[rng.choice(np.arange(1, n, 2))] = on[0]  # a blip, one checkpoint long
        features[f] = feature(values.tolist())
    return features, born, present


@pytest.fixture(scope="module")
def planted_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planted") / "warehouse"
    write_basis(root, "planted", planted()[0], steps=PLANTED_STEPS)
    return root


def test_planted_births_are_found_and_the_null_finds_far_fewer(planted_root):
    _, born, present = planted()
    # K = 3: a feature on at half the checkpoints has a run of 2 somewhere in most shuffles, so
    # with K = 2 the null finds about half as many births as are planted; with 3, a quarter.
    result = analyze_births("planted", metric="activation_rate", presence="absolute",
                            threshold=THRESHOLD, persistence=3, warehouse=planted_root)
    stored = stored_births(planted_root, basis="planted", persistence=3)

    position = {step: j for j, step in enumerate(PLANTED_STEPS)}
    found = [stored[f]["birth_step"] for f in born]
    within_one = sum(step is not None and abs(position[step] - born[f]) <= 1
                     for f, step in zip(born, found))
    assert within_one >= 0.9 * len(born)
    assert {f for f, row in stored.items() if row["present_at_init"]} == present
    # Blips only: no birth, but for a blip at the last checkpoint, which is a censored birth
    # there (present at every checkpoint left, fewer than K of them).
    for f in range(140, 200):
        row = stored[f]
        assert row["birth_step"] is None or (row["birth_step"] == PLANTED_STEPS[-1]
                                             and row["birth_censored"]), row
    assert any(stored[f]["birth_censored"] for f in range(140, 200))

    assert result.births == sum(row["birth_step"] is not None for row in stored.values())
    assert result.present_at_init == len(present)
    assert result.permutations == 20
    assert result.null_births_mean < 0.5 * result.births
    assert result.null_false_birth_rate == pytest.approx(result.null_births_mean / 200)

    con = connect(planted_root)
    try:
        windows = con.execute(
            "SELECT window_start, window_end, births, null_births_mean, birth_rate "
            "FROM birth_summary WHERE basis = 'planted' AND persistence = 3 "
            "ORDER BY window_end").fetchall()
    finally:
        con.close()
    assert [(s, e) for s, e, *_ in windows] == list(zip(PLANTED_STEPS, PLANTED_STEPS[1:]))
    # Censored births fall in the last K-1 windows only, in the real order and in the null.
    censored = con_rows(planted_root, "SELECT window_end, censored_births, "
                        "null_censored_births_mean FROM birth_summary WHERE basis = 'planted' "
                        "AND persistence = 3 ORDER BY window_end")
    assert sum(c for _, c, _ in censored) == result.censored_births == sum(
        bool(row["birth_censored"]) for row in stored.values()) > 0
    assert all(c == 0 and n == 0 for _, c, n in censored[:-2])
    assert sum(n for *_, n in censored) == pytest.approx(result.null_censored_births_mean)
    assert result.null_censored_births_mean > 0
    assert sum(w[2] for w in windows) == result.births
    assert sum(w[3] for w in windows) == pytest.approx(result.null_births_mean)
    assert windows[0][4] == pytest.approx(result.birth_rate)


    # Another seed draws other permutations (the same seed gives the same rows: see below).
    other = analyze_births("planted", metric="activation_rate", presence="absolute",
                           threshold=THRESHOLD, persistence=3, seed=1, warehouse=planted_root)
    assert other.births == result.births and other.windows != result.windows


def con_rows(root: Path, sql: str) -> list[tuple]:
    con = connect(root)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


# --- writes ---------------------------------------------------------------------------------------


def test_rerunning_replaces_and_other_thresholds_are_kept(tmp_path):
    write_basis(tmp_path, "hand", HAND)
    first_result = analyze_births("hand", **RULE, permutations=3, warehouse=tmp_path)
    first = stored_births(tmp_path)
    again = analyze_births("hand", **RULE, permutations=3, warehouse=tmp_path)
    assert stored_births(tmp_path) == first
    assert len(first) == len(HAND)
    # exactly equal, the seeded null included: no float sum depends on thread timing
    assert again.windows == first_result.windows

    analyze_births("hand", **{**RULE, "threshold": 0.5}, permutations=3, warehouse=tmp_path)
    con = connect(tmp_path)
    try:
        per_threshold = con.execute(
            "SELECT threshold, count(*) FROM births GROUP BY ALL ORDER BY ALL").fetchall()
        summary = con.execute(
            "SELECT threshold, count(*) FROM birth_summary GROUP BY ALL ORDER BY ALL").fetchall()
    finally:
        con.close()
    assert per_threshold == [(0.1, len(HAND)), (0.5, len(HAND))]
    assert summary == [(0.1, len(STEPS) - 1), (0.5, len(STEPS) - 1)]
    assert stored_births(tmp_path, threshold=0.1) == first


def test_default_thresholds(hand_root):
    default = analyze_births("hand", permutations=1, warehouse=hand_root)
    assert (default.metric, default.presence, default.threshold) == ("energy", "relative", 0.4)
    rate = analyze_births("hand", metric="activation_rate", presence="absolute", permutations=1,
                          warehouse=hand_root)
    assert rate.threshold == 0.01
    energy = analyze_births("hand", metric="energy", presence="absolute", permutations=1,
                            warehouse=hand_root)
    assert energy.threshold == pytest.approx(0.1 / len(HAND))
    # decoder_norm here equals the activation rate: 10% of its 99th percentile
    values = [v for series in HAND.values() for v in series["values"]]
    decoder = analyze_births("hand", metric="decoder_norm", presence="absolute", permutations=1,
                             warehouse=hand_root)
    assert decoder.threshold == pytest.approx(0.1 * float(np.quantile(values, 0.99)))


# --- validation -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """Shared by the validation cases: each checks that it left the warehouse unchanged."""
    root = tmp_path_factory.mktemp("small") / "warehouse"
    write_basis(root, "hand", HAND)
    write_basis(root, "unswept", {})
    return root


@pytest.mark.parametrize("kwargs, error, message", [
    ({"basis": "nope"}, NotFoundError, "--basis 'nope': no such basis; bases: hand, unswept"),
    ({"basis": "unswept"}, NotFoundError, "--basis 'unswept' has no trajectories"),
    ({"metric": "rate"}, NotFoundError, "--metric 'rate' is not a trajectory metric; use one of"),
    ({"metric": "decoder_norm"}, FeaturestoreError, "has no decoder norms"),
    ({"persistence": 7}, FeaturestoreError, "--persistence 7 needs at least 8 checkpoints"),
    ({"persistence": 0}, FeaturestoreError, "--persistence 0"),
    ({"threshold": 0.0}, FeaturestoreError, "--threshold 0.0: give a number > 0"),
    ({"threshold": 2.0, "metric": "activation_rate", "presence": "absolute"}, FeaturestoreError,
     "activation_rate is a share of tokens"),
    ({"threshold": 1.5}, FeaturestoreError,
     "--threshold 1.5: with --presence relative the threshold is a share of each feature's peak"),
    ({"presence": "peak"}, FeaturestoreError, "--presence 'peak': use absolute"),
    ({"stable_cos": 1.5}, FeaturestoreError, "--stable-cos 1.5"),
    ({"permutations": 0}, FeaturestoreError, "--permutations 0"),
])
def test_bad_input_is_refused_and_writes_nothing(small_root, kwargs, error, message):
    before = snapshot(small_root)
    with pytest.raises(error, match=message.replace("(", r"\(")):
        analyze_births(**{"basis": "hand", **kwargs}, warehouse=small_root)
    assert snapshot(small_root) == before


# --- the command line -----------------------------------------------------------------------------


def test_cli_json_and_text(hand_root):
    runner = CliRunner()
    base = ["--warehouse", str(hand_root), "feature-birth-analyze", "--basis", "hand",
            "--metric", "activation_rate", "--presence", "absolute", "--threshold", "0.2",
            "--persistence", "2",
            "--permutations", "4", "--seed", "1"]
    result = runner.invoke(cli, [*base, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["threshold"] == 0.2 and payload["persistence"] == 2
    assert payload["births"] == 7 and payload["present_at_init"] == 3
    assert payload["censored_births"] == 1 and payload["presence"] == "absolute"
    assert payload["n_features"] == len(HAND) and payload["permutations"] == 4
    assert [w["window_end"] for w in payload["windows"]] == STEPS[1:]
    assert payload["first_born"][0] == {"feature_id": 4, "birth_step": 10,
                                        "birth_censored": False, "stabilization_step": 3000,
                                        "death_step": 300, "drift": pytest.approx(0.1)}
    assert payload["last_born"][0] == {"feature_id": 9, "birth_step": 3000,
                                       "birth_censored": True, "stabilization_step": 3000,
                                       "death_step": None, "drift": None}

    result = runner.invoke(cli, base, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "7 of 13 features born (1 censored), 3 present at init" in result.output
    assert "censored births (present to the last checkpoint" in result.output
    assert "feature 9 at step 3000" in result.output
    assert "false-birth rate" in result.output and "(10, 30]" in result.output

    result = runner.invoke(cli, ["--warehouse", str(hand_root), "feature-birth-analyze",
                                 "--basis", "nope"])
    assert result.exit_code == 1 and "no such basis" in result.output


# --- warehouses written before censoring and presence ---------------------------------------------

NEW_BIRTH_COLUMNS = {"births": ["presence", "feature_threshold", "birth_censored",
                                "death_censored"],
                     "birth_summary": ["presence", "censored_births",
                                       "null_censored_births_mean", "seed_births_agreement",
                                       "seed_matched_features"]}


def test_births_of_an_older_release_read_with_the_new_columns_defaulted(tmp_path):
    """An older release wrote births without presence or censoring: its rows read as absolute
    (what they were) with unknown censoring, and a new analysis adds the columns and its rows
    beside them."""
    write_basis(tmp_path, "hand", HAND)
    analyze_births("hand", **RULE, permutations=1, warehouse=tmp_path)
    lake = Warehouse(tmp_path)._open(read_only=False)
    try:  # the lake tables as the older release created them
        for table, columns in NEW_BIRTH_COLUMNS.items():
            lake.execute(f"ALTER TABLE lake.{table} RESET SORTED BY")  # sorted by presence
            for column in columns:
                lake.execute(f"ALTER TABLE lake.{table} DROP COLUMN {column}")
    finally:
        lake.close()

    old_rows = stored_births(tmp_path)
    assert {row["presence"] for row in old_rows.values()} == {"absolute"}
    assert {row["birth_censored"] for row in old_rows.values()} == {None}
    assert old_rows[0]["birth_step"] == 30

    analyze_births("hand", **{**RULE, "threshold": 0.5, "presence": "relative"},
                   permutations=1, warehouse=tmp_path)
    con = connect(tmp_path)
    try:
        rules = con.execute("SELECT presence, threshold, count(*), count(birth_censored) "
                            "FROM births GROUP BY ALL ORDER BY ALL").fetchall()
    finally:
        con.close()
    # the older rows kept (censoring unknown), the new ones complete: censoring is known for
    # every birth
    relative = {**RULE, "threshold": 0.5, "presence": "relative"}
    born = sum(reference(series["values"], series["cos_previous"], series["cos_final"], STEPS,
                         **relative)["birth_step"] is not None for series in HAND.values())
    assert rules == [("absolute", 0.1, len(HAND), 0), ("relative", 0.5, len(HAND), born)]
