"""collect writes each batch straight into its activation set: many batches must give exactly the
set one forward pass gives, and a bad value in a late batch must still commit nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featurestore import run_inputs
from featurestore.checkpoints import load_checkpoint
from featurestore.errors import InvalidActivationsError
from featurestore.ingest.collect import collect
from featurestore.registry import get_activation_set_row, open_activation_set
from featurestore.run_inputs import token_set
from featurestore.tasks import TaskConfig
from featurestore.warehouse import Warehouse, connect

from .conftest import TINY_D_MODEL, TINY_RUN, TINY_STEPS, snapshot

SPLITS = ["bigram", "modular", "induction", "reverse"]
TOKENS = 1024


def _model_and_tokens(root):
    con = connect(root)
    (path,) = con.execute("SELECT path FROM checkpoints WHERE run = ? AND step = ?",
                          [TINY_RUN, TINY_STEPS]).fetchone()
    (task_config,) = con.execute("SELECT task_config FROM runs WHERE run = ?",
                                 [TINY_RUN]).fetchone()
    con.close()
    tokens, columns = token_set(json.loads(task_config), SPLITS, TOKENS, 0)
    return load_checkpoint(root / path), tokens, columns


def test_many_small_batches_give_the_models_own_activations(warehouse_copy, monkeypatch):
    # Three sequences a batch: several batches, a ragged last one.
    monkeypatch.setattr(run_inputs, "BATCH_TOKENS", 3 * TaskConfig().n_ctx)
    collect(TINY_RUN, ["layer_1_post_mlp", "layer_1_mlp_hidden"], checkpoints="LAST",
            tokens=TOKENS, warehouse=warehouse_copy, progress=False)
    model, tokens, columns = _model_and_tokens(warehouse_copy)
    assert tokens.shape[0] % 3 != 0
    with torch.no_grad():  # independently of nnsight: the blocks called by hand
        x = model.wte(tokens) + model.wpe(torch.arange(tokens.shape[1]))
        x = model.blocks[0](x)
        block = model.blocks[1]
        x = x + block.attn(block.ln_1(x))
        hidden = block.mlp.act(block.mlp.fc(block.ln_2(x)))
        x = x + block.mlp.proj(hidden)
    con = connect(warehouse_copy)
    for stage, expected in (("layer_1_post_mlp", x), ("layer_1_mlp_hidden", hidden)):
        row = get_activation_set_row(con, f"{TINY_RUN}@{TINY_STEPS}:{stage}")
        stored = open_activation_set(Warehouse(warehouse_copy), row)
        expected = expected.reshape(-1, expected.shape[-1]).numpy()
        np.testing.assert_allclose(stored.all_rows(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(stored.token_columns().token_id, columns.token_id)
        assert stored.d_model == (TINY_D_MODEL if stage.endswith("post_mlp") else 4 * TINY_D_MODEL)
    con.close()


def test_a_non_finite_value_in_a_late_batch_commits_nothing(warehouse_copy, monkeypatch):
    monkeypatch.setattr(run_inputs, "BATCH_TOKENS", 3 * TaskConfig().n_ctx)
    _, tokens, columns = _model_and_tokens(warehouse_copy)
    # The last split's sequences start with their own marker token; make its embedding NaN, so
    # only rows of the last batches go bad.
    marker = int(tokens[-1, 0])
    first_bad = int(np.flatnonzero(columns.token_id == marker)[0])
    assert first_bad > 3 * tokens.shape[1]
    con = connect(warehouse_copy)
    (path,) = con.execute("SELECT path FROM checkpoints WHERE run = ? AND step = ?",
                          [TINY_RUN, TINY_STEPS]).fetchone()
    con.close()
    from safetensors.torch import load_file, save_file

    weights_file = warehouse_copy / path / "model.safetensors"
    state = load_file(weights_file)
    state["wte.weight"][marker] = float("nan")
    save_file(state, weights_file)
    before = snapshot(warehouse_copy)
    with pytest.raises(InvalidActivationsError, match=f"first bad row {first_bad}\\b"):
        collect(TINY_RUN, ["final_norm"], checkpoints="LAST", tokens=TOKENS,
                warehouse=warehouse_copy, progress=False)
    assert snapshot(warehouse_copy) == before
