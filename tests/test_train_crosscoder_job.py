"""train-crosscoder as a job: warehouse outputs, SQL views, bad sources, resume state cleanup."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.crosscoder import CrossCoder
from featurestore.crosscoder_training import STATE_FILE
from featurestore.errors import (
    FeaturestoreError,
    FitRejectedError,
    InvalidActivationsError,
    NotFoundError,
)
from featurestore.ingest.train_crosscoder import train_crosscoder_job
from featurestore.warehouse import Warehouse, connect

from .conftest import (
    RELAXED_BOUNDS,
    RELAXED_FLAGS,
    TINY_D_MODEL,
    TINY_RUN,
    TINY_STEPS,
    basis_path,
    snapshot,
)

BASE = f"base={TINY_RUN}@0:layer_2_post_mlp"
TUNED = f"tuned={TINY_RUN}@{TINY_STEPS}:layer_2_post_mlp"
SMALL = {"dict_size": 64, "k": 4, "steps": 30, "batch_size": 128, "log_every": 10,
         "save_every": 10, "progress": False, **RELAXED_BOUNDS}


@pytest.fixture(scope="module")
def crosscoder_warehouse(tmp_path_factory, trained_warehouse):
    import shutil

    root = tmp_path_factory.mktemp("cc") / "warehouse"
    shutil.copytree(trained_warehouse, root)
    train_crosscoder_job("diff", [BASE, TUNED], warehouse=root, **SMALL)
    return root


def rows(root, sql):
    con = connect(root)
    try:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r)) for r in cursor.fetchall()]
    finally:
        con.close()


def test_the_basis_and_its_tables_are_registered(crosscoder_warehouse):
    (basis,) = rows(crosscoder_warehouse, "SELECT * FROM bases")
    assert (basis["name"], basis["arch"], basis["n_sources"], basis["d_hidden"]) == (
        "diff", "batchtopk", 2, 64)
    assert [s["label"] for s in basis["sources"]] == ["base", "tuned"]
    assert basis["sources"][1]["step"] == TINY_STEPS
    assert json.loads(basis["final_metrics"])["l0_loss"] > 0
    features = rows(crosscoder_warehouse, "SELECT * FROM features ORDER BY feature_id")
    directions = rows(crosscoder_warehouse, "SELECT * FROM decoder_directions")
    assert len(features) == 64 and len(directions) == 128
    metrics = rows(crosscoder_warehouse, "SELECT DISTINCT step FROM training_metrics ORDER BY 1")
    assert [m["step"] for m in metrics] == [10, 20, 30]
    # The resume state is gone once the basis is registered.
    assert not (crosscoder_warehouse / "training" / "diff").exists()


def test_feature_geometry_matches_the_saved_weights(crosscoder_warehouse):
    model = CrossCoder.load(basis_path(crosscoder_warehouse, "diff"))
    decoder = model.decoder().detach().double().numpy()
    features = rows(crosscoder_warehouse, "SELECT * FROM features ORDER BY feature_id")
    for f in features[:10]:
        a, b = decoder[f["feature_id"]]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        assert f["decoder_norms"] == pytest.approx([na, nb], rel=1e-5)
        assert f["relative_decoder_norm"] == pytest.approx(nb / (na + nb), rel=1e-5)
        assert f["decoder_cosine"] == pytest.approx(a @ b / (na * nb), rel=1e-4)
    # The same cosine computed by DuckDB from decoder_directions.
    (sql_cosine,) = rows(crosscoder_warehouse, """
        SELECT list_cosine_similarity(a.direction, b.direction) AS c
        FROM decoder_directions a JOIN decoder_directions b USING (basis, feature_id)
        WHERE a.source = 'base' AND b.source = 'tuned' AND feature_id = 3""")
    assert sql_cosine["c"] == pytest.approx(features[3]["decoder_cosine"], rel=1e-4)
    # Norm factors travel with the model: encode/decode work in original units.
    assert model.norm_scales.tolist() == pytest.approx(
        [s["norm_scale"] for s in rows(crosscoder_warehouse, "SELECT sources FROM bases")[0][
            "sources"]])


def test_frequencies_match_an_independent_encoding_pass(crosscoder_warehouse):
    from featurestore.registry import get_activation_set_row, open_activation_set
    from featurestore.warehouse import Warehouse

    model = CrossCoder.load(basis_path(crosscoder_warehouse, "diff"))
    wh = Warehouse(crosscoder_warehouse)
    con = wh.connect()
    sets = [open_activation_set(wh, get_activation_set_row(con, name.split("=")[1]))
            for name in (BASE, TUNED)]
    con.close()
    x = torch.from_numpy(np.stack([s.all_rows() for s in sets], axis=1))  # original units
    active = (model.encode(x) > 0).double().mean(dim=0).numpy()
    features = rows(crosscoder_warehouse, "SELECT frequency FROM features ORDER BY feature_id")
    np.testing.assert_allclose([f["frequency"] for f in features], active, atol=1e-9)


def test_model_diff_views(crosscoder_warehouse):
    classes = rows(crosscoder_warehouse, "SELECT class, count(*) AS n FROM model_diff GROUP BY 1")
    assert sum(c["n"] for c in classes) == 64
    assert {c["class"] for c in classes} <= {"base-exclusive", "tuned-exclusive", "shared", "dead"}
    summary = rows(crosscoder_warehouse, "SELECT * FROM model_diff_summary")
    assert sum(s["n_features"] for s in summary) == 64
    histogram = rows(crosscoder_warehouse, "SELECT sum(n_features) AS n FROM "
                                           "relative_norm_histogram")
    live = rows(crosscoder_warehouse, "SELECT count(*) AS n FROM features WHERE NOT dead")
    assert histogram[0]["n"] == live[0]["n"]
    banded = rows(crosscoder_warehouse, "SELECT model_diff_class(0.1, 'a', 'b', 0.3, 0.7) AS c, "
                                        "model_diff_class(0.9, 'a', 'b', 0.3, 0.7) AS d, "
                                        "model_diff_class(0.5, 'a', 'b', 0.3, 0.7) AS e")
    assert banded == [{"c": "a-exclusive", "d": "b-exclusive", "e": "shared"}]


def test_bad_sources_fail_clearly_and_write_nothing(warehouse_copy, tmp_path):
    before = snapshot(warehouse_copy)
    with pytest.raises(NotFoundError, match="no activation set named 'nope'"):
        train_crosscoder_job("x", [BASE, "b=nope"], warehouse=warehouse_copy, **SMALL)
    with pytest.raises(FeaturestoreError, match="expected LABEL=SET"):
        train_crosscoder_job("x", ["justaname"], warehouse=warehouse_copy, **SMALL)
    with pytest.raises(FeaturestoreError, match="labels repeat"):
        train_crosscoder_job("x", [BASE, BASE], warehouse=warehouse_copy, **SMALL)
    with pytest.raises(FeaturestoreError, match="invalid basis name"):
        train_crosscoder_job("../x", [BASE], warehouse=warehouse_copy, **SMALL)
    # A set on other tokens, given as a path: misaligned.
    from featurestore.activations import TokenColumns, write_activation_set

    n = 1024
    other = TokenColumns(np.arange(n) // 32, (np.arange(n) % 32).astype(np.int32),
                         np.zeros(n, dtype=np.int64), np.array(["x"] * n, dtype=object))
    values = np.random.default_rng(0).standard_normal((n, TINY_D_MODEL)).astype(np.float32)
    write_activation_set(tmp_path / "other", values, other)
    with pytest.raises(InvalidActivationsError, match="misaligned sources"):
        train_crosscoder_job("x", [BASE, f"o={tmp_path / 'other'}"], warehouse=warehouse_copy,
                             **SMALL)
    assert snapshot(warehouse_copy) == before


def test_the_command_line_trains_a_single_source_sae(warehouse_copy):
    result = CliRunner().invoke(cli, [
        "--warehouse", str(warehouse_copy), "--threads", "1", "train-crosscoder", "--name",
        "sae", "--source", BASE, "--arch", "vanilla", "--dict-size", "32", "--steps", "10",
        "--batch-size", "64", *RELAXED_FLAGS, "--json", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert (out["arch"], out["sources"], out["steps"]) == ("vanilla", ["base"], 10)
    features = rows(warehouse_copy, "SELECT relative_decoder_norm, nu_recon FROM features "
                                    "WHERE basis = 'sae' LIMIT 1")
    assert features[0]["relative_decoder_norm"] is None  # defined for two sources only


def test_wandb_logging_works_offline(warehouse_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_crosscoder_job("logged", [BASE], wandb=True, warehouse=warehouse_copy,
                         **{**SMALL, "steps": 10, "log_every": 5})
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    # Offline runs keep their history in this file (protobuf records, keys stored as text).
    history = run_file.read_bytes()
    assert b"explained_variance_base" in history and b"dead_fraction" in history
    assert rows(warehouse_copy, "SELECT count(DISTINCT step) AS n FROM training_metrics "
                                "WHERE basis = 'logged'") == [{"n": 2}]


# --- training straight from models (--tokens-from) ---------------------------------------------

MODEL_BASE = f"base={TINY_RUN}@0:layer_2_post_mlp"
MODEL_TUNED = f"tuned={TINY_RUN}@LAST:layer_2_post_mlp"
# 2048 tokens in batches of 16: 128 steps, above the 100 a run needs.
FROM_MODELS = {**SMALL, "steps": None, "tokens": 2048, "batch_size": 16, "tokens_from": "demo",
               "pool_batches": 4}


def test_training_from_models_writes_no_activations_and_registers_the_basis(warehouse_copy):
    sets_before = rows(warehouse_copy, "SELECT name FROM activation_sets ORDER BY name")
    files_before = {p for p in (warehouse_copy / "activations").rglob("*")}
    result = CliRunner().invoke(cli, [
        "--warehouse", str(warehouse_copy), "--threads", "1", "train-crosscoder", "--name",
        "live", "--source", MODEL_BASE, "--source", MODEL_TUNED, "--tokens-from", "demo",
        "--tokens", "2048", "--pool-batches", "4", "--dict-size", "64", "--k", "4",
        "--batch-size", "16", "--log-every", "4", *RELAXED_FLAGS, "--json", "--quiet"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["steps"] == 2048 // 16  # each streamed token used once

    assert rows(warehouse_copy, "SELECT name FROM activation_sets ORDER BY name") == sets_before
    assert {p for p in (warehouse_copy / "activations").rglob("*")} == files_before
    assert not (warehouse_copy / "training" / "live").exists()
    (basis,) = rows(warehouse_copy, "SELECT * FROM bases WHERE name = 'live'")
    assert [(s["label"], s["run"], s["step"], s["stage"], s["activation_set"])
            for s in basis["sources"]] == [("base", TINY_RUN, 0, "layer_2_post_mlp", None),
                                           ("tuned", TINY_RUN, TINY_STEPS, "layer_2_post_mlp",
                                            None)]
    data = json.loads(basis["trainer_config"])["data"]
    assert data["tokens"].startswith("demo task") and data["n_rows"] == 2048
    assert data["pool_rows"] == 4 * 16
    model = CrossCoder.load(basis_path(warehouse_copy, "live"))
    assert model.norm_scales.tolist() == pytest.approx([s["norm_scale"] for s in basis["sources"]])
    assert rows(warehouse_copy, "SELECT count(*) AS n FROM features WHERE basis = 'live'") == [
        {"n": 64}]


def test_bad_model_sources_fail_clearly_and_write_nothing(warehouse_copy, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from featurestore.errors import UnknownStageError
    from featurestore.ingest.train_model import train_model

    train_model("narrow", steps=1, d_model=16, warehouse=warehouse_copy, progress=False)
    before = snapshot(warehouse_copy)

    def train(sources, **options):
        train_crosscoder_job("x", sources, warehouse=warehouse_copy, **{**FROM_MODELS, **options})

    with pytest.raises(NotFoundError, match="b=nope@0:.*unknown run 'nope'; runs in this "
                                            "warehouse: narrow, tiny"):
        train([MODEL_BASE, "b=nope@0:layer_2_post_mlp"])
    with pytest.raises(NotFoundError, match="no checkpoint at step 15; its checkpoints are at"):
        train([MODEL_BASE, f"b={TINY_RUN}@15:layer_2_post_mlp"])
    with pytest.raises(UnknownStageError, match="unknown stage 'layer_9_post_mlp'.*valid "
                                                "stages: embed, layer_0_post_attn"):
        train([MODEL_BASE, f"b={TINY_RUN}@0:layer_9_post_mlp"])
    with pytest.raises(InvalidActivationsError, match="d_model mismatch: source base .* has "
                                                      "width 32 .* n .narrow@1. has 16"):
        train([MODEL_BASE, "n=narrow@LAST:layer_2_post_mlp"])
    with pytest.raises(FeaturestoreError, match="not a mix"):
        train([MODEL_BASE, f"s={warehouse_copy / 'activations'}"])
    with pytest.raises(FeaturestoreError, match="names a model: training from models needs "
                                                "--tokens-from"):
        train([f"x=hf:{tmp_path}:layer_0_post_mlp"], tokens_from=None)
    with pytest.raises(FeaturestoreError, match="not a Hugging Face model directory"):
        train([f"x=hf:{tmp_path}:layer_0_post_mlp"])
    with pytest.raises(FeaturestoreError, match="exhausted before the first batch: it has 10 "
                                                "tokens, fewer than --batch-size 16"):
        train([MODEL_BASE], tokens=10)
    # A tokenized dataset on disk: 1024 tokens allow 64 steps of 16, and its ids must fit.
    ids = np.arange(1024).reshape(64, 16) % 20
    pq.write_table(pa.table({"input_ids": ids.tolist()}), tmp_path / "tokens.parquet")
    with pytest.raises(FeaturestoreError, match="--steps 100 .* lower --steps to at most 64"):
        train([MODEL_BASE], tokens_from=str(tmp_path / "tokens.parquet"), tokens=None, steps=100)
    pq.write_table(pa.table({"input_ids": (ids + 1000).tolist()}), tmp_path / "wide.parquet")
    with pytest.raises(FeaturestoreError, match="token ids reach 1019 but the model of source "
                                                "base .* has a vocabulary of"):
        train([MODEL_BASE], tokens_from=str(tmp_path / "wide.parquet"), tokens=None)
    assert snapshot(warehouse_copy) == before


# --- the resume state ---------------------------------------------------------------------------

KILLED_AFTER_COMMIT = """
import json, os, signal, sys
from featurestore import writer
from featurestore.ingest.train_crosscoder import train_crosscoder_job

