"""Any nn.Module as a run (register-model --factory), checkpoint series from a glob, and the loss
curves of registered checkpoints (--eval-tokens-from, evaluate-checkpoints).

The custom model (tests/custom_lm.py) has module names no built-in family uses. Everything the
store computes on it is checked against plain torch: forward hooks on the same modules, the
cross-entropy of its logits, and a patch run by hand."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file

from featurestore.errors import FeaturestoreError
from featurestore.ingest.register_model import register_model
from featurestore.registry import get_activation_set_row, open_activation_set
from featurestore.warehouse import Warehouse, connect

from . import custom_lm
from .conftest import query
from .test_cli import run as cli
from .test_stages import _tiny_hf

STEPS = (0, 5, 10, 15)
STAGES = ("layer_0_mlp_hidden", "layer_1_post_mlp")
BASIS = "lm-l1"


def progressions(n: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """Arithmetic sequences mod vocab: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    start, stride = rng.integers(0, vocab, (n, 1)), rng.integers(1, 4, (n, 1))
    return (start + stride * np.arange(length)) % vocab


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Weights of TinyLM at steps 0, 5, 10 and 15 of a short training, its config and adapter
    files, and a token file with two splits."""
    root = tmp_path_factory.mktemp("custom")
    torch.manual_seed(0)
    model = custom_lm.build(custom_lm.CONFIG)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.from_numpy(progressions(64, 16, 48, seed=1))
    (root / "ckpts").mkdir()
    for step in range(STEPS[-1] + 1):
        if step in STEPS:
            save_file(model.state_dict(), root / "ckpts" / f"step_{step}.safetensors")
        logits = model(data)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), data[:, 1:].flatten())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    (root / "config.json").write_text(json.dumps(custom_lm.CONFIG))
    (root / "adapter.json").write_text(json.dumps(custom_lm.ADAPTER))
    ids = progressions(48, 16, 48, seed=2)
    pq.write_table(pa.table({"input_ids": ids.tolist(), "split": ["up", "down"] * 24}),
                   root / "tokens.parquet")
    return root


def custom_args(files, *extra) -> list[str]:
    return ["register-model", "--run", "lm", "--factory", "tests.custom_lm:build",
            "--config", str(files / "config.json"), "--adapter", str(files / "adapter.json"),
            "--weights", str(files / "ckpts" / "step_*.safetensors"), *extra]


def trained(files, step: int) -> custom_lm.TinyLM:
    """The checkpoint built and loaded by plain torch, not by featurestore."""
    model = custom_lm.build(custom_lm.CONFIG)
    model.load_state_dict(load_file(files / "ckpts" / f"step_{step}.safetensors"))
    return model.eval()


def reference_metrics(model, ids: np.ndarray, splits: np.ndarray) -> dict[str, tuple]:
    """split -> (mean next-token cross-entropy, accuracy), and 'heldout' for all sequences."""
    with torch.no_grad():
        logits = model(torch.from_numpy(ids))[:, :-1].double()
    targets = torch.from_numpy(ids)[:, 1:]
    out = {}
    for name in ["heldout", *sorted(set(splits))]:
        rows = np.ones(len(ids), bool) if name == "heldout" else splits == name
        chosen, wanted = logits[rows], targets[rows]
        out[name] = (F.cross_entropy(chosen.flatten(0, 1), wanted.flatten()).item(),
                     (chosen.argmax(-1) == wanted).double().mean().item())
    return out


@pytest.fixture(scope="module")
def analysed(files, tmp_path_factory):
    """The custom run registered (with evaluation), collected at two stages, fitted and swept,
    all through the command line."""
    wh = tmp_path_factory.mktemp("custom-wh") / "warehouse"
    registered = cli([*custom_args(files, "--eval-tokens-from", str(files / "tokens.parquet")),
                      "--json"], wh)
    assert registered.exit_code == 0, registered.output
    collected = cli(["collect", "--run", "lm", "--stage", STAGES[0], "--stage", STAGES[1],
                     "--tokens-from", str(files / "tokens.parquet"), "--tokens", "512",
                     "--splits", "up,down",
                     "--json", "--quiet"], wh)
    assert collected.exit_code == 0, collected.output
    fitted = cli(["shared-feature-fit", "--run", "lm", "--stage", STAGES[1], "--name", BASIS,
                  "--dict-size", "64", "--k", "4", "--steps", "150", "--batch-size", "256",
                  "--min-explained-variance", "-1", "--max-active-fraction", "1",
                  "--max-dead-fraction", "1", "--json", "--quiet"], wh)
    assert fitted.exit_code == 0, fitted.output
    swept = cli(["feature-trajectory-sweep", "--basis", BASIS, "--json", "--quiet"], wh)
    assert swept.exit_code == 0, swept.output
    return wh, json.loads(registered.stdout)


def test_register_records_a_custom_run_with_its_series_and_losses(files, analysed):
    wh, result = analysed
    assert [c["step"] for c in result["checkpoints"]] == list(STEPS)
    (kind, family, d_model, n_layers, config), = query(
        wh, "SELECT kind, model_family, d_model, n_layers, model_config FROM runs")
    assert (kind, family, d_model, n_layers) == ("custom", "custom", 32, 2)
    config = json.loads(config)
    assert config["factory"] == "tests.custom_lm:build"
    assert config["config"] == custom_lm.CONFIG
    assert config["adapter"]["mlp_hidden"] == "layers.{i}.ffn.hidden:output"
    paths = query(wh, "SELECT step, path FROM checkpoints ORDER BY step")
    assert paths == [(s, str(files / "ckpts" / f"step_{s}.safetensors")) for s in STEPS]

    table = pq.read_table(files / "tokens.parquet")
    ids = np.array(table.column("input_ids").to_pylist())
    splits = np.array(table.column("split").to_pylist())
    losses = []
    for step in STEPS:
        expected = reference_metrics(trained(files, step), ids, splits)
        (loss, accuracy), = query(wh, "SELECT heldout_loss, heldout_accuracy FROM checkpoints "
                                      "WHERE step = ?", [step])
        assert (loss, accuracy) == pytest.approx(expected["heldout"], rel=1e-6)
        stored = dict(((s, (lo, a)) for s, lo, a in query(
            wh, "SELECT split, loss, accuracy FROM checkpoint_metrics WHERE step = ?", [step])))
        assert set(stored) == {"heldout", "up", "down"}
        for split, value in stored.items():
            assert value == pytest.approx(expected[split], rel=1e-6)
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.5  # the steps differ: the model learned

    # Registering the same series again changes nothing.
    before = query(wh, "SELECT * FROM checkpoints ORDER BY step")
    again = cli([*custom_args(files), "--json"], wh)
    assert again.exit_code == 0 and not json.loads(again.stdout)["created_run"]
    assert query(wh, "SELECT * FROM checkpoints ORDER BY step") == before


def test_registering_changed_weights_again_drops_what_was_read_from_the_old(files, tmp_path):
    """A checkpoint file overwritten with other weights and registered again: its activation sets
    and the basis fitted on them describe weights that are gone, and go in the same commit."""
    ckpts = tmp_path / "ckpts"
    shutil.copytree(files / "ckpts", ckpts)
    wh = tmp_path / "warehouse"
    register = ["register-model", "--run", "lm", "--factory", "tests.custom_lm:build",
                "--config", str(files / "config.json"), "--adapter", str(files / "adapter.json"),
                "--weights", str(ckpts / "step_*.safetensors")]
    for args in (register,
                 ["collect", "--run", "lm", "--stage", STAGES[1], "--tokens-from",
                  str(files / "tokens.parquet"), "--tokens", "256", "--splits", "up,down",
                  "--quiet"],
                 ["shared-feature-fit", "--run", "lm", "--stage", STAGES[1], "--name", BASIS,
                  "--dict-size", "32", "--k", "4", "--steps", "20", "--batch-size", "64",
                  "--min-explained-variance", "-10", "--max-active-fraction", "1",
                  "--max-dead-fraction", "1", "--quiet"]):
        done = cli(args, wh)
        assert done.exit_code == 0, done.output
    (registered,) = query(wh, "SELECT created_at FROM checkpoints WHERE step = 5")[0]

    unchanged = cli(register, wh)  # the same files again: nothing changes
    assert unchanged.exit_code == 0 and query(wh, "SELECT count(*) FROM bases") == [(1,)]
    shutil.copyfile(ckpts / "step_10.safetensors", ckpts / "step_5.safetensors")
    again = cli(register, wh)
    assert again.exit_code == 0, again.output
    assert query(wh, "SELECT step FROM activation_sets ORDER BY step") == [(0,), (10,), (15,)]
    for table in ("bases", "features", "trajectories", "training_metrics"):
        assert query(wh, f"SELECT count(*) FROM {table}") == [(0,)], table
    (now,) = query(wh, "SELECT created_at FROM checkpoints WHERE step = 5")[0]
    assert now > registered


def test_collected_activations_equal_forward_hooks(files, analysed):
    wh, _ = analysed
    con = connect(wh)
    try:
        rows = {stage: get_activation_set_row(con, f"lm@10:{stage}") for stage in STAGES}
    finally:
        con.close()
    sets = {stage: open_activation_set(Warehouse(wh), row) for stage, row in rows.items()}
    ids, _ = sets[STAGES[0]].token_columns().sequences("lm@10", "test")
    model = trained(files, 10)
    seen = {}
    hooks = [model.layers[0].ffn.hidden.register_forward_hook(
                 lambda m, i, o: seen.__setitem__(STAGES[0], o)),
             model.layers[1].register_forward_hook(
                 lambda m, i, o: seen.__setitem__(STAGES[1], o))]
    with torch.no_grad():
        model(torch.from_numpy(ids))
    for hook in hooks:
        hook.remove()
    for stage in STAGES:
        np.testing.assert_allclose(sets[stage].all_rows(),
                                   seen[stage].reshape(-1, seen[stage].shape[-1]).numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_patching_equals_a_torch_computation(files, analysed):
    wh, _ = analysed
    last = STEPS[-1]
    (path, sources), = query(wh, "SELECT path, sources FROM bases WHERE name = ?", [BASIS])
    scale = next(s["norm_scale"] for s in sources if s["step"] == last)
    w = {k: v.astype(np.float64)
         for k, v in load_numpy(Warehouse(wh).path(path) / "crosscoder.safetensors").items()}
    decoder = np.concatenate([w["W_dec_shared"][:, None, :], w["W_dec"]])[:, 0]

    # feature-patch runs the split's first sequences of the target's activation set: 64 tokens.
    con = connect(wh)
    try:
        acts = open_activation_set(Warehouse(wh),
                                   get_activation_set_row(con, f"lm@{last}:{STAGES[1]}"))
    finally:
        con.close()
    set_ids, split_of = acts.token_columns().sequences("lm", "test")
    tokens = torch.from_numpy(set_ids[split_of == "up"][:4].copy())
    model = trained(files, last)
    with torch.no_grad():
        x = model.layers[1](model.layers[0](model.embedding(tokens) + model.positions[:16]))
    x = x.double().numpy()
    pre = (x * scale) @ w["W_enc"][0] + w["b_enc"]
    relu = np.maximum(pre, 0)
    f = relu * (relu * np.linalg.norm(decoder, axis=1) > w["threshold"])
    feature = int(np.argmax(f.sum(axis=(0, 1))))
    patched_x = x - f[..., feature, None] * decoder[feature] / scale

    def loss(site: np.ndarray) -> float:
        with torch.no_grad():
            logits = model.readout(model.out_norm(torch.from_numpy(site).float()))
        return F.cross_entropy(logits[:, :-1].double().flatten(0, 1),
                               tokens[:, 1:].flatten()).item()

    result = cli(["feature-patch", "--basis", BASIS, "--source", str(last), "--target",
                  str(last), "--features", str(feature), "--mode", "zero", "--tokens", "64",
                  "--splits", "up", "--json", "--quiet"], wh)
    assert result.exit_code == 0, result.output
    (clean, patched), = query(wh, "SELECT clean, patched FROM patches WHERE basis = ? AND "
                                  "metric = 'loss' AND split = 'up'", [BASIS])
    assert clean == pytest.approx(loss(x), rel=1e-4)
    assert patched == pytest.approx(loss(patched_x), rel=1e-3, abs=1e-4)
    assert abs(patched - clean) > 1e-4  # the feature matters, so the check above means something


def test_lineage_runs_on_the_custom_model(analysed):
    wh, _ = analysed
    result = cli(["feature-lineage", "--basis", BASIS, "--steps", "LAST", "--features", "top:3",
                  "--tokens", "64", "--json", "--quiet"], wh)
    assert result.exit_code == 0, result.output
    sources = {s for (s,) in query(wh, "SELECT DISTINCT src_type FROM lineage_edges")}
    assert "attention_head" in sources


def test_a_factory_file_and_stage_overrides(files, tmp_path):
    """--factory path/to/file.py:function is stored with its absolute path, and --stage moves a
    site: final_norm read at the readout's input is the same tensor as out_norm's output."""
    import shutil

    shutil.copy(custom_lm.__file__, tmp_path / "model.py")
    wh = tmp_path / "wh"
    result = register_model("file", factory=str(tmp_path / "model.py") + ":build",
                            config=str(files / "config.json"),
                            weights=str(files / "ckpts" / "step_5.safetensors"),
                            adapter=str(files / "adapter.json"), step=5,
                            stage_overrides=("final_norm=readout:input",), warehouse=wh)
    assert result.checkpoints[0]["step"] == 5
    (config,), = query(wh, "SELECT model_config FROM runs")
    config = json.loads(config)
    assert config["factory"] == f"{tmp_path / 'model.py'}:build"
    assert config["adapter"]["final_norm"] == "readout:input"
    from featurestore.registry import get_checkpoints, get_run
    from featurestore.run_inputs import open_reader

    con = connect(wh)
    reader = open_reader(get_run(con, "file"), get_checkpoints(Warehouse(wh), con, "file")[0])
    con.close()
    tokens = torch.from_numpy(progressions(2, 8, 48, seed=3))
    model = trained(files, 5)
    with torch.no_grad():
        expected = model.out_norm(model.layers[1](model.layers[0](
            model.embedding(tokens) + model.positions[:8])))
    torch.testing.assert_close(reader.read(tokens, ["final_norm"])["final_norm"], expected)


def test_bad_custom_models_are_refused_before_anything_is_written(files, tmp_path):
    wh = tmp_path / "wh"

    def refused(match: str, **changes) -> None:
        options = dict(factory="tests.custom_lm:build", config=str(files / "config.json"),
                       weights=str(files / "ckpts" / "step_*.safetensors"),
                       adapter=str(files / "adapter.json")) | changes
        with pytest.raises(FeaturestoreError, match=match):
            register_model("bad", warehouse=wh, **options)
        assert not wh.exists()

    adapter = dict(custom_lm.ADAPTER, mlp_hidden="layers.{i}.ffn.hiden:output")
    (tmp_path / "typo.json").write_text(json.dumps(adapter))
    refused(r"mlp_hidden names 'layers.0.ffn.hiden'.*close matches: layers.0.ffn.hidden",
            adapter=str(tmp_path / "typo.json"))
    (tmp_path / "layers.json").write_text(json.dumps(dict(custom_lm.ADAPTER, n_layers=1)))
    refused("n_layers is 1 but the model has 'layers.1'", adapter=str(tmp_path / "layers.json"))
    (tmp_path / "port.json").write_text(json.dumps(dict(custom_lm.ADAPTER, embed="layers.0:in")))
    refused("not a site", adapter=str(tmp_path / "port.json"))
    refused("cannot import 'tests.no_such_module'", factory="tests.no_such_module:build")
    refused("has no function 'nope'", factory="tests.custom_lm:nope")
    (tmp_path / "wide.json").write_text(json.dumps(dict(custom_lm.CONFIG, width=16)))
    refused("does not fit the module", config=str(tmp_path / "wide.json"))
    state = load_file(files / "ckpts" / "step_0.safetensors")
    save_file(state | {"extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    refused("unexpected extra.weight", weights=str(tmp_path / "extra.safetensors"))
    del state["readout.weight"]
    save_file(state, tmp_path / "missing.safetensors")
    refused("missing readout.weight", weights=str(tmp_path / "missing.safetensors"))
    torch.save(state, tmp_path / "pickle.safetensors")  # a pickle under a safetensors name
    refused("not a safetensors file", weights=str(tmp_path / "pickle.safetensors"))
    refused("matches 4 files.*--step is for one", step=3)


@pytest.mark.parametrize("model_type", ["mamba_like_unknown", "bert"])
def test_unknown_model_types_point_at_the_custom_path(tmp_path, model_type):
    """Types transformers does not know and types featurestore has no adapter for alike."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    result = cli(["register-model", "--run", "x", "--path", str(folder)], tmp_path / "wh")
    assert result.exit_code == 1
    assert f"model_type '{model_type}' has no stage adapter" in result.output
    assert "--factory" in result.output and "--adapter" in result.output
    assert "Traceback" not in result.output


