"""Neuronpedia dashboards (`featurestore export-dashboards`) of the analysed tiny run.

Every number in a dashboard is checked against the warehouse with SQL and numpy: the examples'
per-token values, the activation rate, the activation histogram, and the logit effects, which are
recomputed here from the checkpoint's and the basis's weight files. The files are checked against
the format's own classes, SAEDashboard's Neuronpedia batch (sae_dashboard 0.8.0): they must load
into them and come back out unchanged, with every field of the type those classes declare.
"""

from __future__ import annotations

import inspect
import json
import shutil
import types
import typing
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from featurestore.checkpoints import load_checkpoint
from featurestore.cli import cli
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.queries.dashboards import BINS, SKIPPED_FILE, TOP_LOGITS, export_dashboards
from featurestore.warehouse import Warehouse, connect

from .conftest import TINY_RUN, basis_path, query


@pytest.fixture(scope="module")
def con(analysed_warehouse):
    con = connect(analysed_warehouse)
    yield con
    con.close()


def rows(con, sql: str, params=()) -> list[tuple]:
    return con.execute(sql, list(params)).fetchall()


@pytest.fixture(scope="module")
def exported(analysed_warehouse, con, tmp_path_factory):
    """tiny-l2 at its default step and tiny-fn at an explicit one; the export only reads the
    warehouse, so the session's analysed warehouse is used as it is."""
    out = tmp_path_factory.mktemp("dashboards")
    (first,), = rows(con, "SELECT min(step) FROM trajectories WHERE basis = 'tiny-fn'")
    return analysed_warehouse, out, {
        "tiny-l2": export_dashboards("tiny-l2", out=out, warehouse=analysed_warehouse),
        "tiny-fn": export_dashboards("tiny-fn", step=first, features="top:4", out=out,
                                     warehouse=analysed_warehouse)}


def batch(result, feature: int) -> dict:
    return json.loads((Path(result.directory) / f"batch-{feature}.json").read_text())


def dashboard(result, feature: int) -> dict:
    (only,) = batch(result, feature)["features"]
    return only


def busiest_feature(con, basis: str, step: int) -> int:
    (feature,), = rows(con, "SELECT feature_id FROM trajectories WHERE basis = ? AND step = ? "
                              "ORDER BY energy DESC, feature_id LIMIT 1", [basis, step])
    return feature


def test_default_step_features_and_files(con, exported):
    _, out, results = exported
    result = results["tiny-l2"]
    (last, swept), = rows(con, "SELECT max(step), count(DISTINCT step) FROM trajectories "
                               "WHERE basis = 'tiny-l2'")
    assert result.step == last
    assert result.step_rule.startswith(f"the last of {swept} swept checkpoints, the default")
    assert result.directory == str(out / f"tiny-l2_step{last}")
    firing = [f for (f,) in rows(con, "SELECT feature_id FROM trajectories WHERE basis = "
                                        "'tiny-l2' AND step = ? AND activation_rate > 0 "
                                        "ORDER BY 1", [last])]
    assert result.features == firing
    (d_hidden,), = rows(con, "SELECT d_hidden FROM bases WHERE name = 'tiny-l2'")
    assert result.skipped == sorted(set(range(d_hidden)) - set(firing))
    names = sorted(p.name for p in Path(result.directory).iterdir())
    assert names == sorted([f"batch-{f}.json" for f in firing] + [SKIPPED_FILE])
    skipped = json.loads((Path(result.directory) / SKIPPED_FILE).read_text())
    assert skipped["skipped_indexes"] == result.skipped
    (n_layers,), = rows(con, "SELECT n_layers FROM runs WHERE run = ?", [TINY_RUN])
    head = batch(result, firing[0])
    assert {k: head[k] for k in ("model_id", "layer", "sae_set", "sae_id_suffix")} == {
        "model_id": TINY_RUN, "layer": 2, "sae_set": "tiny-l2", "sae_id_suffix": f"step-{last}"}
    fn = results["tiny-fn"]
    assert batch(fn, fn.features[0])["layer"] == n_layers  # final_norm: after the last block


