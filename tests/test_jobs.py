"""The jobs end to end on a tiny real run: train, fine-tune, collect, register, and bad input."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from featurestore.activations import ActivationSet
from featurestore.checkpoints import load_checkpoint
from featurestore.compaction import compact_warehouse
from featurestore.errors import (
    CorruptCheckpointError,
    FeaturestoreError,
    InvalidActivationsError,
    NotFoundError,
    UnknownStageError,
)
from featurestore.ingest.collect import collect, token_set
from featurestore.ingest.register import register_activations
from featurestore.ingest.train_model import finetune, train_model
from featurestore.registry import get_activation_set_row, open_activation_set
from featurestore.warehouse import Warehouse, connect, derived_from_basis

from .conftest import STAGES, TINY_D_MODEL, TINY_RUN, TINY_STEPS, TINY_TOKENS, query, snapshot


def test_training_registers_log_spaced_checkpoints_with_metrics(trained_warehouse):
    (run,) = query(trained_warehouse, "SELECT run, kind, d_model, n_layers, steps FROM runs")
    assert run == (TINY_RUN, "pretrain", TINY_D_MODEL, 4, TINY_STEPS)
    rows = query(trained_warehouse, "SELECT step, path, train_loss, split_metrics FROM checkpoints "
                                    "ORDER BY step")
    steps = [r[0] for r in rows]
    assert steps[0] == 0 and steps[-1] == TINY_STEPS and len(steps) >= 12
    for _, path, _, metrics in rows:
        assert (trained_warehouse / path / "model.safetensors").is_file()
        assert {m["split"] for m in metrics} >= {"train", "heldout", "bigram", "modular",
                                                 "induction", "reverse"}
    assert rows[-1][2] < rows[0][2]  # training lowered the train loss
    # The view unnests metrics into one row per split.
    (n,) = query(trained_warehouse, "SELECT count(*) FROM checkpoint_metrics")[0]
    assert n == len(rows) * len(rows[0][3])


def test_checkpoints_reload_to_the_same_function(trained_warehouse):
    (path,) = query(trained_warehouse, "SELECT path FROM checkpoints WHERE step = ?",
                    [TINY_STEPS])[0]
    model = load_checkpoint(trained_warehouse / path)
    again = load_checkpoint(trained_warehouse / path)
    tokens = torch.randint(0, model.config.vocab_size, (2, 8))
    torch.testing.assert_close(model(tokens), again(tokens))
    config = json.loads((trained_warehouse / path / "config.json").read_text())
    assert config["step"] == TINY_STEPS and config["model"]["d_model"] == TINY_D_MODEL


def test_training_is_deterministic_and_rerunning_is_idempotent(warehouse_copy):
    def weights():
        (path,) = query(warehouse_copy, "SELECT path FROM checkpoints WHERE step = ?",
                        [TINY_STEPS])[0]
        return load_file(warehouse_copy / path / "model.safetensors")

    before = weights()
    checkpoints_before = query(warehouse_copy, "SELECT run, step, train_loss FROM checkpoints "
                                               "ORDER BY step")
    train_model(TINY_RUN, steps=TINY_STEPS, d_model=TINY_D_MODEL, warehouse=warehouse_copy,
                progress=False)
    after = weights()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert query(warehouse_copy, "SELECT run, step, train_loss FROM checkpoints "
                                 "ORDER BY step") == checkpoints_before
    # Re-training dropped the activation sets of the old weights; their files stay for older
    # snapshots until compaction expires those.
    assert query(warehouse_copy, "SELECT count(*) FROM activation_sets") == [(0,)]
    assert any((warehouse_copy / "activations" / TINY_RUN).rglob("*.arrow"))
    compact_warehouse(warehouse_copy, timedelta(0))
    assert not any((warehouse_copy / "activations" / TINY_RUN).rglob("*.arrow"))


def test_retraining_a_run_drops_the_bases_fitted_on_its_old_weights(analysed_warehouse,
                                                                     tmp_path):
    root = tmp_path / "warehouse"
    shutil.copytree(analysed_warehouse, root)
    bases = [name for (name,) in query(root, "SELECT name FROM bases ORDER BY name")]
    assert bases == ["tiny-diff", "tiny-fn", "tiny-l2"]  # every one fitted on run tiny
    per_basis = [table for table, where in derived_from_basis("tiny-l2") if "basis" in where]
    per_basis += ["features", "decoder_directions", "training_metrics"]
    assert all(query(root, f"SELECT count(*) FROM {t}")[0][0] > 0
               for t in ("features", "trajectories", "births", "lineage_edges"))

    train_model(TINY_RUN, steps=TINY_STEPS, d_model=TINY_D_MODEL, warehouse=root,
                progress=False)
    # Nothing computed from the old weights is read as the new run's: no activation set, no
    # basis, no row of a basis.
    assert query(root, "SELECT count(*) FROM activation_sets") == [(0,)]
    assert query(root, "SELECT count(*) FROM bases") == [(0,)]
    assert {t: query(root, f"SELECT count(*) FROM {t}")[0][0] for t in per_basis} == dict.fromkeys(
        per_basis, 0)


def test_collect_three_checkpoints_two_stages_aligned(trained_warehouse):
    rows = query(trained_warehouse, "SELECT name, step, stage, n_tokens, d_model, "
                                    "tokens_fingerprint, path FROM activation_sets ORDER BY name")
    assert len(rows) == 6
    assert {r[2] for r in rows} == set(STAGES)
    assert len({r[1] for r in rows}) == 3
    assert {r[3] for r in rows} == {TINY_TOKENS} and {r[4] for r in rows} == {TINY_D_MODEL}
    assert len({r[5] for r in rows}) == 1  # every set has the same tokens, row for row


def test_collected_activations_equal_the_models_own_computation(trained_warehouse):
    con = connect(trained_warehouse)
    row = get_activation_set_row(con, f"{TINY_RUN}@{TINY_STEPS}:final_norm")
    (ckpt_path,) = con.execute("SELECT path FROM checkpoints WHERE step = ?",
                               [TINY_STEPS]).fetchall()[0]
    (task_config,) = con.execute("SELECT task_config FROM runs").fetchall()[0]
    con.close()
    stored = open_activation_set(Warehouse(trained_warehouse), row)
    model = load_checkpoint(trained_warehouse / ckpt_path)
    tokens, columns = token_set(json.loads(task_config),
                                ["bigram", "modular", "induction", "reverse"], TINY_TOKENS, 0)
    np.testing.assert_array_equal(stored.token_columns().token_id, columns.token_id)
    # Independently: the model's forward pass up to ln_f, no nnsight involved.
    with torch.no_grad():
        x = model.wte(tokens) + model.wpe(torch.arange(tokens.shape[1]))
        for block in model.blocks:
            x = block(x)
        expected = model.ln_f(x).reshape(-1, TINY_D_MODEL).numpy()
    np.testing.assert_allclose(stored.all_rows(), expected, rtol=1e-5, atol=1e-5)
    # The stored norm scale brings the mean norm (positions >= 1) to sqrt(d_model).
    norms = np.linalg.norm(expected[columns.position != 0] * row["norm_scale"], axis=1)
    assert norms.mean() == pytest.approx(np.sqrt(TINY_D_MODEL), rel=1e-6)


def test_recollecting_is_idempotent(warehouse_copy):
    before = query(warehouse_copy, "SELECT name, norm_scale, tokens_fingerprint FROM "
                                   "activation_sets ORDER BY name")
    collect(TINY_RUN, ["final_norm"], checkpoints="0", tokens=TINY_TOKENS,
            warehouse=warehouse_copy, progress=False)
    assert query(warehouse_copy, "SELECT name, norm_scale, tokens_fingerprint FROM "
                                 "activation_sets ORDER BY name") == before


def test_finetune_continues_from_the_parent_checkpoint(warehouse_copy):
    result = finetune("tiny-ft", f"{TINY_RUN}@LAST", steps=5, warehouse=warehouse_copy,
                      progress=False)
    assert result.checkpoint_steps[0] == 0 and result.checkpoint_steps[-1] == 5
    (row,) = query(warehouse_copy, "SELECT kind, parent_run, parent_step, task_config FROM runs "
                                   "WHERE run = 'tiny-ft'")
    assert row[:3] == ("finetune", TINY_RUN, TINY_STEPS)
    assert json.loads(row[3])["mix"]["reverse"] > 0
    # Step 0 of the fine-tune is the parent's last checkpoint, weight for weight.
    paths = dict(query(warehouse_copy, "SELECT run, path FROM checkpoints WHERE "
                                       "(run = 'tiny-ft' AND step = 0) OR (run = ? AND step = ?)",
                       [TINY_RUN, TINY_STEPS]))
    parent = load_file(warehouse_copy / paths[TINY_RUN] / "model.safetensors")
    child = load_file(warehouse_copy / paths["tiny-ft"] / "model.safetensors")
    assert all(torch.equal(parent[k], child[k]) for k in parent)
    # Its activation sets line up with the parent's on the default token set.
    collect("tiny-ft", ["final_norm"], checkpoints="LAST", tokens=TINY_TOKENS,
            warehouse=warehouse_copy, progress=False)
    assert len(set(r[0] for r in query(warehouse_copy, "SELECT tokens_fingerprint FROM "
                                                       "activation_sets"))) == 1


# --- bad input: a clear error, and nothing written ----------------------------------------


@pytest.mark.parametrize("kwargs,error,message", [
    ({"stages": ["layer_7_post_mlp"]}, UnknownStageError, "valid stages: embed, layer_0_post_attn"),
    ({"run": "nope"}, NotFoundError, "unknown run 'nope'; runs in this warehouse: tiny"),
    ({"checkpoints": "0,999"}, NotFoundError, "no checkpoint at step 999; its checkpoints are"),
    ({"checkpoints": "0,x"}, FeaturestoreError, "'x' is not a step"),
    ({"splits": ["bigram", "nosuch"]}, FeaturestoreError, "unknown split nosuch; valid splits"),
])
def test_bad_collect_input_fails_clearly_and_writes_nothing(warehouse_copy, kwargs, error,
                                                            message):
    before = snapshot(warehouse_copy)
    arguments = {"run": TINY_RUN, "stages": ["final_norm"], "checkpoints": "all",
                 "tokens": 64, "warehouse": warehouse_copy, "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        collect(**arguments)
    assert snapshot(warehouse_copy) == before


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "corrupted"),
    (lambda p: p.write_bytes(b"\x80\x04 this is a pickle, not safetensors"), "not a safetensors"),
    (lambda p: p.unlink(), "missing"),
])
def test_corrupted_checkpoint_fails_clearly_and_writes_nothing(warehouse_copy, damage, message):
    (path,) = query(warehouse_copy, "SELECT path FROM checkpoints WHERE step = ?",
                    [TINY_STEPS])[0]
    weights = warehouse_copy / path / "model.safetensors"
    damage(weights)
    before = snapshot(warehouse_copy)
    with pytest.raises(CorruptCheckpointError, match=f"{weights}.*{message}"):
        collect(TINY_RUN, ["final_norm"], checkpoints="0,LAST", tokens=64,
                warehouse=warehouse_copy, progress=False)
    assert snapshot(warehouse_copy) == before


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "", "-x", "x" * 200])
def test_run_names_that_could_escape_the_warehouse_are_refused(tmp_path, name):
    with pytest.raises(FeaturestoreError, match="invalid run name"):
        train_model(name, steps=1, warehouse=tmp_path / "wh", progress=False)
    assert not (tmp_path / "wh").exists()


def test_finetune_needs_an_existing_parent(trained_warehouse):
    with pytest.raises(NotFoundError, match="unknown run 'ghost'"):
        finetune("x", "ghost", warehouse=trained_warehouse, progress=False)
    with pytest.raises(NotFoundError, match="no checkpoint at step 7777"):
        finetune("x", f"{TINY_RUN}@7777", warehouse=trained_warehouse, progress=False)


# --- register-activations ------------------------------------------------------------------


def _external_parquet(path, n=64, d=8, seed=0, bad=None):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n, d)).astype(np.float32)
    if bad is not None:
        values[5, 1] = bad
    table = pa.table({
        "activations": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), d),
        "sequence_id": np.repeat(np.arange(n // 8), 8), "position": np.tile(np.arange(8), n // 8),
        "token_id": rng.integers(0, 50, n), "split": ["ext"] * n,
    })
    pq.write_table(table, path)
    return values


def test_register_parquet_creates_an_external_run(tmp_path):
    values = _external_parquet(tmp_path / "acts.parquet")
    result = register_activations(str(tmp_path / "acts.parquet"), run="mymodel", step=100,
                                  stage="layer_6_post_mlp", warehouse=tmp_path / "wh")
    assert result.created_run and result.name == "mymodel@100:layer_6_post_mlp"
    root = tmp_path / "wh"
    assert query(root, "SELECT kind, d_model FROM runs") == [("external", 8)]
    assert query(root, "SELECT run, step, path FROM checkpoints") == [("mymodel", 100, None)]
    con = connect(root)
    row = get_activation_set_row(con, result.name)
    con.close()
    assert (row["source"], row["format"], row["n_tokens"]) == ("registered", "parquet", 64)
    np.testing.assert_array_equal(open_activation_set(Warehouse(root), row).all_rows(), values)
    # A second step of the same external run adds a checkpoint, not a run.
    _external_parquet(tmp_path / "acts2.parquet", seed=1)
    register_activations(str(tmp_path / "acts2.parquet"), run="mymodel", step=200,
                         stage="layer_6_post_mlp", warehouse=root)
    assert query(root, "SELECT step FROM checkpoints ORDER BY step") == [(100,), (200,)]


def test_register_a_collected_dataset_folder_by_name(trained_warehouse, tmp_path):
    (path,) = query(trained_warehouse, "SELECT path FROM activation_sets LIMIT 1")[0]
    result = register_activations(str(trained_warehouse / path), name="probe-set",
                                  warehouse=tmp_path / "wh")
    assert (result.format, result.n_tokens, result.d_model) == ("hf_dataset", TINY_TOKENS,
                                                                TINY_D_MODEL)
    assert query(tmp_path / "wh", "SELECT run FROM activation_sets") == [(None,)]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_register_refuses_non_finite_values(tmp_path, bad):
    _external_parquet(tmp_path / "bad.parquet", bad=bad)
    with pytest.raises(InvalidActivationsError, match="NaN/Inf.*first bad row 5"):
        register_activations(str(tmp_path / "bad.parquet"), name="bad", warehouse=tmp_path / "wh")
    assert not (tmp_path / "wh").exists()


def test_register_refuses_missing_columns_and_ambiguous_flags(tmp_path):
    table = pa.table({"activations": pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(8, np.float32)), 4), "token_id": [1, 2]})
    pq.write_table(table, tmp_path / "thin.parquet")
    with pytest.raises(InvalidActivationsError, match="lacks column.*sequence_id, position"):
        register_activations(str(tmp_path / "thin.parquet"), name="x", warehouse=tmp_path / "wh")
    with pytest.raises(FeaturestoreError, match="either --name or --run"):
        register_activations(str(tmp_path / "thin.parquet"), name="x", run="r", step=1, stage="s")
    with pytest.raises(FeaturestoreError, match="all three"):
        register_activations(str(tmp_path / "thin.parquet"), run="r")


def test_register_refuses_a_d_model_that_does_not_match_the_run(trained_warehouse, tmp_path):
    _external_parquet(tmp_path / "narrow.parquet", d=8)
    with pytest.raises(InvalidActivationsError, match="d_model mismatch.*32.*8"):
        register_activations(str(tmp_path / "narrow.parquet"), run=TINY_RUN, step=TINY_STEPS,
                             stage="final_norm", warehouse=trained_warehouse)


def test_register_against_a_model_run_needs_an_existing_step(trained_warehouse, tmp_path):
    _external_parquet(tmp_path / "a.parquet", d=TINY_D_MODEL)
    with pytest.raises(NotFoundError, match="no checkpoint at step 31337"):
        register_activations(str(tmp_path / "a.parquet"), run=TINY_RUN, step=31337,
                             stage="final_norm", warehouse=trained_warehouse)


def test_collected_sets_read_back_through_the_registry(trained_warehouse):
    con = connect(trained_warehouse)
    row = get_activation_set_row(con, f"{TINY_RUN}@0:layer_2_post_mlp")
    con.close()
    stored = open_activation_set(Warehouse(trained_warehouse), row)
    assert isinstance(stored, ActivationSet) and len(stored) == TINY_TOKENS
    batch = next(stored.batches(100, normalized=True))
    np.testing.assert_allclose(batch.numpy(), stored.rows(np.arange(100)) * row["norm_scale"],
                               rtol=1e-6)