@pytest.fixture
def gpt_series(tmp_path):
    """Three tiny GPT-2 folders named step_0, step_50, step_100, and a token file."""
    for step, seed in ((0, 0), (50, 1), (100, 2)):
        torch.manual_seed(seed)
        model = _tiny_hf("gpt2")
        with torch.no_grad():  # _tiny_hf seeds itself: make the checkpoints differ
            for parameter in model.parameters():
                parameter.add_(0.05 * seed * torch.randn_like(parameter))
        model.save_pretrained(tmp_path / "ckpts" / f"step_{step}")
    ids = np.random.default_rng(0).integers(0, 64, (12, 10))
    pq.write_table(pa.table({"input_ids": ids.tolist()}), tmp_path / "tokens.parquet")
    return tmp_path, ids


def test_a_glob_of_hf_folders_registers_a_series_with_losses(gpt_series):
    import transformers

    root, ids = gpt_series
    wh = root / "wh"
    args = ["register-model", "--run", "gpt", "--path", str(root / "ckpts" / "step_*"),
            "--eval-tokens-from", str(root / "tokens.parquet"), "--json"]
    result = cli(args, wh)
    assert result.exit_code == 0, result.output
    assert [c["step"] for c in json.loads(result.stdout)["checkpoints"]] == [0, 50, 100]
    for step in (0, 50, 100):
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "ckpts" / f"step_{step}")
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)).logits[:, :-1].double()
        expected = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(ids)[:, 1:].flatten())
        (path, loss), = query(wh, "SELECT path, heldout_loss FROM checkpoints WHERE step = ?",
                              [step])
        assert path == str(root / "ckpts" / f"step_{step}")
        assert loss == pytest.approx(expected.item(), rel=1e-6)
    # Splits: 'heldout' for all sequences, and the file's one split.
    assert {s for (s,) in query(wh, "SELECT DISTINCT split FROM checkpoint_metrics")} == {
        "heldout", "all"}
    before = query(wh, "SELECT * FROM checkpoints ORDER BY step")
    assert cli(args, wh).exit_code == 0
    assert query(wh, "SELECT * FROM checkpoints ORDER BY step") == before


