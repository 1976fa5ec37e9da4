"""feature-lineage on a demo transformer with hand-set weights, in a real warehouse.

Head L0H1 (L1H0 at step 0) writes direction U and neuron L1N5 writes direction V; a pooled basis
at layer_1_post_mlp has features 0 and 1 with encoder rows U and V, so lineage must name that
head and that neuron first. Every weight is then checked against a computation made without
nnsight (torch forward hooks and autograd, per-head loops, numpy), and bad input must raise
before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from featurestore.checkpoints import load_checkpoint, save_checkpoint
from featurestore.crosscoder import CrossCoder, CrossCoderConfig
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.ingest.collect import collect
from featurestore.ingest.feature_lineage import feature_lineage
from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep
from featurestore.model import ModelConfig, Transformer
from featurestore.run_inputs import token_set
from featurestore.schema import package_version
from featurestore.tasks import TaskConfig
from featurestore.warehouse import Warehouse, connect
from featurestore.writer import utc_now
from tests.conftest import snapshot

RUN = "hand"
STEPS = [0, 10, 20]
D_MODEL, N_HEADS, D_HEAD, D_MLP, N_FEATURES = 16, 2, 8, 32, 8
TOKENS = 1024  # 64 sequences of 16, the tokens collected, so activation sets match lineage's
# Orthonormal directions: U and V, then the random features' directions.
DIRECTIONS = np.linalg.qr(np.random.default_rng(0).normal(size=(D_MODEL, D_MODEL)))[0]
U, V = DIRECTIONS[:, 0], DIRECTIONS[:, 1]
L1_FEATURES = DIRECTIONS[:, :N_FEATURES]  # lin-l1's encoder columns and decoder rows
FINAL_FEATURES = np.linalg.qr(np.random.default_rng(1).normal(size=(D_MODEL, D_MODEL)))[0][
    :, :N_FEATURES]  # lin-final's
U_HEAD = {0: (1, 0), 10: (0, 1), 20: (0, 1)}  # step -> (block, head) writing U
V_NEURON = (1, 5)


def hand_set_model(step: int) -> Transformer:
    """Every block's writes shrunk tenfold, then one head writing U and one neuron writing V."""
    task = TaskConfig()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=task.vocab_size, n_ctx=task.n_ctx,
                                    d_model=D_MODEL, n_layers=2, n_heads=N_HEADS, d_mlp=D_MLP))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.mul_(0.1)
            block.mlp.proj.weight.mul_(0.1)
        layer, head = U_HEAD[step]
        attn = model.blocks[layer].attn
        values = slice(2 * D_MODEL + head * D_HEAD, 2 * D_MODEL + (head + 1) * D_HEAD)
        a = torch.full((D_HEAD,), D_HEAD ** -0.5)
        attn.qkv.weight[values] *= 10  # the head's output varies with the tokens...
        attn.qkv.bias[values] = a  # ...around a, so U's feature fires at most tokens
        attn.proj.weight[:, head * D_HEAD:(head + 1) * D_HEAD] = 4 * torch.outer(
            torch.from_numpy(U).float(), a)
        layer, neuron = V_NEURON
        mlp = model.blocks[layer].mlp
        mlp.fc.weight[neuron] *= 20
        mlp.fc.bias[neuron] = 1.0
        mlp.proj.weight[:, neuron] = 3 * torch.from_numpy(V).float()
    return model.eval()


def hand_set_basis(directions: np.ndarray) -> CrossCoder:
    """A pooled BatchTopK basis whose encoder and decoder rows are `directions` [d, h]; with
    threshold 0 a feature fires wherever its pre-activation is positive."""
    config = CrossCoderConfig(n_sources=1, d_model=D_MODEL, d_hidden=N_FEATURES,
                              arch="batchtopk", k=2, source_labels=("pooled",))
    model = CrossCoder(config)
    with torch.no_grad():
        weights = torch.from_numpy(directions).float()
        model.W_enc[0] = weights
        model.b_enc.zero_()
        model.W_dec[:, 0] = weights.T
        model.b_dec.zero_()
        model.threshold.fill_(0.0)
    return model


