"""The feature card (`featurestore feature`) and decoded examples in every read-side output.

The warehouse is a copy of the analysed tiny run whose tiny-l2 examples carry text: the run's
token strings are set to names with markup in them (" <t12>"), so escaping shows, and every
feature_examples row of tiny-l2 gets its token and context decoded from them. Expected values
are computed here from the stored rows with numpy and plain Python.
"""

from __future__ import annotations

import html
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.queries.feature_card import SPARK, feature_card
from featurestore.warehouse import Warehouse, records

from .conftest import TINY_RUN, query

BASIS = "tiny-l2"


def token_string(token_id: int) -> str:
    return f" <t{token_id}>"


def decoded(ids: list[int], at: int) -> str:
    """A context as the tests expect it: token strings joined, the token at `at` marked."""
    texts = [token_string(t) for t in ids]
    return "".join(texts[:at]) + "⟦" + texts[at] + "⟧" + "".join(texts[at + 1:])


@pytest.fixture(scope="module")
def root(analysed_warehouse, tmp_path_factory):
    root = tmp_path_factory.mktemp("text") / "warehouse"
    shutil.copytree(analysed_warehouse, root)
    wh = Warehouse(root)
    con = wh.connect()
    try:
        (vocab,), = con.execute("SELECT max(list_max(context_token_ids)) + 1 "
                                "FROM feature_examples").fetchall()
        examples = records(con, "SELECT * FROM feature_examples WHERE basis = ?", [BASIS])
    finally:
        con.close()
    for row in examples:
        at = row["position"] - row["context_start"]
        row["token_text"] = token_string(row["context_token_ids"][at])
        row["context_text"] = decoded(row["context_token_ids"], at)
    with wh.writer("test: token strings") as writer:
        writer.put("token_strings", [{"run": TINY_RUN, "token_id": i,
                                      "token_text": token_string(i), "tokenizer": "test"}
                                     for i in range(vocab)])
        writer.put("feature_examples", examples, replace_where={"basis": BASIS})
    return root


def busiest_feature(root) -> int:
    """The feature with the most energy summed over the checkpoints (it has examples)."""
    (feature,), = query(root, "SELECT feature_id FROM trajectories WHERE basis = ? "
                              "GROUP BY feature_id ORDER BY sum(energy) DESC LIMIT 1", [BASIS])
    return feature


def test_card_numbers_equal_the_stored_rows(root):
    feature = busiest_feature(root)
    card = feature_card(BASIS, feature, examples=3, warehouse=root)
    rows = query(root, "SELECT step, energy, activation_rate, mean_activation FROM trajectories "
                       "WHERE basis = ? AND feature_id = ? ORDER BY step", [BASIS, feature])
    steps, energy = [r[0] for r in rows], np.array([r[1] for r in rows])
    assert [t["step"] for t in card.trajectory] == steps
    np.testing.assert_array_equal([t["energy"] for t in card.trajectory], energy)
    np.testing.assert_array_equal([t["activation_rate"] for t in card.trajectory],
                                  [r[2] for r in rows])
    # The sparkline: one block per step, energy scaled to the feature's peak, rounded.
    levels = np.floor(energy / energy.max() * (len(SPARK) - 1) + 0.5).astype(int)
    assert card.energy_sparkline == "".join(SPARK[i] for i in levels)
    assert card.peak_energy_step == steps[int(np.argmax(energy))]
    # Examples at the last step, best first, decoded and marked.
    stored = query(root, "SELECT rank, value, context_token_ids, position - context_start "
                         "FROM feature_examples WHERE basis = ? AND feature_id = ? AND step = ? "
                         "AND rank <= 3 ORDER BY rank", [BASIS, feature, steps[-1]])
    assert card.examples_step == steps[-1] and len(card.examples) == len(stored) > 0
    for example, (rank, value, ids, at) in zip(card.examples, stored):
        assert (example["rank"], example["value"]) == (rank, value)
        assert example["context"] == decoded(ids, at)
        assert example["token"] == token_string(ids[at])
    # The births row under the stored rule (the fixture's, not the default).
    birth = records_of(root, "SELECT birth_step, present_at_init, death_step FROM births "
                             "WHERE basis = ? AND feature_id = ?", [BASIS, feature])
    assert len(birth) == 1 and {k: card.birth[k] for k in birth[0]} == birth[0]
    assert not card.births_rule["default"] and "not the default rule" in card.birth_summary


def records_of(root, sql, params):
    from featurestore.warehouse import connect

    con = connect(root)
    try:
        return records(con, sql, params)
    finally:
        con.close()


def test_feature_command_prints_the_card_and_its_json(root):
    feature = busiest_feature(root)
    card = feature_card(BASIS, feature, step=0, examples=2, warehouse=root)
    runner = CliRunner()
    text = runner.invoke(cli, ["--warehouse", str(root), "feature", str(feature), "--basis",
                               BASIS, "--step", "0", "--examples", "2"], catch_exceptions=False)
    assert text.exit_code == 0
    assert text.output == card.summary() + "\n"
    assert card.energy_sparkline in text.output and "birth:" in text.output
    for example in card.examples:
        assert example["context"] in text.output and "⟦" in example["context"]
    as_json = runner.invoke(cli, ["--warehouse", str(root), "feature", str(feature), "--basis",
                                  BASIS, "--step", "0", "--examples", "2", "--json"],
                            catch_exceptions=False)
    assert json.loads(as_json.output) == json.loads(json.dumps(card.to_dict()))


