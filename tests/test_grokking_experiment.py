"""`featurestore experiment grokking`, reduced (p = 11, 100 steps), end to end through the CLI;
its tables checked against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.grokking import ModularAddition, answer_logits, frequency_shares

from .conftest import query

P, STEPS, D_MODEL, TRAIN_FRACTION = 11, 100, 32, 0.4
ARGS = ["--p", str(P), "--steps", str(STEPS), "--d-model", str(D_MODEL), "--dense-every", "20",
        "--fit-steps", "400", "--quiet"]


def run_cli(root: Path, *args: str):
    return CliRunner().invoke(cli, ["--warehouse", str(root), "--threads", "1", *args])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("grokking") / "warehouse"
    done = run_cli(root, "experiment", "grokking", *ARGS, "--json")
    assert done.exit_code == 0, done.output + repr(done.exception)
    return root, json.loads(done.stdout)


def test_the_checkpoints_measures_match_the_saved_models(experiment):
    from featurestore.checkpoints import load_checkpoint
    from featurestore.warehouse import Warehouse

    root, found = experiment
    task = ModularAddition(P, TRAIN_FRACTION)
    rows = query(root, "SELECT step, train_accuracy, test_accuracy, train_loss, frequency_shares, "
                       "key_frequencies FROM progress_measures WHERE run = 'grok' ORDER BY step")
    steps = [r[0] for r in rows]
    # Log-spaced, then every 20 steps, to the last.
    assert steps == [0, 1, 2, 4, 8, 16, 20, 32, 40, 60, 64, 80, 100]
    assert found["checkpoints"] == len(steps) and found["key_frequencies"] == list(rows[0][5])
    paths = dict(query(root, "SELECT step, path FROM checkpoints WHERE run = 'grok'"))
    answers, train = task.answers(), task.train_mask()
    for step, train_acc, test_acc, train_loss, shares, _ in rows[::4] + rows[-1:]:
        model = load_checkpoint(Warehouse(root).path(paths[step]))
        with torch.no_grad():
            logits = answer_logits(model, torch.from_numpy(task.tokens())).double().numpy()
        correct = logits.argmax(1) == answers
        assert train_acc == pytest.approx(correct[train].mean())
        assert test_acc == pytest.approx(correct[~train].mean())
        log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(
            1, keepdims=True)) - logits.max(1, keepdims=True)
        assert train_loss == pytest.approx(-log_probs[train, answers[train]].mean(), rel=1e-9)
        embedding = model.wte.weight[:P].double().detach().numpy()
        np.testing.assert_allclose(shares, frequency_shares(embedding), atol=1e-12)
    # The phases view reads the same rows.
    memorised = next((s for s, acc, *_ in rows if acc >= 0.99), None)
    assert query(root, "SELECT memorised_step FROM grokking_phases WHERE run = 'grok'") == \
        [(memorised,)] and found["memorised_step"] == memorised


def test_feature_frequencies_match_the_swept_activations(experiment):
    from featurestore.registry import get_activation_set_row, open_activation_set
    from featurestore.warehouse import Warehouse, connect

    root, _ = experiment
    con = connect(root)
    try:
        (name, step), = con.execute(
            "SELECT s.activation_set, s.step FROM bases b, unnest(b.sources) AS t(s) "
            "WHERE b.name = 'grok-l0' ORDER BY s.step DESC LIMIT 1").fetchall()
        tokens = open_activation_set(Warehouse(root), get_activation_set_row(con, name)
                                     ).token_columns()
        stored = con.execute("SELECT feature_id, step, answer_profile, dominant_frequency, "
                             "dominant_frequency(answer_profile) FROM feature_frequencies "
                             "WHERE basis = 'grok-l0' ORDER BY feature_id").fetchall()
        swept = con.execute("SELECT feature_id, sequence_id, value FROM feature_activations "
                            "WHERE basis = 'grok-l0' AND step = ? AND position = 2",
                            [step]).fetchall()
    finally:
        con.close()
    # Every problem of the grid was collected, once.
    assert len(tokens) == P * P * 4
    answer_of = dict(zip(tokens.sequence_id[tokens.position == 3].tolist(),
                         tokens.token_id[tokens.position == 3].tolist()))
    assert sorted(np.bincount(list(answer_of.values()))) == [P] * P
    # The mean activation per answer, rebuilt from the sweep's sparse feature_activations.
    sums = np.zeros((len(stored), P))
    for feature, sequence, value in swept:
        sums[feature, answer_of[sequence]] += value
    np.testing.assert_allclose([r[2] for r in stored], sums / P, rtol=1e-4, atol=1e-5)
    assert {r[1] for r in stored} == {step}
    assert all(r[3] == r[4] for r in stored)  # the job's frequency is the SQL UDF's
    assert sum(r[3] is not None for r in stored) > 0


def test_the_store_answers_the_question_and_writes_the_report(experiment):
    root, found = experiment
    assert [b["basis"] for b in found["bases"]] == ["grok-l0", "grok-fn"]
    for basis in found["bases"]:
        # The findings are the view's rows under the default rule, counted here apart.
        rows = query(root, "SELECT follows, birth_step, born_before_jump FROM frequency_births "
                           "WHERE basis = ? AND metric = 'energy' AND presence = 'relative'",
                     [basis["basis"]])
        kinds = basis["kinds"]
        assert sum(k["features"] for k in kinds.values()) == len(rows) == query(
            root, "SELECT count(*) FROM feature_frequencies WHERE basis = ?",
            [basis["basis"]])[0][0]
        for follows, kind in kinds.items():
            births = [b for f, b, _ in rows if f == follows and b is not None]
            assert kind["born"] == len(births)
            if found["jump_step"] is None:
                assert kind["born_before_jump"] is None
            else:
                assert kind["born_before_jump"] == sum(b < found["jump_step"] for b in births)
        # 'key frequency' is what feature_frequencies calls key_frequency.
        assert kinds.get("key frequency", {"features": 0})["features"] == query(
            root, "SELECT count(*) FROM feature_frequencies WHERE basis = ? AND key_frequency",
            [basis["basis"]])[0][0]
    # The token strings are the task's: numbers and '='.
    assert [t for (t,) in query(root, "SELECT token_text FROM token_strings WHERE run = 'grok' "
                                      "ORDER BY token_id")] == [f" {i}" for i in range(P)] + [" ="]
    # Patching graded the answer only; lineage traced the patched features.
    assert query(root, "SELECT DISTINCT split FROM patches WHERE basis = 'grok-l0' ORDER BY 1") \
        == [("test",), ("train",)]
    assert query(root, "SELECT count(*) FROM lineage_edges WHERE basis = 'grok-l0'")[0][0] > 0
    report = Path(found["report"])
    page = report.read_text()
    for title in ("Phases", "Progress measures", "Births against the jump"):
        assert f"<h2>{title}</h2>" in page
    for plot in ("phases", "births_against_jump", "feature_trajectories"):
        for fmt in ("json", "png", "svg", "html"):
            assert (report.parent / "plots" / f"{plot}.{fmt}").stat().st_size > 0
    spec = json.loads((report.parent / "plots" / "phases.json").read_text())["spec"]
    values = [v for rows in spec["datasets"].values() for v in rows]
    assert len(spec["hconcat"]) == 3
    assert {v["measure"] for v in values if "measure" in v} >= {"test_accuracy",
                                                                 "restricted_loss"}


def test_feature_frequencies_rerun_is_idempotent_and_bad_input_is_named(experiment, tmp_path):
    root, _ = experiment
    before = query(root, "SELECT * FROM feature_frequencies ORDER BY basis, feature_id")
    done = run_cli(root, "feature-frequencies", "--basis", "grok-fn")
    assert done.exit_code == 0, done.output
    assert query(root, "SELECT * FROM feature_frequencies ORDER BY basis, feature_id") == before
    # A composite modulus: refused before anything is written.
    fresh = tmp_path / "fresh"
    done = run_cli(fresh, "experiment", "grokking", "--p", "15", "--steps", "5", "--quiet")
    assert done.exit_code == 1 and "--p" in done.output and "prime" in done.output
    assert not (fresh / "data").exists()


def test_answer_feature_frequencies_match_numpy(experiment):
    from featurestore.shared_basis import load_shared_basis
    from featurestore.warehouse import Warehouse, connect

    root, _ = experiment
    con = connect(root)
    try:
        for basis in ("grok-l0", "grok-fn"):
            shared, _ = load_shared_basis(Warehouse(root), con, basis)
            decoders = shared.decoder_directions(0)
            features = con.execute(
                "SELECT feature_id, answer_profile FROM feature_frequencies WHERE basis = ? "
                "AND NOT follows_frequency AND answer_variance_share >= 0.9",
                [basis]).fetchall()
            stored = con.execute("SELECT n_answer_features, answers_covered, frequency_shares "
                                 "FROM answer_feature_frequencies WHERE basis = ?",
                                 [basis]).fetchall()
            if not features:
                assert stored == []
                continue
            (n, covered, shares), = stored
            answers = [int(np.argmax(profile)) for _, profile in features]
            assert (n, covered) == (len(features), len(set(answers)))
            means = np.zeros((P, decoders.shape[1]))
            for (feature, _), answer in zip(features, answers):
                unit = decoders[feature] / np.linalg.norm(decoders[feature])
                means[answer] += unit / answers.count(answer)
            # numpy's complex FFT over the answer, dimension by dimension.
            spectrum = (np.abs(np.fft.fft(means, axis=0)) ** 2).sum(axis=1)
            energy = np.concatenate([spectrum[:1], spectrum[1:(P + 1) // 2]
                                     + spectrum[:(P - 1) // 2:-1]])
            np.testing.assert_allclose(shares, energy / energy.sum(), atol=1e-9)
    finally:
        con.close()
