"""Hugging Face model folders as runs: register-model, then collect with --tokens-from."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from featurestore.errors import FeaturestoreError, UnknownStageError
from featurestore.ingest.collect import collect
from featurestore.ingest.register_model import register_model
from featurestore.registry import get_activation_set_row, open_activation_set
from featurestore.warehouse import Warehouse, connect

from .test_stages import _tiny_hf


@pytest.fixture
def hf_run(tmp_path):
    """Two saved GPT-2 'checkpoints' registered as steps 0 and 100 of run `gpt`, and tokens."""
    folders = []
    for step, seed in ((0, 0), (100, 1)):
        torch.manual_seed(seed)
        model = _tiny_hf("gpt2")
        model.save_pretrained(tmp_path / f"gpt-step{step}")
        folders.append(tmp_path / f"gpt-step{step}")
    wh = tmp_path / "wh"
    first = register_model("gpt", str(folders[0]), step=0, warehouse=wh)
    second = register_model("gpt", str(folders[1]), step=100, warehouse=wh)
    assert first.created_run and not second.created_run
    ids = np.random.default_rng(0).integers(0, 64, (12, 10))
    pq.write_table(pa.table({"input_ids": ids.tolist(), "split": ["web"] * 12}),
                   tmp_path / "tokens.parquet")
    return wh, folders, ids, tmp_path / "tokens.parquet"


def test_registered_model_is_a_run_with_checkpoints(hf_run):
    wh, folders, _, _ = hf_run
    con = connect(wh)
    assert con.execute("SELECT kind, model_family, d_model, n_layers FROM runs").fetchall() == [
        ("hf", "gpt2", 16, 3)]
    assert con.execute("SELECT step, path FROM checkpoints ORDER BY step").fetchall() == [
        (0, str(folders[0])), (100, str(folders[1]))]
    con.close()


def test_collect_from_a_token_file_matches_the_models_hidden_states(hf_run):
    import transformers

    wh, folders, ids, tokens = hf_run
    result = collect("gpt", ["layer_1_post_mlp", "final_norm"], tokens=100,
                     tokens_from=str(tokens), warehouse=wh, progress=False)
    assert result.n_tokens == 100 and result.steps == [0, 100]  # ceil(100 / 10) sequences
    con = connect(wh)
    row = get_activation_set_row(con, "gpt@100:final_norm")
    assert len({r for (r,) in con.execute(
        "SELECT tokens_fingerprint FROM activation_sets").fetchall()}) == 1
    con.close()
    stored = open_activation_set(Warehouse(wh), row)
    # Ten of the file's twelve sequences, drawn at random (seed 0).
    sequences, _ = stored.token_columns().sequences(row["name"], "this test")
    assert len(sequences) == 10 and {tuple(s) for s in sequences} <= {tuple(s) for s in ids}
    assert not np.array_equal(sequences, ids[:10])
    model = transformers.AutoModelForCausalLM.from_pretrained(folders[1])
    with torch.no_grad():
        hidden = model(torch.tensor(sequences), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(stored.all_rows(), hidden[-1].reshape(-1, 16).numpy(),
                               rtol=1e-5, atol=1e-5)
    assert set(stored.token_columns().split) == {"web"}


def test_hf_runs_need_tokens_of_their_own(hf_run, tmp_path):
    wh, _, _, _ = hf_run
    with pytest.raises(FeaturestoreError, match="pass --tokens-from"):
        collect("gpt", ["final_norm"], warehouse=wh, progress=False)
    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [4, 5]]}), tmp_path / "ragged.parquet")
    with pytest.raises(FeaturestoreError, match="same length"):
        collect("gpt", ["final_norm"], tokens_from=str(tmp_path / "ragged.parquet"),
                warehouse=wh, progress=False)
    pq.write_table(pa.table({"input_ids": [[1, 2, 999]]}), tmp_path / "big_ids.parquet")
    with pytest.raises(FeaturestoreError, match="vocabulary of 64"):
        collect("gpt", ["final_norm"], tokens=3, tokens_from=str(tmp_path / "big_ids.parquet"),
                warehouse=wh, progress=False)
    with pytest.raises(FeaturestoreError, match="holds at most 3 tokens .* at most 3"):
        collect("gpt", ["final_norm"], tokens=6, tokens_from=str(tmp_path / "big_ids.parquet"),
                warehouse=wh, progress=False)
    with pytest.raises(UnknownStageError, match="valid stages: embed, layer_0_post_attn"):
        collect("gpt", ["layer_5_post_mlp"], warehouse=wh, progress=False)


def test_register_model_refuses_pickles_and_mismatched_runs(hf_run, tmp_path):
    wh, _, _, _ = hf_run
    torch.manual_seed(0)
    model = _tiny_hf("gpt2")
    model.config.save_pretrained(tmp_path / "pickled")  # config, and weights only as a pickle
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(FeaturestoreError, match="no .safetensors weights"):
        register_model("other", str(tmp_path / "pickled"), warehouse=wh)
    _tiny_hf("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(FeaturestoreError, match="already exists as a hf run .gpt2"):
        register_model("gpt", str(tmp_path / "llama"), step=200, warehouse=wh)