def register_basis(root: Path, name: str, stage: str, model: CrossCoder, kind: str = "pooled",
                   sets_stage: str | None = None) -> None:
    con = connect(root)
    try:
        scales = dict(con.execute(
            "SELECT step, norm_scale FROM activation_sets WHERE run = ? AND stage = ?",
            [RUN, sets_stage or stage]).fetchall())
    finally:
        con.close()
    wh = Warehouse(root)
    with wh.writer(f"test basis {name}") as writer:
        model.save(writer.stage_dir(f"bases/{name}"))
        writer.put("bases", [{
            "name": name, "kind": kind, "arch": "batchtopk", "n_sources": 1, "d_model": D_MODEL,
            "d_hidden": N_FEATURES, "k": 2,
            "sources": [{"label": f"step_{s}", "activation_set": f"{RUN}@{s}:{sets_stage or stage}",
                         "run": RUN, "step": s, "stage": stage, "norm_scale": scales[s]}
                        for s in STEPS],
            "config": json.dumps(model.config.to_dict()), "trainer_config": "{}",
            "path": writer.versioned(f"bases/{name}"), "steps": 0, "tokens": 0, "run": RUN,
            "stage": stage,
            "created_at": utc_now()}])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Run `hand` (three checkpoints), both stages collected, bases lin-l1 (U, V and six more
    features) and lin-final (final_norm), and lin-l1's trajectories."""
    root = tmp_path_factory.mktemp("lineage") / "warehouse"
    task = TaskConfig()
    wh = Warehouse(root)
    with wh.writer("test run") as writer:
        run_dir = writer.stage_dir(f"runs/{RUN}")
        run_path = writer.versioned(f"runs/{RUN}")
        rows = []
        for step in STEPS:
            directory = run_dir / "checkpoints" / f"step_{step:09d}"
            directory.mkdir(parents=True)
            save_checkpoint(hand_set_model(step), directory,
                            {"run": RUN, "step": step, "task": task.to_dict()})
            rows.append({"run": RUN, "step": step,
                         "path": f"{run_path}/checkpoints/step_{step:09d}",
                         "created_at": utc_now()})
        model_config = hand_set_model(0).config
        writer.put("runs", [{
            "run": RUN, "kind": "pretrain", "model_family": "demo", "d_model": D_MODEL,
            "n_layers": 2, "steps": STEPS[-1], "model_config": json.dumps(model_config.to_dict()),
            "task_config": json.dumps(task.to_dict()), "featurestore_version": package_version(),
            "created_at": utc_now()}])
        writer.put("checkpoints", rows)
    collect(RUN, ["layer_1_post_mlp", "final_norm"], tokens=TOKENS, warehouse=root,
            progress=False)
    register_basis(root, "lin-l1", "layer_1_post_mlp", hand_set_basis(L1_FEATURES))
    register_basis(root, "lin-final", "final_norm", hand_set_basis(FINAL_FEATURES))
    feature_trajectory_sweep("lin-l1", warehouse=root, progress=False)
    # Two bases lineage must refuse: a stage the model lacks, and the crosscoder kind.
    register_basis(root, "lin-deep", "layer_7_post_mlp", hand_set_basis(L1_FEATURES),
                   sets_stage="layer_1_post_mlp")
    register_basis(root, "lin-cc", "layer_1_post_mlp", hand_set_basis(L1_FEATURES),
                   kind="crosscoder")
    return root


@pytest.fixture
def root(built, tmp_path) -> Path:
    copy = tmp_path / "warehouse"
    shutil.copytree(built, copy)
    return copy


def query(root: Path, sql: str, params=(), records: bool = False) -> list:
    con = connect(root)
    try:
        cursor = con.execute(sql, list(params))
        rows = cursor.fetchall()
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in rows] if records else rows
    finally:
        con.close()


