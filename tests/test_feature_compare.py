"""feature-compare: the diffs rows checked column by column against numpy, re-runs, validation
and the command line, on a real warehouse filled with hand-made trajectories; and the diffs of
the tiny run's swept bases against numpy on their stored tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.ingest.feature_compare import compare_features
from featurestore.warehouse import Warehouse
from featurestore.writer import utc_now
from tests.conftest import snapshot

BASIS = "shared"
STEPS = [0, 100, 400]
N_TOKENS = {0: 1000, 100: 1000, 400: 500}  # step 400 encoded fewer tokens: pseudo-count 1/500
N_FEATURES = 8
D_MODEL = 5
SPLITS = {0: ["induction", "modular"], 100: ["induction", "modular"], 400: ["induction"]}
# Feature 0 is silent at step 0 (rate 0, direction norm 0); feature 1 at step 100.
SILENT = {(0, 0), (1, 100)}
# Feature 2 has no split profile at step 100, so its changes from/to 100 are an empty map.
NO_SPLITS = {(2, 100)}


def _inputs() -> dict[str, dict]:
    """Per table, {(feature_id, step[, split]): values}, random but reproducible."""
    rng = np.random.default_rng(0)
    trajectories, directions, splits = {}, {}, {}
    for step in STEPS:
        for f in range(N_FEATURES):
            silent = (f, step) in SILENT
            trajectories[f, step] = {
                "n_tokens": N_TOKENS[step],
                "activation_rate": 0.0 if silent else float(rng.uniform(0.001, 0.3)),
                "mean_activation": 0.0 if silent else float(rng.uniform(0.0, 2.0)),
                # Features 3 and 4 keep the same energy: tied changes, ranked by feature_id.
                "energy": 0.05 if f in (3, 4) else float(rng.uniform(0.0, 0.2)),
            }
            vector = np.zeros(D_MODEL) if silent else rng.normal(size=D_MODEL)
            directions[f, step] = vector.astype(np.float32)
            if (f, step) not in NO_SPLITS:
                for split in SPLITS[step]:
                    splits[f, step, split] = float(rng.uniform(0.0, 0.5))
    return {"trajectories": trajectories, "directions": directions, "splits": splits}


INPUTS = _inputs()


def _write_inputs(root: Path) -> None:
    now = utc_now()
    wh = Warehouse(root)
    with wh.writer("test inputs") as writer:
        writer.put("bases", [{
            "name": BASIS, "kind": "pooled", "arch": "batchtopk", "n_sources": len(STEPS),
            "d_model": D_MODEL, "d_hidden": N_FEATURES, "k": 2,
            "sources": [{"label": f"step_{s}", "activation_set": f"run@{s}:stage", "run": "run",
                         "step": s, "stage": "stage", "norm_scale": 1.0} for s in STEPS],
            "config": "{}", "trainer_config": "{}", "path": f"bases/{BASIS}", "steps": 10,
            "tokens": 1000, "created_at": now,
        }])
        writer.put("trajectories", [{
            "basis": BASIS, "feature_id": f, "step": step, **values,
            "mean_active_activation": None, "max_activation": 1.0,
            "split_activation_rates": {}, "direction_cosine_previous": None,
            "direction_cosine_final": None, "decoder_norm": None,
        } for (f, step), values in INPUTS["trajectories"].items()])
        writer.put("feature_directions", [{
            "basis": BASIS, "feature_id": f, "step": step,
            "norm": float(np.linalg.norm(vector)), "direction": vector.tolist(),
        } for (f, step), vector in INPUTS["directions"].items()])
        writer.put("split_profiles", [{
            "basis": BASIS, "feature_id": f, "step": step, "split": split, "n_tokens": 100,
            "activation_rate": rate, "mean_activation": rate,
        } for (f, step, split), rate in INPUTS["splits"].items()])


@pytest.fixture(scope="module")
def inputs_warehouse(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare") / "warehouse"
    _write_inputs(root)
    return root


@pytest.fixture
def root(inputs_warehouse, tmp_path) -> Path:
    copy = tmp_path / "warehouse"
    shutil.copytree(inputs_warehouse, copy)
    return copy


def _ranks(values: np.ndarray) -> np.ndarray:
    """1 for the largest |value|, ties by feature_id (the array index)."""
    order = np.lexsort((np.arange(len(values)), -np.abs(values)))
    ranks = np.empty(len(values), dtype=int)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def _expected(source: int, target: int) -> dict[int, dict]:
    """The diffs rows of one pair of the hand-made inputs."""
    return _expected_rows(INPUTS["trajectories"], INPUTS["directions"], INPUTS["splits"],
                          source, target)


def _expected_rows(trajectories: dict, directions: dict, splits: dict, source: int,
                   target: int) -> dict[int, dict]:
    """The diffs rows of one pair, computed independently with numpy from the three tables'
    values: trajectories {(feature_id, step): {n_tokens, activation_rate, mean_activation,
    energy}}, directions {(feature_id, step): vector} and split rates {(feature_id, step,
    split): activation_rate}."""
    features = sorted(f for f, step in trajectories
                      if step == source and (f, target) in trajectories)
    at_source = [trajectories[f, source] for f in features]
    at_target = [trajectories[f, target] for f in features]

    def column(rows: list[dict], name: str) -> np.ndarray:
        return np.array([row[name] for row in rows], dtype=np.float64)

    r_s, r_t = column(at_source, "activation_rate"), column(at_target, "activation_rate")
    # The pseudo-count: one token at the checkpoint that encoded fewer.
    a = 1.0 / np.minimum(column(at_source, "n_tokens"), column(at_target, "n_tokens"))
    changes = {
        "activation_rate_change": r_t - r_s,
        "log_rate_ratio": np.log((r_t + a) / (r_s + a)),
        "mean_activation_change": (column(at_target, "mean_activation")
                                   - column(at_source, "mean_activation")),
        "energy_change": column(at_target, "energy") - column(at_source, "energy"),
    }
    ranks = {
        "rank_by_rate_change": _ranks(changes["activation_rate_change"]),
        "rank_by_log_ratio": _ranks(changes["log_rate_ratio"]),
        "rank_by_mean_change": _ranks(changes["mean_activation_change"]),
        "rank_by_energy_change": _ranks(changes["energy_change"]),
    }
    split_names = sorted({split for _, _, split in splits})
    rows = {}
    for i, f in enumerate(features):
        u = np.asarray(directions.get((f, source), []), dtype=np.float64)
        v = np.asarray(directions.get((f, target), []), dtype=np.float64)
        undefined = not np.linalg.norm(u) or not np.linalg.norm(v)
        rows[f] = {
            "source_activation_rate": r_s[i],
            "target_activation_rate": r_t[i],
            **{name: values[i] for name, values in changes.items()},
            "direction_cosine": None if undefined else
            float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))),
            "split_rate_changes": {
                split: splits[f, target, split] - splits[f, source, split]
                for split in split_names
                if (f, source, split) in splits and (f, target, split) in splits
            },
            **{name: int(values[i]) for name, values in ranks.items()},
        }
    return rows


def _stored(root: Path, source: int, target: int, basis: str = BASIS) -> dict[int, dict]:
    con = Warehouse(root).connect()
    try:
        rows = con.execute(
            "SELECT * FROM diffs WHERE basis = ? AND source_step = ? AND target_step = ?",
            [basis, source, target]).fetchall()
        names = [d[0] for d in con.description]
    finally:
        con.close()
    return {row["feature_id"]: row for row in (dict(zip(names, r)) for r in rows)}


def _assert_rows_match(stored: dict[int, dict], expected: dict[int, dict]) -> None:
    assert sorted(stored) == sorted(expected)
    for f, want in expected.items():
        got = stored[f]
        for column, value in want.items():
            if isinstance(value, dict):
                assert got[column].keys() == value.keys(), (f, column)
                for split, change in value.items():
                    assert got[column][split] == pytest.approx(change, rel=1e-12, abs=1e-15)
            elif value is None or isinstance(value, int):
                assert got[column] == value, (f, column)
            else:
                assert got[column] == pytest.approx(value, rel=1e-9, abs=1e-12), (f, column)


def test_diffs_match_numpy(root):
    result = compare_features(BASIS, 0, 400, warehouse=root, top=3, rank_by="log_ratio")
    expected = _expected(0, 400)
    stored = _stored(root, 0, 400)
    _assert_rows_match(stored, expected)
    # The cases the inputs were built for actually occur.
    assert stored[0]["direction_cosine"] is None
    assert stored[0]["log_rate_ratio"] == pytest.approx(
        np.log((INPUTS["trajectories"][0, 400]["activation_rate"] + 1 / 500) / (1 / 500)))
    assert stored[3]["energy_change"] == stored[4]["energy_change"] == 0
    assert stored[3]["rank_by_energy_change"] + 1 == stored[4]["rank_by_energy_change"]
    assert list(stored[5]["split_rate_changes"]) == ["induction"]
    assert all(row["created_at"] is not None for row in stored.values())

    assert (result.n_features, result.n_cosine_undefined) == (N_FEATURES, 1)
    assert [row["rank_by_log_ratio"] for row in result.top] == [1, 2, 3]
    _assert_rows_match({row["feature_id"]: row for row in result.top},
                       {f: row for f, row in expected.items() if row["rank_by_log_ratio"] <= 3})


def test_empty_split_map_and_silent_target(root):
    compare_features(BASIS, 0, 100, warehouse=root)
    stored = _stored(root, 0, 100)
    _assert_rows_match(stored, _expected(0, 100))
    assert stored[2]["split_rate_changes"] == {}
    assert stored[1]["direction_cosine"] is None  # silent at the target


def test_rerun_replaces_and_other_pairs_stay(root):
    compare_features(BASIS, 0, 400, warehouse=root)
    compare_features(BASIS, 100, 400, warehouse=root)
    compare_features(BASIS, 0, 400, warehouse=root)
    con = Warehouse(root).connect()
    try:
        counts = con.execute("SELECT source_step, target_step, count(*) FROM diffs "
                             "GROUP BY ALL ORDER BY ALL").fetchall()
    finally:
        con.close()
    assert counts == [(0, 400, N_FEATURES), (100, 400, N_FEATURES)]
    _assert_rows_match(_stored(root, 100, 400), _expected(100, 400))
    _assert_rows_match(_stored(root, 0, 400), _expected(0, 400))


def _table_inputs(con, basis: str) -> tuple[dict, dict, dict]:
    """_expected_rows' inputs, as the sweep stored them: the raw values, no SQL arithmetic."""
    trajectories = {
        (f, step): {"n_tokens": n, "activation_rate": rate, "mean_activation": mean,
                    "energy": energy}
        for f, step, n, rate, mean, energy in con.execute(
            "SELECT feature_id, step, n_tokens, activation_rate, mean_activation, energy "
            "FROM trajectories WHERE basis = ?", [basis]).fetchall()}
    directions = {(f, step): direction for f, step, direction in con.execute(
        "SELECT feature_id, step, direction FROM feature_directions WHERE basis = ?",
        [basis]).fetchall()}
    splits = {(f, step, split): rate for f, step, split, rate in con.execute(
        "SELECT feature_id, step, split, activation_rate FROM split_profiles WHERE basis = ?",
        [basis]).fetchall()}
    return trajectories, directions, splits