discard = writer.Writer.discard

def die_once_committed(self):  # the commit stands; the job dies before its cleanup
    if self.committed:
        os.kill(os.getpid(), signal.SIGKILL)
    discard(self)

writer.Writer.discard = die_once_committed
train_crosscoder_job(warehouse=sys.argv[1], **json.loads(sys.argv[2]))
"""


def test_the_resume_state_stays_after_a_failure_and_goes_with_the_commit(warehouse_copy,
                                                                         tmp_path):
    root = warehouse_copy
    state = root / "training" / "kept"
    with pytest.raises(FitRejectedError):
        train_crosscoder_job("kept", [BASE, TUNED], warehouse=root,
                             **{**SMALL, "min_explained_variance": 1.5})
    assert (state / STATE_FILE).is_file()
    saved = tmp_path / "saved"
    shutil.copytree(state, saved)  # with its times: a state saved before the commit below
    with Warehouse(root).writer("another job"):
        pass
    assert (state / STATE_FILE).is_file()  # still wanted, for --resume

    # Resumed with relaxed bounds, the basis commits and the job is killed right after.
    job = {"name": "kept", "sources": [BASE, TUNED], "resume": True, **SMALL}
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_COMMIT, str(root),
                             json.dumps(job)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert rows(root, "SELECT name FROM bases WHERE name = 'kept'") == [{"name": "kept"}]
    with Warehouse(root).writer("next job"):
        pass
    assert not state.exists() and not any((root / "training").iterdir())
    assert not any((root / "tmp").glob("*"))  # the killed job's scratch went too

    # A state older than the basis of its name, as a featurestore that deleted it only after
    # the commit left it when killed there: the next job deletes it.
    shutil.copytree(saved, state)
    with Warehouse(root).writer("next job"):
        pass
    assert not state.exists()