def edges(root: Path, where: str = "true", params=()) -> list[dict]:
    return query(root, f"SELECT * FROM lineage_edges WHERE {where} ORDER BY ALL", params,
                 records=True)


def test_the_writing_head_and_neuron_rank_first(root):
    result = feature_lineage("lin-l1", features="0,1", top_k=3, warehouse=root, progress=False)
    assert [s.step for s in result.steps] == STEPS and result.n_tokens == 2048
    for step in STEPS:
        layer, head = U_HEAD[step]
        for method in ("dfa", "grad_x_act"):
            first = {(e["dst_id"], e["src_type"]): e["src_id"] for e in edges(
                root, "step = ? AND method = ? AND rank = 1", [step, method])}
            assert first["0", "attention_head"] == f"L{layer}H{head}", (step, method)
            assert first["1", "mlp_neuron"] == f"L{V_NEURON[0]}N{V_NEURON[1]}", (step, method)
        # By a wide margin: the other heads' and neurons' writes are a tenth of the init's.
        for feature, kind in (("0", "attention_head"), ("1", "mlp_neuron")):
            ranked = sorted(edges(root, "step = ? AND method = 'dfa' AND dst_id = ? AND "
                                  "src_type = ?", [step, feature, kind]), key=lambda e: e["rank"])
            assert abs(ranked[0]["weight"]) > 100 * abs(ranked[1]["weight"])
    groups = {}
    for e in edges(root):
        groups.setdefault((e["step"], e["dst_id"], e["method"], e["src_type"]), []).append(e)
    assert {len(g) for g in groups.values()} <= {1, 3}  # top_k; the embedding is one source


def weights_by_edge(rows: list[dict]) -> dict[tuple, float]:
    return {(e["method"], e["src_type"], e["src_id"], e["dst_id"]): e["weight"] for e in rows}


def reference_attributions(root: Path, basis: str, stage: str, directions: np.ndarray,
                           step: int) -> dict[tuple, float]:
    """dfa and grad_x_act of every source and feature, without nnsight: torch forward hooks,
    autograd, and each head's and neuron's write into the residual stream formed explicitly."""
    wh = Warehouse(root)
    con = wh.connect()
    try:
        (sources,), = con.execute("SELECT sources FROM bases WHERE name = ?", [basis]).fetchall()
        (path,), = con.execute("SELECT path FROM checkpoints WHERE run = ? AND step = ?",
                               [RUN, step]).fetchall()
    finally:
        con.close()
    scale = next(s["norm_scale"] for s in sources if s["step"] == step)
    model = load_checkpoint(wh.path(path))
    tokens, _ = token_set(TaskConfig().to_dict(), None, TOKENS, 0)
    captured = {}

    def keep(name, port):
        def hook(module, inputs, output):
            captured[name] = inputs[0] if port == "input" else output
        return hook

    modules = {"embed": (model.blocks[0], "input"), "layer_1_post_mlp": (model.blocks[1], "output"),
               "final_residual": (model.ln_f, "input"), "final_norm": (model.ln_f, "output")}
    for i in range(2):
        modules[f"heads_{i}"] = (model.blocks[i].attn.proj, "input")
        modules[f"neurons_{i}"] = (model.blocks[i].mlp.act, "output")
    for name, (module, port) in modules.items():
        module.register_forward_hook(keep(name, port))
    model(tokens)

    def flat(name):
        return captured[name].detach().double().reshape(-1, captured[name].shape[-1])

    def to_stage(c):  # a residual-stream write as the stage sees it
        if stage != "final_norm":
            return c
        residual = flat("final_residual")
        std = (residual.var(dim=1, unbiased=False) + model.ln_f.eps).sqrt()
        gamma = model.ln_f.weight.detach().double()
        return gamma * (c - c.mean(dim=1, keepdim=True)) / std[:, None]

    x = captured[stage].reshape(-1, D_MODEL)
    expected = {}
    for f in range(N_FEATURES):
        direction = torch.from_numpy(directions[:, f])
        pre = x * scale @ direction.float()
        fire = pre > 0
        n = int(fire.sum())
        if n == 0:
            continue
        grads = torch.autograd.grad(pre[fire].sum(), [captured[f"heads_{i}"] for i in range(2)]
                                    + [captured[f"neurons_{i}"] for i in range(2)],
                                    retain_graph=True)

        def add(method, kind, name, value, f=f):
            expected[method, kind, name, str(f)] = value.item()

        def dfa(write, fire=fire, direction=direction):
            return (scale * to_stage(write) @ direction)[fire].mean()

        add("dfa", "embedding", "embed", dfa(flat("embed")))
        for i in range(2):
            heads, neurons = flat(f"heads_{i}"), flat(f"neurons_{i}")
            proj = model.blocks[i].attn.proj.weight.detach().double()
            out = model.blocks[i].mlp.proj.weight.detach().double()
            for h in range(N_HEADS):
                cols = slice(h * D_HEAD, (h + 1) * D_HEAD)
                add("dfa", "attention_head", f"L{i}H{h}", dfa(heads[:, cols] @ proj[:, cols].T))
                add("grad_x_act", "attention_head", f"L{i}H{h}",
                    (grads[i][..., cols] * captured[f"heads_{i}"][..., cols]).sum() / n)
            for k in range(D_MLP):
                add("dfa", "mlp_neuron", f"L{i}N{k}", dfa(torch.outer(neurons[:, k], out[:, k])))
                add("grad_x_act", "mlp_neuron", f"L{i}N{k}",
                    (grads[2 + i][..., k] * captured[f"neurons_{i}"][..., k]).sum() / n)
    return expected


