"""feature-lineage on GPT-2, GPT-NeoX (parallel residual), Llama (grouped-query attention,
RMSNorm, gated MLP) and a custom nn.Module registered with an adapter, checked against plain
torch.

Per family: three tiny random-init checkpoints saved and registered, a token file, both a
residual-stream stage and final_norm collected, a small pooled basis fitted on each, and
feature-lineage run through the CLI. The stored weights are then recomputed without nnsight or
featurestore's stage table: torch forward hooks on the model's modules, each head's and neuron's
write formed by calling its output projection on that head's or neuron's input alone (which works
for nn.Linear and GPT-2's Conv1D alike), the final norm linearised by hand, and torch.autograd
for gradient x activation.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.shared_basis import load_shared_basis
from featurestore.warehouse import Warehouse

from .conftest import snapshot

STEPS = [0, 10, 20]
N_SEQUENCES, LENGTH, VOCAB = 32, 16, 64
TOKENS = N_SEQUENCES * LENGTH
FEATURES = list(range(24))  # of 64; those that never fire get no edges
N_HEADS = 4


@dataclass(frozen=True)
class Spec:
    """One family's tiny model, written out by hand so the reference does not read
    featurestore.stages: where its residual stream, heads, neurons and final norm are."""

    config: callable  # the transformers config; None for the custom model
    stage: str  # the residual-stream stage of the first basis
    stage_site: tuple[str, str]  # (module, port) of that stage
    embed: tuple[str, str]  # (module, port) of the residual stream entering block 0
    attn_out: str  # '{i}': the attention output projection; its input is the heads side by side
    mlp_out: str  # the MLP output projection; its input is the neurons
    final_norm: str
    rms: bool  # the final norm is an RMSNorm (else a LayerNorm)
    neuron_blocks: tuple[int, ...]  # blocks whose MLP writes before `stage`


def _gpt2():
    import transformers

    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2,
                                   n_head=N_HEADS)


def _neox():
    import transformers

    return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=N_HEADS, intermediate_size=64,
                                      max_position_embeddings=LENGTH, use_parallel_residual=True)


def _llama():
    import transformers

    # head_dim 4: the heads' outputs are 16 wide, not d_model, and two query heads share a kv head
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=N_HEADS, num_key_value_heads=2,
                                    head_dim=4, intermediate_size=64,
                                    max_position_embeddings=LENGTH)


SPECS = {
    "gpt2": Spec(_gpt2, "layer_1_post_attn", ("transformer.h.1.ln_2", "input"),
                 ("transformer.drop", "output"), "transformer.h.{i}.attn.c_proj",
                 "transformer.h.{i}.mlp.c_proj", "transformer.ln_f", rms=False,
                 neuron_blocks=(0,)),
    # Parallel residual: block 1's attention and MLP both write before its output.
    "gpt_neox": Spec(_neox, "layer_1_post_mlp", ("gpt_neox.layers.1", "output"),
                     ("gpt_neox.emb_dropout", "output"), "gpt_neox.layers.{i}.attention.dense",
                     "gpt_neox.layers.{i}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm",
                     rms=False, neuron_blocks=(0, 1)),
    "llama": Spec(_llama, "layer_1_post_attn", ("model.layers.1.post_attention_layernorm",
                                                "input"),
                  ("model.embed_tokens", "output"), "model.layers.{i}.self_attn.o_proj",
                  "model.layers.{i}.mlp.down_proj", "model.norm", rms=True, neuron_blocks=(0,)),
    "custom": Spec(None, "layer_1_post_attn", ("layers.1.norm2", "input"), ("layers.0", "input"),
                   "layers.{i}.attn.out", "layers.{i}.mlp.down", "norm", rms=False,
                   neuron_blocks=(0,)),
}

# The README's own-model example: a model of its own and the adapter that locates its parts.
CUSTOM_MODEL = """
import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width), MLP(width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LM(nn.Module):
    def __init__(self, vocab, width, heads, depth, context):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(context, width))
        self.layers = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        x = self.embedding(ids) + self.positions[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.readout(self.norm(x))


def build(config):
    return LM(**config)
"""
CUSTOM_CONFIG = {"vocab": VOCAB, "width": 32, "heads": N_HEADS, "depth": 2, "context": LENGTH}
CUSTOM_ADAPTER = {
    "n_layers": 2, "n_heads": N_HEADS, "token_embedding": "embedding", "block": "layers.{i}",
    "embed": "layers.0:input", "post_attn": "layers.{i}.norm2:input",
    "mlp_hidden": "layers.{i}.mlp.act:output", "final_norm": "norm:output",
    "attn_out": "layers.{i}.attn.out", "mlp_out": "layers.{i}.mlp.down",
    "final_norm_kind": "layernorm", "unembed": "readout",
}


def build_custom(base: Path) -> torch.nn.Module:
    """The custom model, built by its factory from the model file written under `base`."""
    import importlib.util

    loader = importlib.util.spec_from_file_location("lineage_custom_model", base / "model.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.build(CUSTOM_CONFIG)


def cli_ok(root: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--warehouse", str(root), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout  # transformers' loading bars go to stderr


def perturb(model: torch.nn.Module) -> None:
    """Non-trivial norm gains and output biases, so that a missing gain, a wrong centring or a
    dropped bias would show."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if "Norm" in type(module).__name__:
                module.weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.uniform_(-0.3, 0.3)
            elif getattr(module, "bias", None) is not None and name.endswith(
                    ("c_proj", "dense", "dense_4h_to_h", "attn.out", "mlp.down")):
                module.bias.normal_(0, 0.1)


def register_checkpoints(family: str, base: Path, root: Path) -> None:
    """Three random-init checkpoints of the family's model under `base`, registered as run m."""
    spec = SPECS[family]
    if family == "custom":
        from safetensors.torch import save_file

        (base / "model.py").write_text(CUSTOM_MODEL)
        (base / "config.json").write_text(json.dumps(CUSTOM_CONFIG))
        (base / "adapter.json").write_text(json.dumps(CUSTOM_ADAPTER))
        (base / "ckpts").mkdir()
        for step in STEPS:
            torch.manual_seed(step)
            model = build_custom(base)
            perturb(model)
            save_file(model.state_dict(), base / "ckpts" / f"step_{step}.safetensors")
        cli_ok(root, "register-model", "--run", "m", "--factory", f"{base / 'model.py'}:build",
               "--config", str(base / "config.json"), "--adapter", str(base / "adapter.json"),
               "--weights", str(base / "ckpts" / "step_*.safetensors"))
        return
    import transformers

    for step in STEPS:
        torch.manual_seed(step)
        model = transformers.AutoModelForCausalLM.from_config(spec.config())
        perturb(model)
        model.save_pretrained(base / f"step{step}")
        cli_ok(root, "register-model", "--run", "m", "--path", str(base / f"step{step}"),
               "--step", str(step))


def load_last(family: str, base: Path) -> torch.nn.Module:
    """The last checkpoint's model, loaded without featurestore."""
    if family == "custom":
        from safetensors.torch import load_file

        model = build_custom(base)
        model.load_state_dict(load_file(base / "ckpts" / f"step_{STEPS[-1]}.safetensors"))
        return model.eval()
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(base / f"step{STEPS[-1]}").eval()


@pytest.fixture(scope="module", params=sorted(SPECS))
def built(request, tmp_path_factory):
    """(family, warehouse, folder of the checkpoints, tokens): run `m` with three checkpoints,
    bases `res` (the family's residual stage) and `fn` (final_norm), lineage of both at the last
    step, fn with res upstream."""
    family = request.param
    spec = SPECS[family]
    base = tmp_path_factory.mktemp(family)
    root = base / "warehouse"
    register_checkpoints(family, base, root)
    ids = np.random.default_rng(0).integers(0, VOCAB, (N_SEQUENCES, LENGTH))
    pq.write_table(pa.table({"input_ids": ids.tolist()}), base / "tokens.parquet")
    cli_ok(root, "collect", "--run", "m", "--stage", spec.stage, "--stage", "final_norm",
           "--tokens", str(TOKENS), "--tokens-from", str(base / "tokens.parquet"), "--quiet")
    # Lineage is exact whatever the dictionary's quality, so a short fit with the quality gates
    # opened is enough.
    for name, stage in (("res", spec.stage), ("fn", "final_norm")):
        cli_ok(root, "shared-feature-fit", "--run", "m", "--stage", stage, "--name", name,
               "--dict-size", "64", "--k", "8", "--steps", "50", "--batch-size", "256",
               "--min-explained-variance", "-1000", "--max-active-fraction", "1",
               "--max-dead-fraction", "1", "--quiet")
    features = ",".join(map(str, FEATURES))
    for name, extra in (("res", []), ("fn", ["--upstream", "res"])):
        result = json.loads(cli_ok(root, "feature-lineage", "--basis", name, "--steps", "LAST",
                                   "--features", features, "--top-k", "1000", "--tokens",
                                   str(TOKENS), "--json", *extra))
        assert result["n_tokens"] == TOKENS and result["steps"][0]["step"] == STEPS[-1]
    return family, root, base, torch.from_numpy(ids)


def stored(root: Path, basis: str) -> dict[tuple, float]:
    con = Warehouse(root).connect()
    try:
        rows = con.execute("SELECT method, src_type, src_id, dst_id, weight FROM lineage_edges "
                           "WHERE basis = ?", [basis]).fetchall()
    finally:
        con.close()
    return {tuple(row[:4]): row[4] for row in rows}


@dataclass
class Reference:
    """The model's values on the tokens, captured with torch hooks, and the basis at the last
    step, with everything lineage's weights are recomputed from."""

    spec: Spec
    model: torch.nn.Module
    captured: dict[str, torch.Tensor]  # label -> [n, width], views of `raw`
    raw: dict[str, torch.Tensor]  # label -> the value as the hook saw it, in the autograd graph
    stage: str
    scale: float
    w_enc: torch.Tensor  # [d, h]
    b_enc: torch.Tensor  # [h]
    fires: torch.Tensor  # [n, h] bool: the basis's encode > 0
    decoder: torch.Tensor  # [h, d]

    def to_stage(self, write: torch.Tensor) -> torch.Tensor:
        """A residual-stream write [n, d] as the basis's stage receives it: unchanged for a
        residual stage; through the final norm linearised at each token otherwise."""
        if self.stage != "final_norm":
            return write
        norm = self.model.get_submodule(self.spec.final_norm)
        residual = self.captured["final_residual"].detach().double()
        gamma = norm.weight.detach().double()
        if self.spec.rms:
            denominator = (residual.pow(2).mean(dim=1) + norm.variance_epsilon).sqrt()
            return gamma * write / denominator[:, None]
        denominator = (residual.var(dim=1, unbiased=False) + norm.eps).sqrt()
        return gamma * (write - write.mean(dim=1, keepdim=True)) / denominator[:, None]

    def pre(self) -> torch.Tensor:
        """[n, h] pre-activations, differentiable through the model."""
        x = self.captured[self.stage]
        return x * self.scale @ self.w_enc.to(x.dtype) + self.b_enc.to(x.dtype)

    def direct(self, write: torch.Tensor) -> torch.Tensor:
        """[h]: dfa of a write [n, d] on every feature: projected on its encoder direction,
        averaged where it fires."""
        projected = self.scale * self.to_stage(write) @ self.w_enc  # [n, h]
        fires = self.fires.double()
        return (projected * fires).sum(dim=0) / fires.sum(dim=0).clamp(min=1)

def unit_writes(layer: torch.nn.Module, width: int) -> torch.Tensor:
    """[in, d]: what one unit of each input of a projection adds to its output, by calling it."""
    with torch.no_grad():
        unit = torch.eye(width)
        return (layer(unit) - layer(torch.zeros(1, width))).double()


def reference(family: str, root: Path, base: Path, tokens: torch.Tensor,
              basis: str) -> Reference:
    spec = SPECS[family]
    model = load_last(family, base)
    captured = {}

    def keep(label, port):
        def pre_hook(module, args):
            captured[label] = args[0]

        def hook(module, args, output):
            captured[label] = output[0] if isinstance(output, tuple) else output
        return pre_hook if port == "input" else hook

    sites = {"embed": spec.embed, spec.stage: spec.stage_site,
             "final_residual": (spec.final_norm, "input"),
             "final_norm": (spec.final_norm, "output")}
    for i in range(2):
        sites[f"heads_{i}"] = (spec.attn_out.format(i=i), "input")
        sites[f"neurons_{i}"] = (spec.mlp_out.format(i=i), "input")
    handles = []
    for label, (path, port) in sites.items():
        module = model.get_submodule(path)
        handles.append(module.register_forward_pre_hook(keep(label, port)) if port == "input"
                       else module.register_forward_hook(keep(label, port)))
    model(tokens)
    for handle in handles:  # unit_writes calls the projections again
        handle.remove()
    flat = {label: value.reshape(-1, value.shape[-1]) for label, value in captured.items()}

    wh = Warehouse(root)
    con = wh.connect()
    try:
        shared, _ = load_shared_basis(wh, con, basis)
    finally:
        con.close()
    scale = shared.checkpoints[-1].norm_scale
    stage = shared.stage
    with torch.no_grad():
        fires = shared.model.encode((flat[stage] * scale)[:, None, :], normalized=True) > 0
    basis_model = shared.model
    return Reference(spec, model, flat, captured, stage, scale,
                     basis_model.W_enc.detach()[0].double(), basis_model.b_enc.detach().double(),
                     fires, basis_model.decoder().detach()[:, 0].double())


def expected_dfa(ref: Reference) -> tuple[dict[tuple, float], dict[int, float]]:
    """(dfa of every source and fired feature; per fired feature, the constant terms: the output
    biases written before the stage and, for final_norm, the norm's own bias, plus b_enc)."""
    spec, model = ref.spec, ref.model
    neuron_blocks = (0, 1) if ref.stage == "final_norm" else spec.neuron_blocks
    fired = [f for f in FEATURES if ref.fires[:, f].any()]
    weights = {("embedding", "embed"): ref.direct(ref.captured["embed"].detach().double())}
    bias = torch.zeros(1, ref.w_enc.shape[0], dtype=torch.float64)
    for i in (0, 1):
        layer = model.get_submodule(spec.attn_out.format(i=i))
        heads = ref.captured[f"heads_{i}"].detach().double()
        writes = unit_writes(layer, heads.shape[1])
        d_head = heads.shape[1] // N_HEADS
        for h in range(N_HEADS):
            cols = slice(h * d_head, (h + 1) * d_head)
            weights["attention_head", f"L{i}H{h}"] = ref.direct(heads[:, cols] @ writes[cols])
        with torch.no_grad():
            bias = bias + layer(torch.zeros(1, heads.shape[1])).double()
    for i in neuron_blocks:
        layer = model.get_submodule(spec.mlp_out.format(i=i))
        neurons = ref.captured[f"neurons_{i}"].detach().double()
        writes = unit_writes(layer, neurons.shape[1])
        for k in range(neurons.shape[1]):
            weights["mlp_neuron", f"L{i}N{k}"] = ref.direct(torch.outer(neurons[:, k], writes[k]))
        with torch.no_grad():
            bias = bias + layer(torch.zeros(1, neurons.shape[1])).double()
    n = len(ref.captured["embed"])
    constants = ref.direct(bias.expand(n, -1)) + ref.b_enc
    norm_bias = getattr(model.get_submodule(spec.final_norm), "bias", None)
    if ref.stage == "final_norm" and norm_bias is not None:
        constants = constants + ref.scale * norm_bias.detach().double() @ ref.w_enc
    expected = {("dfa", kind, source, str(f)): value[f].item()
                for (kind, source), value in weights.items() for f in fired}
    return expected, {f: constants[f].item() for f in fired}


@pytest.mark.parametrize("basis", ["res", "fn"])
def test_dfa_matches_torch_hooks_and_adds_up(built, basis):
    family, root, base, tokens = built
    ref = reference(family, root, base, tokens, basis)
    expected, constants = expected_dfa(ref)
    actual = {key: weight for key, weight in stored(root, basis).items() if key[0] == "dfa"}
    assert len(constants) >= 3  # enough features fired to make the check mean something
    assert set(actual) == set(expected)  # sources before the stage only (no block-1 MLP at
    #                                       post_attn), and every fired feature
    keys = sorted(expected)
    np.testing.assert_allclose([actual[k] for k in keys], [expected[k] for k in keys],
                               rtol=1e-4, atol=1e-5)
    # Complete: with the constants, the sources add up to the mean pre-activation where the
    # feature fires.
    pre = ref.pre().detach().double()
    for f, constant in constants.items():
        total = sum(w for (_, _, _, dst), w in actual.items() if dst == str(f)) + constant
        assert total == pytest.approx(pre[ref.fires[:, f], f].mean().item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("basis", ["res", "fn"])
def test_grad_x_act_matches_autograd(built, basis):
    family, root, base, tokens = built
    ref = reference(family, root, base, tokens, basis)
    counts = ref.fires[:, FEATURES].sum(dim=0)
    f = FEATURES[int(counts.argmax())]  # the feature that fires most
    fire = ref.fires[:, f]
    labels = ["heads_0", "heads_1", "neurons_0", "neurons_1"]
    grads = dict(zip(labels, torch.autograd.grad(ref.pre()[fire, f].sum(),
                                                 [ref.raw[label] for label in labels],
                                                 allow_unused=True)))
    actual = {key: w for key, w in stored(root, basis).items()
              if key[0] == "grad_x_act" and key[3] == str(f)}
    expected = {}
    for i in range(2):
        product = (grads[f"heads_{i}"] * ref.raw[f"heads_{i}"]).detach().double()
        per_head = product.reshape(-1, N_HEADS, product.shape[-1] // N_HEADS).sum(dim=(0, 2))
        per_head = per_head / int(fire.sum())
        expected.update({("grad_x_act", "attention_head", f"L{i}H{h}", str(f)): per_head[h].item()
                         for h in range(N_HEADS)})
        if grads[f"neurons_{i}"] is None:  # block 1's MLP runs after a post_attn stage
            continue
        per_neuron = (grads[f"neurons_{i}"] * ref.raw[f"neurons_{i}"]).detach().double()
        per_neuron = per_neuron.reshape(-1, per_neuron.shape[-1]).sum(dim=0) / int(fire.sum())
        expected.update({("grad_x_act", "mlp_neuron", f"L{i}N{k}", str(f)): per_neuron[k].item()
                         for k in range(len(per_neuron))})
    assert set(actual) == set(expected)
    keys = sorted(expected)
    np.testing.assert_allclose([actual[k] for k in keys], [expected[k] for k in keys],
                               rtol=1e-4, atol=1e-5)


def test_dla_and_upstream_cosine_through_the_final_norm(built):
    family, root, base, tokens = built
    ref = reference(family, root, base, tokens, "fn")
    edges = stored(root, "fn")
    unembed = (ref.model.readout if family == "custom"
               else ref.model.get_output_embeddings()).weight.detach().double()  # [vocab, d]
    norm = ref.model.get_submodule(SPECS[family].final_norm)
    gamma = norm.weight.detach().double()
    wh = Warehouse(root)
    con = wh.connect()
    try:
        up, _ = load_shared_basis(wh, con, "res")
    finally:
        con.close()
    up_rows = up.model.decoder().detach()[:, 0].double()
    if not SPECS[family].rms:  # a LayerNorm centres what it passes on; an RMSNorm does not
        up_rows = up_rows - up_rows.mean(dim=1, keepdim=True)
    passed_on = gamma * up_rows
    for f in FEATURES[:6]:
        # --top-k 1000 keeps every token of the 64: all promoted and all suppressed ones.
        logits = ref.decoder[f] / ref.scale @ unembed.T
        dla = {int(token): w for (method, _, src, token), w in edges.items()
               if method == "dla" and src == str(f)}
        assert dla == pytest.approx({t: logits[t].item() for t in range(VOCAB) if logits[t]})
        cosine = torch.nn.functional.cosine_similarity(passed_on, ref.decoder[f][None], dim=1)
        cosines = {int(src): w for (method, _, src, dst), w in edges.items()
                   if method == "decoder_cosine" and dst == str(f)}
        assert cosines == pytest.approx({i: cosine[i].item() for i in range(len(cosine))})


def test_a_run_without_a_model_is_refused(built, tmp_path):
    _, root, _, _ = built
    copy = tmp_path / "warehouse"
    shutil.copytree(root, copy)
    con = Warehouse(copy).connect()
    try:
        cursor = con.execute("SELECT * FROM runs WHERE run = 'm'")
        run = dict(zip([d[0] for d in cursor.description], cursor.fetchone()))
    finally:
        con.close()
    with Warehouse(copy).writer("test: the run loses its model") as writer:
        writer.put("runs", [{**run, "kind": "external", "model_family": None}])
    before = snapshot(copy)
    result = CliRunner().invoke(cli, ["--warehouse", str(copy), "feature-lineage", "--basis",
                                      "res", "--features", "0"])
    assert result.exit_code != 0
    assert "external run with no model" in result.output and "register-model" in result.output
    assert snapshot(copy) == before


def test_models_lineage_cannot_split_are_refused_before_tracing():
    import dataclasses

    import transformers

    from featurestore.errors import FeaturestoreError
    from featurestore.ingest.feature_lineage import _check_components
    from featurestore.stages import FAMILIES, StageReader

    model = transformers.AutoModelForCausalLM.from_config(_gpt2())
    with pytest.raises(FeaturestoreError, match="number of attention heads.*n_heads=N"):
        _check_components(StageReader(model, "gpt2", 2), "r")
    with pytest.raises(FeaturestoreError, match="do not split into 3 heads"):
        _check_components(StageReader(model, "gpt2", 2, n_heads=3), "r")
    whole_attention = dataclasses.replace(FAMILIES["gpt2"], attn_out="transformer.h.{i}.attn")
    with pytest.raises(FeaturestoreError, match="is a GPT2Attention; lineage reads output"):
        _check_components(StageReader(model, whole_attention, 2, n_heads=N_HEADS), "r")
    missing = dataclasses.replace(FAMILIES["gpt2"], unembed="head")
    with pytest.raises(FeaturestoreError, match="no module 'head' .its family's unembed"):
        _check_components(StageReader(model, missing, 2, n_heads=N_HEADS), "r")
