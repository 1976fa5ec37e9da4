"""crosscoder-sweep: per-source statistics and contexts of a train-crosscoder basis (model diff).

Two planted sources on the same tokens: every token fires one planted feature, chosen by its
token id, with direction dirs[id]. Ids 0-7 write into both sources (shared), ids 8-15 into A
only, ids 16-23 into B only. A crosscoder trained on them learns latents exclusive to either
source; their top contexts must sit on the planted tokens of that source, and the per-source
statistics must equal an encode of the stored sets done here in numpy.
"""

from __future__ import annotations

import html
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from featurestore.cli import cli
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.warehouse import Warehouse, connect, records
from featurestore.writer import utc_now

from .conftest import query

VOCAB, D, SEQUENCES, LENGTH = 24, 32, 64, 32
SHARED, A_ONLY, B_ONLY = range(0, 8), range(8, 16), range(16, 24)
BASIS = "planted-diff"


def token_string(token_id: int) -> str:
    kind = "both" if token_id in SHARED else "a" if token_id in A_ONLY else "b"
    return f" <{kind}{token_id}>"


def planted_table(rng, tokens, magnitude, directions, fires) -> pa.Table:
    x = (magnitude * fires)[..., None] * directions[tokens]
    x = x + 0.01 * rng.normal(size=x.shape)
    sequence = np.repeat(np.arange(SEQUENCES), LENGTH)
    return pa.table({
        "activations": pa.array(list(x.reshape(-1, D).astype(np.float32)),
                                pa.list_(pa.float32(), D)),
        "sequence_id": sequence.astype(np.int64),
        "position": np.tile(np.arange(LENGTH), SEQUENCES).astype(np.int32),
        "token_id": tokens.reshape(-1).astype(np.int64),
        "split": np.array(["even", "odd"])[sequence % 2]})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from featurestore.ingest.register import register_activations
    from featurestore.ingest.train_crosscoder import train_crosscoder_job

    folder = tmp_path_factory.mktemp("planted-diff")
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(VOCAB, D))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    tokens = rng.integers(0, VOCAB, size=(SEQUENCES, LENGTH))
    magnitude = rng.uniform(1, 2, size=tokens.shape)
    root = folder / "warehouse"
    for stage, fires in (("a", tokens < 16), ("b", (tokens < 8) | (tokens >= 16))):
        pq.write_table(planted_table(rng, tokens, magnitude, directions, fires),
                       folder / f"{stage}.parquet")
        register_activations(str(folder / f"{stage}.parquet"), run="planted", step=0,
                             stage=stage, warehouse=root)
    with Warehouse(root).writer("test: token strings") as writer:
        writer.put("token_strings", [{"run": "planted", "token_id": i,
                                      "token_text": token_string(i), "tokenizer": "test"}
                                     for i in range(VOCAB)])
    train_crosscoder_job(BASIS, ["A=planted@0:a", "B=planted@0:b"], arch="vanilla",
                         dict_size=48, steps=600, batch_size=256, log_every=100,
                         save_every=1000, warehouse=root, progress=False)
    result = CliRunner().invoke(cli, ["--warehouse", str(root), "crosscoder-sweep", "--basis",
                                      BASIS, "--quiet", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


def numpy_encode(root):
    """Latents [n, h], per-source encoder terms [sources, n, h] and decoder norms [h, sources]
    of the stored sets, from the weights file and the Parquet files alone."""
    con = connect(root)
    try:
        (path, sources), = con.execute("SELECT path, sources FROM bases WHERE name = ?",
                                       [BASIS]).fetchall()
        files = [con.execute("SELECT path FROM activation_sets WHERE name = ?",
                             [s["activation_set"]]).fetchone()[0] for s in sources]
    finally:
        con.close()
    weights = load_file(Warehouse(root).path(path) / "crosscoder.safetensors")
    x = np.stack([np.stack(pq.read_table(f).column("activations").to_numpy(zero_copy_only=False))
                  * s["norm_scale"] for f, s in zip(files, sources)], axis=1)  # [n, s, d]
    encoder = weights["W_enc"].astype(np.float64)  # [s, d, h]
    terms = np.einsum("nsd,sdh->snh", x, encoder)
    latents = np.maximum(terms.sum(axis=0) + weights["b_enc"], 0)
    norms = np.linalg.norm(weights["W_dec"].astype(np.float64), axis=2)  # no shared latents
    return latents, terms, norms


def test_per_source_statistics_equal_a_numpy_encode(root):
    latents, terms, norms = numpy_encode(root)
    n, h = latents.shape
    stats = {(r["feature_id"], r["source_index"]): r for r in records_at(
        root, "SELECT * FROM crosscoder_latent_stats WHERE basis = ?", [BASIS])}
    assert len(stats) == 2 * h
    active = latents > 0
    for s in range(2):
        values = latents * norms[:, s]
        energy = (values ** 2).sum(axis=0)

        def got(column, s=s):
            return np.array([stats[i, s][column] for i in range(h)])

        assert (got("n_tokens") == n).all()
        np.testing.assert_allclose(got("activation_rate"), active.mean(axis=0), atol=2 / n)
        np.testing.assert_allclose(got("mean_activation"), values.mean(axis=0), rtol=1e-3,
                                   atol=1e-6)
        np.testing.assert_allclose(got("max_activation"), values.max(axis=0), rtol=1e-3,
                                   atol=1e-6)
        np.testing.assert_allclose(got("energy"), energy / energy.sum(), rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(got("decoder_norm"), norms[:, s], rtol=1e-5)
        fired = active.sum(axis=0) > 0
        inputs = (terms[s] * active).sum(axis=0)[fired] / active.sum(axis=0)[fired]
        np.testing.assert_allclose(got("mean_encoder_input")[fired].astype(float), inputs,
                                   rtol=1e-3, atol=1e-5)


def documented_class(relative: float, dead: bool) -> str:
    """A latent's model_diff class as warehouse/README.md states it: dead if it never fired,
    else by its relative decoder norm ||d_B|| / (||d_A|| + ||d_B||), A-exclusive below 0.3,
    B-exclusive above 0.7, shared between (the edges included)."""
    if dead:
        return "dead"
    return "A-exclusive" if relative < 0.3 else "B-exclusive" if relative > 0.7 else "shared"


def test_model_diff_classes_follow_the_documented_bands(root):
    """Every latent's class, recomputed from the weights file and the stored sets alone."""
    latents, _, norms = numpy_encode(root)
    relative = norms[:, 1] / norms.sum(axis=1)
    dead = ~(latents > 0).any(axis=0)
    expected = [documented_class(r, d) for r, d in zip(relative, dead)]
    # No live latent sits so close to a band edge that float rounding could decide its class.
    assert np.abs(relative[~dead, None] - [0.3, 0.7]).min() > 1e-4
    rows = records_at(root, "SELECT feature_id, class, relative_decoder_norm FROM model_diff "
                            "WHERE basis = ? ORDER BY feature_id", [BASIS])
    assert [r["feature_id"] for r in rows] == list(range(len(relative)))
    assert [r["class"] for r in rows] == expected
    np.testing.assert_allclose([r["relative_decoder_norm"] for r in rows], relative, rtol=1e-6)
    # The planted sources give every class latents, so each case above is exercised.
    assert set(expected) == {"A-exclusive", "B-exclusive", "shared", "dead"}


def test_model_diff_classes_at_the_band_edges(tmp_path):
    """The planted latents sit far from the edges (near 0, 0.5 and 1), so hand-made features
    rows pin the edges themselves: just inside, on and just outside 0.3 and 0.7, and dead
    latents whose norms would make them exclusive."""
    live = [0.0, 0.3 - 1e-9, 0.3, 0.3 + 1e-9, 0.5, 0.7 - 1e-9, 0.7, 0.7 + 1e-9, 1.0]
    cases = [(r, False) for r in live] + [(0.1, True), (0.9, True)]
    with Warehouse(tmp_path / "warehouse").writer("test: hand-made latents") as writer:
        writer.put("bases", [{
            "name": "edges", "kind": "crosscoder", "arch": "vanilla", "n_sources": 2,
            "d_model": 4, "d_hidden": len(cases), "k": None,
            "sources": [{"label": label, "activation_set": label, "run": None, "step": None,
                         "stage": None, "norm_scale": 1.0} for label in ("A", "B")],
            "config": "{}", "trainer_config": "{}", "path": "bases/edges", "steps": 1,
            "tokens": 1, "created_at": utc_now()}])
        writer.put("features", [{
            "basis": "edges", "feature_id": i, "designated_shared": False,
            "decoder_norms": [1 - relative, relative], "relative_decoder_norm": relative,
            "frequency": 0.0 if dead else 0.5, "max_activation": 0.0 if dead else 1.0,
            "dead": dead} for i, (relative, dead) in enumerate(cases)])
    rows = records_at(tmp_path / "warehouse", "SELECT class FROM model_diff WHERE basis = ? "
                                              "ORDER BY feature_id", ["edges"])
    assert [r["class"] for r in rows] == [documented_class(*case) for case in cases]


def test_examples_are_each_latents_top_tokens(root):
    latents, _, norms = numpy_encode(root)
    rows = records_at(root, "SELECT feature_id, rank, value, source_values, sequence_id, "
                            "position FROM crosscoder_examples WHERE basis = ? ORDER BY ALL",
                      [BASIS])
    by_feature: dict[int, list[dict]] = {}
    for row in rows:
        by_feature.setdefault(row["feature_id"], []).append(row)
    for feature, examples in by_feature.items():
        expected = np.sort(latents[:, feature][latents[:, feature] > 0])[::-1][:8]
        np.testing.assert_allclose([e["value"] for e in examples], expected, rtol=1e-4)
        assert [e["rank"] for e in examples] == list(range(1, len(examples) + 1))
        for e in examples:
            np.testing.assert_allclose(
                [e["source_values"]["A"], e["source_values"]["B"]],
                e["value"] * norms[feature], rtol=1e-5)
    assert set(by_feature) == set(np.flatnonzero((latents > 0).any(axis=0)))


def test_exclusive_latents_fire_on_their_sources_planted_tokens(root):
    rows = records_at(root, """
        SELECT d.class, e.feature_id, e.token_text, e.context_text, e.source_values,
               e.source_inputs, e.context_token_ids[e.position - e.context_start + 1] AS token
        FROM model_diff d JOIN crosscoder_examples e USING (basis, feature_id)
        WHERE d.basis = ? AND d.class LIKE '%-exclusive'""", [BASIS])
    classes = {r["class"] for r in rows}
    assert classes == {"A-exclusive", "B-exclusive"}
    for r in rows:
        own, other, planted = (("A", "B", A_ONLY) if r["class"] == "A-exclusive"
                               else ("B", "A", B_ONLY))
        assert r["token"] in planted, r
        assert r["token_text"] == token_string(r["token"])
        assert f"⟦{token_string(r['token'])}⟧" in r["context_text"]
        assert r["source_values"][own] > 10 * r["source_values"][other]
        if r["source_values"][own] > 1:  # a clear activation, not a near-dead latent's noise
            assert r["source_inputs"][own] > r["source_inputs"][other]


def test_model_diff_report_and_card(root, tmp_path):
    from featurestore.queries.feature_card import feature_card
    from featurestore.queries.report import write_report

    result = write_report(BASIS, out=tmp_path, warehouse=root)
    assert result.sections["Latent classes"] >= 3
    assert result.sections["Contexts of the most exclusive latents"] > 0
    page = (tmp_path / "report.html").read_text()
    (feature, context), = query(root, """
        SELECT e.feature_id, e.context_text FROM model_diff d
        JOIN crosscoder_examples e USING (basis, feature_id)
        WHERE d.basis = ? AND d.class = 'B-exclusive' AND e.rank = 1
        ORDER BY d.relative_decoder_norm DESC, d.frequency DESC, d.feature_id LIMIT 1""",
                                [BASIS])
    assert f"<td>{html.escape(context)}</td>" in page and "relative_norm_histogram" in page

    card = feature_card(BASIS, feature, examples=2, warehouse=root)
    assert card.model_diff["class"] == "B-exclusive"
    assert [s["source"] for s in card.sources] == ["A", "B"]
    assert card.examples[0]["context"] == context
    text = CliRunner().invoke(cli, ["--warehouse", str(root), "feature", str(feature),
                                    "--basis", BASIS, "--json"], catch_exceptions=False)
    assert json.loads(text.output)["sources"][1]["energy"] == card.sources[1]["energy"]


def test_sweeps_refuse_the_other_kind_of_basis(root, analysed_warehouse):
    from featurestore.ingest.crosscoder_sweep import crosscoder_sweep
    from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep

    with pytest.raises(FeaturestoreError, match="feature-trajectory-sweep --basis tiny-l2"):
        crosscoder_sweep("tiny-l2", warehouse=analysed_warehouse)
    with pytest.raises(FeaturestoreError, match=f"crosscoder-sweep --basis {BASIS}"):
        feature_trajectory_sweep(BASIS, warehouse=root, progress=False)
    with pytest.raises(NotFoundError, match=f"train-crosscoder bases: {BASIS}"):
        crosscoder_sweep("nope", warehouse=root)


def records_at(root, sql, params):
    con = connect(root)
    try:
        return records(con, sql, params)
    finally:
        con.close()