@pytest.mark.parametrize("basis", ["tiny-l2", "tiny-fn"])
def test_diffs_of_swept_bases_match_numpy_on_their_tables(analysed_warehouse, basis):
    """The tiny run's real bases, compared first vs last by the session fixture: sweep output
    with features silent at a checkpoint, tied changes and every split of the demo task."""
    con = Warehouse(analysed_warehouse).connect()
    try:
        (source, target), = con.execute("SELECT DISTINCT source_step, target_step FROM diffs "
                                        "WHERE basis = ?", [basis]).fetchall()
        (n_features,), = con.execute("SELECT d_hidden FROM bases WHERE name = ?",
                                     [basis]).fetchall()
        inputs = _table_inputs(con, basis)
    finally:
        con.close()
    expected = _expected_rows(*inputs, source, target)
    stored = _stored(analysed_warehouse, source, target, basis)
    _assert_rows_match(stored, expected)
    # Every feature has a row, and the cases the hand-made inputs were built for occur in real
    # sweep output too: features silent at a checkpoint (no cosine), tied rate changes (ranked
    # by feature_id) and several splits.
    assert len(stored) == n_features
    cosines = [row["direction_cosine"] for row in expected.values()]
    assert 0 < cosines.count(None) < n_features / 2
    rate_changes = [row["activation_rate_change"] for row in expected.values()]
    assert len(set(rate_changes)) < len(rate_changes)
    assert min(len(row["split_rate_changes"]) for row in expected.values()) > 1