@pytest.mark.parametrize("basis, stage", [("lin-l1", "layer_1_post_mlp"),
                                          ("lin-final", "final_norm")])
def test_weights_match_a_computation_without_nnsight(root, basis, stage):
    feature_lineage(basis, steps="20", features=",".join(map(str, range(N_FEATURES))),
                    top_k=1000, tokens=TOKENS, warehouse=root, progress=False)
    rows = edges(root, "method IN ('dfa', 'grad_x_act')")
    actual = weights_by_edge(rows)
    directions = L1_FEATURES if basis == "lin-l1" else FINAL_FEATURES
    expected = reference_attributions(root, basis, stage, directions, 20)
    assert set(actual) == set(expected)
    keys = sorted(expected)
    dfa = [k for k in keys if k[0] == "dfa"]
    # The activations are float32 from two forward passes, one with the weights frozen, which
    # may differ in the last bits; weights reach about 1.
    np.testing.assert_allclose([actual[k] for k in dfa], [expected[k] for k in dfa],
                               rtol=1e-5, atol=1e-6)
    gxa = [k for k in keys if k[0] == "grad_x_act"]
    np.testing.assert_allclose([actual[k] for k in gxa], [expected[k] for k in gxa],
                               rtol=1e-4, atol=1e-6)
    # dfa is a complete decomposition: the output biases are zero, so a feature's weights
    # over all sources add up to its mean pre-activation where it fires, here read off the
    # activation set collect stored for the same tokens.
    x, _ = stored_activations(root, stage, directions, 20)
    pre = x @ directions
    for f in range(N_FEATURES):
        total = sum(weight for (method, _, _, dst), weight in actual.items()
                    if (method, dst) == ("dfa", str(f)))
        assert total == pytest.approx(pre[pre[:, f] > 0, f].mean(), rel=1e-5)
    if stage == "layer_1_post_mlp":
        # The last block's neurons reach the stage only directly: both methods agree there.
        last = [k for k in gxa if k[2].startswith("L1N")]
        np.testing.assert_allclose([actual[k] for k in last],
                                   [actual[("dfa", *k[1:])] for k in last], rtol=1e-4, atol=1e-6)