def test_bad_basis_feature_or_step_name_the_valid_ones(root):
    (d_hidden,), = query(root, "SELECT d_hidden FROM bases WHERE name = ?", [BASIS])
    with pytest.raises(NotFoundError, match="tiny-diff, tiny-fn, tiny-l2"):
        feature_card("nope", 0, warehouse=root)
    with pytest.raises(NotFoundError, match=f"features 0..{d_hidden - 1}"):
        feature_card(BASIS, d_hidden, warehouse=root)
    steps = [s for (s,) in query(root, "SELECT DISTINCT step FROM trajectories WHERE basis = ? "
                                       "ORDER BY step", [BASIS])]
    with pytest.raises(NotFoundError, match=", ".join(map(str, steps))):
        feature_card(BASIS, 0, step=steps[-1] + 1, warehouse=root)
    with pytest.raises(FeaturestoreError, match="no checkpoints to choose from"):
        feature_card("tiny-diff", 0, step=steps[0], warehouse=root)
    result = CliRunner().invoke(cli, ["--warehouse", str(root), "feature", "0", "--basis",
                                      "nope"])
    assert result.exit_code == 1 and "--basis 'nope': no such basis" in result.output


def test_a_basis_without_births_says_so(root, tmp_path):
    copy = tmp_path / "warehouse"
    shutil.copytree(root, copy)
    with Warehouse(copy).writer("test: drop births") as writer:
        writer.put("births", [], replace_where={"basis": BASIS})
    card = feature_card(BASIS, 0, warehouse=copy)
    assert card.birth is None and card.birth_summary.startswith("no birth row")
    assert f"feature-birth-analyze --basis {BASIS}" in card.summary()


def test_graph_labels_name_the_top_tokens_as_text(root):
    from featurestore.queries.graphs import build_graph
    from featurestore.warehouse import connect

    con = connect(root)
    try:
        G = build_graph(con, BASIS)
    finally:
        con.close()
    step = G.nodes[f"feature:{BASIS}:0"]["examples_step"]
    top = query(root, """
        SELECT feature_id, context_token_ids[position - context_start + 1] AS token, count(*)
        FROM feature_examples WHERE basis = ? AND step = ? AND rank <= 10
        GROUP BY ALL ORDER BY count(*) DESC, feature_id, token LIMIT 1""", [BASIS, step])
    (feature, token, _), = top
    node = G.nodes[f"feature:{BASIS}:{feature}"]
    assert node["top_token_texts"][0] == token_string(token)
    assert node["label"].startswith(f"{BASIS} #{feature}: tokens \"{token_string(token)}\"")
    (ids, at), = query(root, "SELECT context_token_ids, position - context_start "
                             "FROM feature_examples WHERE basis = ? AND step = ? AND "
                             "feature_id = ? AND rank = 1", [BASIS, step, feature])
    assert node["top_context"] == decoded(ids, at)


def test_report_shows_decoded_contexts_escaped(root, tmp_path):
    from featurestore.queries.report import write_report

    result = write_report(BASIS, out=tmp_path / "report", warehouse=root)
    assert result.sections["Top examples"] > 0
    page = (tmp_path / "report" / "report.html").read_text()
    markdown = (tmp_path / "report" / "report.md").read_text()
    (step,), = query(root, "SELECT max(step) FROM feature_examples WHERE basis = ?", [BASIS])
    # The highlighted features include the one patched with the largest effect.
    (patched,), = query(root, "SELECT feature_ids[1] FROM patches WHERE basis = ? AND "
                              "metric = 'loss' AND len(feature_ids) = 1 "
                              "ORDER BY abs(delta) DESC LIMIT 1", [BASIS])
    (ids, at), = query(root, "SELECT context_token_ids, position - context_start "
                             "FROM feature_examples WHERE basis = ? AND step = ? AND "
                             "feature_id = ? AND rank = 1", [BASIS, step, patched])
    shown = decoded(ids, at)
    # Escaped: the token strings' markup is shown, not parsed.
    assert f"<td>{html.escape(shown)}</td>" in page and "&lt;t" in page
    assert shown in markdown


def test_artifacts_and_plots_carry_the_decoded_examples(root, tmp_path):
    from featurestore.queries.artifacts import export_artifacts

    result = export_artifacts(BASIS, out=tmp_path, warehouse=root)
    directory = tmp_path / "runs" / TINY_RUN / "analysis" / "shared_features" / "layer_2_post_mlp"
    features = {f["feature_id"]: f for f in
                json.loads((directory / "shared_feature_basis_features.json").read_text())}
    (step,), = query(root, "SELECT max(step) FROM feature_examples WHERE basis = ?", [BASIS])
    stored = query(root, "SELECT feature_id, rank, context_token_ids, position - context_start "
                         "FROM feature_examples WHERE basis = ? AND step = ? ORDER BY ALL",
                   [BASIS, step])
    for feature, rank, ids, at in stored:
        example = features[feature]["top_examples"][rank - 1]
        assert example["context"] == decoded(ids, at) and example["step"] == step
    lines = (directory / "feature_examples.jsonl").read_text().splitlines()
    assert len(lines) == query(root, "SELECT count(*) FROM feature_examples WHERE basis = ?",
                               [BASIS])[0][0]
    assert "feature_examples.jsonl" in result.files
    # Plot tooltips: the per-feature charts look up each feature's top context.
    spec = json.loads((directory / "plots" / "activation_heatmap.json").read_text())["spec"]
    assert {"field": "top_context", "title": "top context (last checkpoint)",
            "type": "nominal"} in spec["encoding"]["tooltip"]
    looked_up = [d for d in spec["datasets"].values()
                 if d and "top_context" in d[0]]
    assert looked_up and {r["top_context"] for r in looked_up[0]} <= {
        decoded(ids, at) for _, rank, ids, at in stored if rank == 1}