@pytest.mark.parametrize(("basis", "source", "target", "message"), [
    ("nope", 0, 400, "--basis 'nope': no such basis; bases: shared"),
    (BASIS, 0, 50, "--target 50: basis 'shared' has no trajectories at step 50; steps with "
                   "trajectories: 0, 100, 400"),
    (BASIS, 7, 400, "--source 7"),
    (BASIS, 100, 100, "--source and --target are both step 100"),
])
def test_bad_input_is_refused_and_writes_nothing(root, basis, source, target, message):
    before = snapshot(root)
    with pytest.raises(FeaturestoreError, match=message):
        compare_features(basis, source, target, warehouse=root)
    assert snapshot(root) == before


def test_basis_without_trajectories(root):
    with Warehouse(root).writer("another basis") as writer:
        con = Warehouse(root).connect()
        try:
            row = con.sql("SELECT * FROM bases").to_arrow_table().to_pylist()[0]
        finally:
            con.close()
        writer.put("bases", [{**row, "name": "unswept"}])
    with pytest.raises(NotFoundError, match="--basis 'unswept' has no trajectories"):
        compare_features("unswept", 0, 400, warehouse=root)


def test_cli_json_and_table(root):
    runner = CliRunner()
    base = ["--warehouse", str(root), "feature-compare", "--basis", BASIS,
            "--source", "0", "--target", "400"]
    result = runner.invoke(cli, [*base, "--top", "2", "--rank-by", "energy_change", "--json"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    expected = _expected(0, 400)
    assert payload["n_features"] == N_FEATURES and payload["rank_by"] == "energy_change"
    assert [row["feature_id"] for row in payload["top"]] == sorted(
        expected, key=lambda f: expected[f]["rank_by_energy_change"])[:2]

    result = runner.invoke(cli, base, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"{N_FEATURES} features compared from step 0 to step 400" in result.output
    assert f"({N_FEATURES} rows)" in result.output

    result = runner.invoke(cli, [*base[:-1], "0"])
    assert result.exit_code == 1
    assert "--source and --target are both step 0" in result.output


def test_macro_runs_directly(root):
    """An analyst's query gives the same rows as the stored ones, created_at aside."""
    compare_features(BASIS, 0, 400, warehouse=root)
    result = CliRunner().invoke(cli, [
        "--warehouse", str(root), "sql", "--format", "json",
        f"SELECT * FROM feature_compare('{BASIS}', 0, 400) ORDER BY rank_by_rate_change LIMIT 3",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [row["rank_by_rate_change"] for row in rows] == [1, 2, 3]
    stored = _stored(root, 0, 400)
    for row in rows:
        want = stored[row["feature_id"]]
        assert set(row) == set(want) - {"created_at"}
        # Arrow's MAP reaches JSON as [key, value] pairs.
        assert dict(row.pop("split_rate_changes")) == want["split_rate_changes"]
        assert row == {column: want[column] for column in row}