def stored_activations(root: Path, stage: str, directions: np.ndarray, step: int):
    """(normalised activations, feature values) of the collected set: the tokens lineage reads
    with tokens=TOKENS, encoded in numpy by a basis of these directions (threshold 0)."""
    from featurestore.registry import get_activation_set_row, open_activation_set

    wh = Warehouse(root)
    con = wh.connect()
    try:
        row = get_activation_set_row(con, f"{RUN}@{step}:{stage}")
    finally:
        con.close()
    x = open_activation_set(wh, row).all_rows().astype(np.float64) * row["norm_scale"]
    return x, np.maximum(x @ directions, 0)


def test_upstream_and_logit_edges(root):
    result = feature_lineage("lin-final", steps="20", features="0,3,5", top_k=4,
                             upstream="lin-l1", tokens=TOKENS, warehouse=root, progress=False)
    assert result.upstream == "lin-l1" and result.steps[0].features == [0, 3, 5]
    (path,) = query(root, "SELECT path FROM checkpoints WHERE run = ? AND step = 20", [RUN])[0]
    model = load_checkpoint(Warehouse(root).path(path))
    gamma = model.ln_f.weight.detach().double().numpy()
    up = L1_FEATURES.T  # lin-l1's decoder rows, as the final LayerNorm passes them on:
    passed_on = gamma * (up - up.mean(axis=1, keepdims=True))
    _, f_up = stored_activations(root, "layer_1_post_mlp", L1_FEATURES, 20)
    _, f_down = stored_activations(root, "final_norm", FINAL_FEATURES, 20)
    (norm_scale,), = query(root, "SELECT norm_scale FROM activation_sets WHERE name = ?",
                           [f"{RUN}@20:final_norm"])
    unembed = model.unembed.weight.detach().double().numpy()
    for f in (0, 3, 5):
        def got(method, column, other, f=f):
            return {e[other]: e["weight"]
                    for e in edges(root, f"method = ? AND {column} = ?", [method, str(f)])}

        cosine = passed_on @ FINAL_FEATURES[:, f] / np.linalg.norm(passed_on, axis=1)
        top = np.argsort(-np.abs(cosine))[:4]
        assert got("decoder_cosine", "dst_id", "src_id") == pytest.approx(
            {str(i): cosine[i] for i in top})
        correlation = np.array([np.corrcoef(f_up[:, i], f_down[:, f])[0, 1] for i in range(8)])
        top = np.argsort(-np.abs(correlation))[:4]
        assert got("activation_correlation", "dst_id", "src_id") == pytest.approx(
            {str(i): correlation[i] for i in top}, abs=1e-5)
        logits = FINAL_FEATURES[:, f] / norm_scale @ unembed.T
        tokens = [*np.argsort(-logits)[:2], *np.argsort(logits)[:2]]  # 2 promoted, 2 suppressed
        assert got("dla", "src_id", "dst_id") == pytest.approx(
            {str(t): logits[t] for t in tokens})


@pytest.mark.parametrize("arguments, error, message", [
    (dict(basis="nope"), NotFoundError, "--basis 'nope': no such basis"),
    (dict(basis="lin-l1", steps="5"), NotFoundError, "--steps: basis lin-l1 was not fitted"),
    (dict(basis="lin-l1", steps="later"), FeaturestoreError, "--steps: 'later' is not a step"),
    (dict(basis="lin-l1", features="0,99"), FeaturestoreError, "--features: feature id 99"),
    (dict(basis="lin-l1", features="top:x"), FeaturestoreError, "top:N needs a positive N"),
    (dict(basis="lin-deep"), FeaturestoreError, "'layer_7_post_mlp', which the model"),
    (dict(basis="lin-cc"), FeaturestoreError, "--basis lin-cc is a crosscoder-kind basis"),
    (dict(basis="lin-l1", upstream="lin-final"), FeaturestoreError, "not before --basis"),
    (dict(basis="lin-l1", upstream="nope"), NotFoundError, "--upstream 'nope'"),
    (dict(basis="lin-l1", top_k=0), FeaturestoreError, "--top-k 0"),
    (dict(basis="lin-l1", min_weight=-1.0), FeaturestoreError, "--min-weight -1.0"),
])
def test_bad_input_raises_and_writes_nothing(root, arguments, error, message):
    before = snapshot(root)
    with pytest.raises(error, match=message):
        feature_lineage(**arguments, warehouse=root, progress=False)
    assert snapshot(root) == before