def test_evaluate_checkpoints_fills_losses_of_a_registered_run(gpt_series):
    root, _ = gpt_series
    wh = root / "wh"
    assert cli(["register-model", "--run", "gpt", "--path", str(root / "ckpts" / "step_*"),
                "--steps", "1,2,3"], wh).exit_code == 0  # name order: step_0, step_50, step_100
    assert query(wh, "SELECT step, heldout_loss FROM checkpoints ORDER BY step") == [
        (1, None), (2, None), (3, None)]
    assert query(wh, "SELECT path FROM checkpoints WHERE step = 3") == [
        (str(root / "ckpts" / "step_100"),)]
    result = cli(["evaluate-checkpoints", "--run", "gpt", "--tokens-from",
                  str(root / "tokens.parquet"), "--checkpoints", "1,3", "--json"], wh)
    assert result.exit_code == 0, result.output
    stored = dict(query(wh, "SELECT step, heldout_loss FROM checkpoints"))
    assert stored[2] is None and stored[1] != stored[3]
    assert [c["heldout_loss"] for c in json.loads(result.stdout)["checkpoints"]] == [
        stored[1], stored[3]]


def test_series_steps_must_be_unambiguous(gpt_series):
    root, _ = gpt_series
    wh = root / "wh"

    def refused(match, path, **options):
        with pytest.raises(FeaturestoreError, match=match):
            register_model("gpt", str(path), warehouse=wh, **options)
        assert not wh.exists()

    glob = root / "ckpts" / "step_*"
    refused("--steps gives 2 steps but --path .* matches 3 folders", glob, steps=[0, 1])
    refused("steps repeat", glob, steps=[0, 1, 1])
    _tiny_hf("gpt2").save_pretrained(root / "ckpts" / "final")
    refused("final has no trailing number", root / "ckpts" / "*")
    _tiny_hf("gpt2").save_pretrained(root / "ckpts" / "epoch_3")
    refused("differ beyond their trailing number", root / "ckpts" / "*_*")
    _tiny_hf("gpt2").save_pretrained(root / "ckpts" / "step_050")
    refused("step 50 appears more than once", glob)
    refused("no such folder matches the glob", root / "nothing_*")