def test_examples_and_statistics_equal_the_warehouse_rows(con, exported):
    _, _, results = exported
    result = results["tiny-l2"]
    basis, step = "tiny-l2", result.step
    feature = busiest_feature(con, basis, step)
    got = dashboard(result, feature)
    assert got["feature_index"] == feature
    # Per example: its context's token strings and the feature's value at every context token
    # (0 where feature_activations has no row), in rank order.
    expected = rows(con, """
        WITH t AS (
            SELECT rank, value, sequence_id, position - context_start AS at, context_token_ids,
                   context_start, unnest(range(len(context_token_ids))) AS i
            FROM feature_examples WHERE basis = ? AND step = ? AND feature_id = ?)
        SELECT t.rank, any_value(t.at), any_value(t.value),
               list(coalesce(a.value, 0) ORDER BY t.i),
               list(s.token_text ORDER BY t.i)
        FROM t
        LEFT JOIN feature_activations a
          ON a.basis = ? AND a.step = ? AND a.feature_id = ? AND a.sequence_id = t.sequence_id
         AND a.position = t.context_start + t.i
        LEFT JOIN token_strings s ON s.run = ? AND s.token_id = t.context_token_ids[t.i + 1]
        GROUP BY t.rank ORDER BY t.rank""",
        [basis, step, feature, basis, step, feature, TINY_RUN])
    assert len(got["activations"]) == len(expected) > 0
    (rate, peak), = rows(con, "SELECT activation_rate, max_activation FROM trajectories "
                                "WHERE basis = ? AND step = ? AND feature_id = ?",
                          [basis, step, feature])
    for shown, (_, at, value, values, texts) in zip(got["activations"], expected):
        assert shown["tokens"] == texts and None not in texts
        assert shown["values"] == values
        assert shown["qualifying_token_index"] == at and shown["values"][at] == value
        assert (shown["bin_min"], shown["bin_max"], shown["bin_contains"]) == (-1, peak, -1)
    assert got["activations"][0]["values"][expected[0][1]] == pytest.approx(peak, rel=1e-6)
    assert got["frac_nonzero"] == rate
    # The histogram of its non-zero activations: BINS equal bins over [min, max], counted here
    # against explicit edges.
    values = np.array([v for (v,) in rows(
        con, "SELECT value FROM feature_activations WHERE basis = ? AND step = ? AND "
              "feature_id = ?", [basis, step, feature])], dtype=np.float64)
    edges = values.min() + (values.max() - values.min()) * np.arange(BINS + 1) / BINS
    counts = [int(((values >= lo) & (values < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
    counts[-1] += int((values == values.max()).sum())
    assert got["freq_hist_data_bar_heights"] == counts and sum(counts) == len(values)
    np.testing.assert_allclose(got["freq_hist_data_bar_values"], (edges[:-1] + edges[1:]) / 2,
                               rtol=1e-12)
    # The sweep's token set: its sequences (of equal length in the demo task) hold its tokens.
    (tokens,), = rows(con, "SELECT n_tokens FROM trajectories WHERE basis = ? AND step = ? "
                           "AND feature_id = ?", [basis, step, feature])
    assert got["n_prompts_total"] * got["n_tokens_in_prompt"] == tokens


def expected_logits(con, root, basis: str, step: int, features: list[int]) -> np.ndarray:
    """[features, vocab] from the weight files: the basis's decoder rows in raw units (divided
    by the step's norm scale), through the final LayerNorm's gain with centring unless the basis
    is at final_norm, times the checkpoint's unembedding."""
    (stage, sources), = rows(con, "SELECT stage, sources FROM bases WHERE name = ?", [basis])
    scale = next(s["norm_scale"] for s in sources if s["step"] == step)
    weights = load_file(basis_path(root, basis) / "crosscoder.safetensors")
    decoder = weights["W_dec"][:, 0, :].astype(np.float64)[features] / scale
    (path,), = rows(con, "SELECT path FROM checkpoints WHERE run = ? AND step = ?",
                     [TINY_RUN, step])
    model = load_checkpoint(Warehouse(root).path(path))
    if stage != "final_norm":
        gamma = model.ln_f.weight.detach().double().numpy()
        decoder = gamma * (decoder - decoder.mean(axis=1, keepdims=True))
    return decoder @ model.unembed.weight.detach().double().numpy().T


@pytest.mark.parametrize("basis", ["tiny-l2", "tiny-fn"])
def test_logit_effects_are_the_decoder_through_the_unembedding(con, exported, basis):
    root, _, results = exported
    result = results[basis]
    features = result.features[:3]
    logits = expected_logits(con, root, basis, result.step, features)
    texts = dict(rows(con, "SELECT token_id, token_text FROM token_strings WHERE run = ?",
                       [TINY_RUN]))
    assert result.logits.startswith("exact" if basis == "tiny-fn" else "direct path")
    for j, feature in enumerate(features):
        got = dashboard(result, feature)
        raised, lowered = np.argsort(-logits[j])[:TOP_LOGITS], np.argsort(logits[j])[:TOP_LOGITS]
        np.testing.assert_allclose(got["pos_values"], logits[j][raised], rtol=1e-9)
        np.testing.assert_allclose(got["neg_values"], logits[j][lowered], rtol=1e-9)
        assert got["pos_str"] == [texts[t] for t in raised]
        assert got["neg_str"] == [texts[t] for t in lowered]
        assert sum(got["logits_hist_data_bar_heights"]) == logits.shape[1]
        assert len(got["logits_hist_data_bar_values"]) == BINS


def conforms(value, annotation) -> bool:
    """Whether a JSON value is of a type the format's classes declare (list[float], ...)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if annotation is float:  # a JSON number
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation) and not isinstance(value, bool)


def check_fields(data: dict, cls) -> None:
    declared = {name: p.annotation for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self"}
    assert set(data) <= set(declared), set(data) - set(declared)
    for name, value in data.items():
        assert conforms(value, declared[name]), (cls.__name__, name, value)


def test_files_load_into_the_sae_dashboard_neuronpedia_classes(exported):
    formats = pytest.importorskip(
        "sae_dashboard.neuronpedia.neuronpedia_dashboard",
        reason="sae-dashboard is not installed; its format module needs numpy only, but its "
               "declared dependencies conflict with this project's, so install it with "
               "`.venv/bin/python -m pip install --no-deps sae-dashboard==0.8.0`")
    _, out, _ = exported
    files = sorted(out.glob("*/batch-*.json"))
    assert len(files) > 4
    for path in files:
        data = json.loads(path.read_text())
        # Unknown keys raise TypeError in these constructors; to_dict() writes every field, so
        # an equal round trip also means that no field is missing.
        assert formats.NeuronpediaDashboardBatch(**data).to_dict() == data
        check_fields(data, formats.NeuronpediaDashboardBatch)
        for feature in data["features"]:
            check_fields(feature, formats.NeuronpediaDashboardFeature)
            for activation in feature["activations"]:
                check_fields(activation, formats.NeuronpediaDashboardActivation)
                # Neuronpedia's importer takes max(values): never an empty context.
                assert activation["values"] and len(activation["values"]) == len(
                    activation["tokens"])


def test_without_token_strings_tokens_are_ids(analysed_warehouse, tmp_path):
    root = tmp_path / "warehouse"
    shutil.copytree(analysed_warehouse, root)
    with Warehouse(root).writer("test: no token strings") as writer:
        writer.put("token_strings", [], replace_where={"run": TINY_RUN})
    result = export_dashboards("tiny-l2", features="top:1", out=tmp_path / "out", warehouse=root)
    assert not result.token_text
    got = json.loads((tmp_path / "out" / f"tiny-l2_step{result.step}"
                      / f"batch-{result.features[0]}.json").read_text())["features"][0]
    (ids,), = query(root, "SELECT context_token_ids FROM feature_examples WHERE basis = "
                          "'tiny-l2' AND step = ? AND feature_id = ? AND rank = 1",
                    [result.step, result.features[0]])
    assert got["activations"][0]["tokens"] == [str(i) for i in ids]
    assert all(s.isdigit() for s in got["pos_str"] + got["neg_str"])


def test_a_new_selection_replaces_the_folder(exported, tmp_path):
    root, _, _ = exported
    first = export_dashboards("tiny-l2", features="top:3", out=tmp_path, warehouse=root)
    again = export_dashboards("tiny-l2", features=str(first.features[0]), out=tmp_path,
                              warehouse=root)
    assert again.directory == first.directory and again.features == first.features[:1]
    assert sorted(p.name for p in Path(again.directory).iterdir()) == [
        f"batch-{first.features[0]}.json", SKIPPED_FILE]
    assert not list(tmp_path.rglob(".*"))  # no temporary files left


@pytest.mark.parametrize("arguments, error, message", [
    (dict(basis="nope"), NotFoundError,
     "--basis 'nope': no such basis; shared bases: tiny-fn, tiny-l2"),
    (dict(basis="tiny-diff"), FeaturestoreError, "--basis tiny-diff was trained by "
                                                 "train-crosscoder"),
    (dict(basis="tiny-l2", step=7), NotFoundError, "--step 7: basis tiny-l2 was swept at steps"),
    (dict(basis="tiny-l2", step="soon"), FeaturestoreError, "--step 'soon': give a checkpoint"),
    (dict(basis="tiny-l2", features="0,999"), FeaturestoreError, "--features: feature id 999"),
    (dict(basis="tiny-l2", features="top:x"), FeaturestoreError, "top:N needs a positive N"),
])
def test_bad_input_names_the_flag_and_writes_nothing(exported, tmp_path, arguments, error,
                                                     message):
    root, _, _ = exported
    with pytest.raises(error, match=message):
        export_dashboards(**arguments, out=tmp_path / "out", warehouse=root)
    assert not (tmp_path / "out").exists()


def test_cli_command(exported, tmp_path):
    root, _, _ = exported
    runner = CliRunner()  # its help's examples are parsed with every command's in test_cli
    # Two threads, as the tests' torch has: the same float sums as the call below.
    as_json = runner.invoke(cli, ["--warehouse", str(root), "--threads", "2",
                                  "export-dashboards", "--basis", "tiny-l2", "--features",
                                  "top:2", "--out", str(tmp_path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    printed = json.loads(as_json.output)
    same = export_dashboards("tiny-l2", features="top:2", out=tmp_path / "api", warehouse=root)
    step = same.step
    assert printed["step"] == step and printed["features"] == same.features
    for feature in same.features:  # the Python function's files, with the same arguments
        assert json.loads((tmp_path / f"tiny-l2_step{step}" / f"batch-{feature}.json")
                          .read_text()) == batch(same, feature)
    text = runner.invoke(cli, ["--warehouse", str(root), "export-dashboards", "--basis",
                               "tiny-l2", "--step", "LAST", "--features", "top:1", "--out",
                               str(tmp_path)])
    assert text.exit_code == 0 and f"1 dashboard of 'tiny-l2' at step {step}" in text.output
    bad = runner.invoke(cli, ["--warehouse", str(root), "export-dashboards", "--basis",
                              "tiny-l2", "--step", "7", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "--step 7: basis tiny-l2 was swept at steps" in bad.output
    missing = runner.invoke(cli, ["--warehouse", str(root), "export-dashboards", "--basis",
                                  "tiny-l2"])
    assert missing.exit_code == 2 and "--out" in missing.output