def test_rerunning_replaces_the_rows_of_its_steps(root):
    feature_lineage("lin-l1", features="0,1", top_k=3, warehouse=root, progress=False)
    earlier = edges(root, "step < 20")
    feature_lineage("lin-l1", steps="LAST", features="1", top_k=2, warehouse=root,
                    progress=False)
    assert edges(root, "step < 20") == earlier
    rerun = edges(root, "step = 20")
    assert {e["dst_id"] for e in rerun} == {"1"} and max(e["rank"] for e in rerun) == 2
    assert json.loads(rerun[0]["pruning"]) == {
        "top_k": 2, "min_weight": 0.0, "filter": "features", "features": "1",
        "upstream": None, "tokens": 2048}


def write_patches(root: Path, rows: list[tuple[list[int], str, float]]) -> None:
    """`patches` rows of lin-l1 at target step 20: (feature ids, metric, delta)."""
    with Warehouse(root).writer("test patches") as writer:
        writer.put("patches", [{
            "basis": "lin-l1", "source_step": 0, "target_step": 20, "mode": "zero",
            "scale": None, "feature_set": ",".join(map(str, ids)), "feature_ids": ids,
            "split": "bigram", "metric": metric, "clean": 1.0, "patched": 1.0 + delta,
            "delta": delta, "recon_rel_error": 0.1, "error_norm_share": 0.1,
            "spliced_loss_delta": 0.01, "n_tokens": 100, "created_at": utc_now(),
        } for ids, metric, delta in rows])


def test_causal_filter(root):
    by_energy = [f for (f,) in query(
        root, "SELECT feature_id FROM trajectories WHERE basis = 'lin-l1' AND step = 10 "
        "ORDER BY energy DESC, feature_id LIMIT 3")]
    # Feature 2 moved the loss alone; 3 too little; 4 only moved accuracy; 5 only with 3.
    write_patches(root, [([2], "loss", -0.5), ([3], "loss", 0.001), ([4], "accuracy", 0.9),
                         ([4], "loss", 0.0), ([3, 5], "loss", 1.0)])
    result = feature_lineage("lin-l1", steps="10,20", top_features=3, warehouse=root,
                             progress=False)
    energy, patches = result.steps
    assert (energy.filter, energy.features) == ("energy", sorted(by_energy))
    assert (patches.filter, patches.features) == ("patches", [2])
    assert {e["dst_id"] for e in edges(root, "step = 20")} == {"2"}
    assert json.loads(edges(root, "step = 20")[0]["pruning"])["patch_threshold"] == 0.01
    assert feature_lineage("lin-l1", steps="20", patch_threshold=0.0, warehouse=root,
                           progress=False).steps[0].features == [2, 3, 4]
    chosen = feature_lineage("lin-l1", steps="10", features="top:3", warehouse=root,
                             progress=False).steps[0]
    assert (chosen.filter, chosen.features) == ("features", sorted(by_energy))


def test_runs_without_a_task_read_the_activation_sets_tokens(root):
    feature_lineage("lin-l1", steps="20", features="0,1", tokens=TOKENS, warehouse=root,
                    progress=False)
    from_task = weights_by_edge(edges(root))
    (run,) = query(root, "SELECT * FROM runs WHERE run = ?", [RUN], records=True)
    with Warehouse(root).writer("test: forget the task") as writer:
        writer.put("runs", [{**run, "task_config": None}])
    result = feature_lineage("lin-l1", steps="20", features="0,1", tokens=TOKENS,
                             warehouse=root, progress=False)
    assert result.n_tokens == TOKENS
    # collect read the same task tokens into the set, so the weights agree.
    assert weights_by_edge(edges(root)) == pytest.approx(from_task, abs=1e-9)
