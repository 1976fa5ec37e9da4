"""Dictionaries in other tools' formats, checked against the tools themselves.

Each test builds a dictionary with the package's own classes (SAELens, sparsify,
dictionary_learning), saves it with the package's own save function, reads it with featurestore,
and compares featurestore's encoding with the package's `encode` on the same activations; exports
go the other way, through the package's own loader. The activations are superposed (more
features than dimensions), fire at rates from 30% to 0.3% and sit off the origin, and every
threshold is set where it gates about half of a latent's activations, so that a mistake in the
bias, the scale or the gate shows.

The science-of-finetuning crosscoder classes live in a fork of dictionary_learning that is not
installable beside this project (it pins an old nnsight); their files are written here by hand in
the fork's layout and checked against a numpy implementation of what its code computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featurestore import format_dictionary_learning, format_saelens, format_sparsify
from featurestore.crosscoder import CrossCoder, CrossCoderConfig
from featurestore.dictionary_weights import DictionaryWeights
from featurestore.errors import FeaturestoreError

sae_lens = pytest.importorskip("sae_lens")
sparsify = pytest.importorskip("sparsify")
dictionary_learning = pytest.importorskip("dictionary_learning")

D_IN, D_SAE, K = 24, 96, 6


def superposed(n: int = 2048, d: int = D_IN, seed: int = 0) -> torch.Tensor:
    """Activations built from 4 d unit directions (superposed), each firing at its own rate
    (log-spaced from 0.3 to 0.003) with exponential magnitudes, plus noise and a constant
    offset."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(4 * d, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    rates = np.geomspace(0.3, 0.003, 4 * d)
    magnitudes = rng.exponential(2.0, size=(n, 4 * d)) * (rng.random((n, 4 * d)) < rates)
    x = magnitudes @ directions + 0.05 * rng.normal(size=(n, d)) + rng.normal(size=d)
    return torch.tensor(x, dtype=torch.float32)


def randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Random weights and biases everywhere, so no bias is left at zero by its initialiser."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def midway(values: torch.Tensor) -> torch.Tensor:
    """A threshold that keeps about half of the positive `values`: halfway between the two
    middle ones, so that no value lies within float rounding of it (folding a bias moves the
    pre-activations by rounding, which would flip a value lying exactly on the threshold)."""
    positive = values[values > 0].sort().values
    if len(positive) < 2:
        return torch.tensor(0.1)
    middle = len(positive) // 2
    return (positive[middle - 1] + positive[middle]) / 2


def gating_threshold(pre: torch.Tensor) -> torch.Tensor:
    """Per latent, a threshold that keeps about half of its positive pre-activations."""
    return torch.stack([midway(column) for column in pre.T])


def assert_gates(codes: torch.Tensor, relu_codes: torch.Tensor) -> None:
    """The threshold or top-k really removed activations, and kept some."""
    kept, positive = (codes > 0).sum().item(), (relu_codes > 0).sum().item()
    assert 0.1 * positive < kept < 0.9 * positive, (kept, positive)


def featurestore_encode(weights: DictionaryWeights, x: torch.Tensor) -> torch.Tensor:
    return weights.to_crosscoder().encode(x.reshape(len(x), weights.n_sources, -1))


# -- SAELens ----------------------------------------------------------------------------------


def saelens_sae(architecture: str, **config):
    import sae_lens

    sae_class, config_class = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig)}[architecture]
    sae = sae_class(config_class(d_in=D_IN, d_sae=D_SAE, **config))
    randomise(sae)
    return sae


@pytest.mark.parametrize("architecture,config", [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
])
def test_saelens_sae_imports_with_the_packages_encoding(tmp_path, architecture, config):
    from sae_lens import SAE

    x = superposed()
    sae = saelens_sae(architecture, **config)
    if architecture == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(gating_threshold(x @ sae.W_enc + sae.b_enc - sae.b_dec @ sae.W_enc))
    sae.save_model(tmp_path)
    weights, saved_config = format_saelens.read(tmp_path)
    assert saved_config["architecture"] == architecture
    ours = featurestore_encode(weights, x)
    theirs = sae.encode(x).detach()
    if architecture != "standard":
        relu = torch.relu(x @ sae.W_enc + sae.b_enc).detach()
        assert_gates(theirs, relu)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    model = weights.to_crosscoder()
    torch.testing.assert_close(model.decode(ours)[:, 0], sae.decode(theirs).detach(),
                               rtol=1e-4, atol=1e-4)
    # and the package's own loader reads the same dictionary back
    loaded = SAE.load_from_disk(tmp_path)
    torch.testing.assert_close(loaded.encode(x).detach(), theirs)


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_saelens_batchtopk_training_sae_imports_as_its_inference_jumprelu(tmp_path, architecture):
    """A BatchTopK training SAE saved as is, and the JumpReLU SAELens saves for inference from
    it, import to the same code: the inference SAE's encode."""
    import sae_lens
    from sae_lens import SAE

    if architecture == "batchtopk":
        sae = sae_lens.BatchTopKTrainingSAE(
            sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    else:
        sae = sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[D_SAE // 4, D_SAE]))
    randomise(sae)
    x = superposed()
    scores = torch.relu(x @ sae.W_enc + sae.b_enc - sae.b_dec @ sae.W_enc) * sae.W_dec.norm(dim=1)
    sae.topk_threshold = midway(scores.detach())
    sae.save_model(tmp_path / "training")
    sae.save_inference_model(tmp_path / "inference")
    inference = SAE.load_from_disk(tmp_path / "inference")
    theirs = inference.encode(x).detach()
    assert_gates(theirs, torch.relu(x @ inference.W_enc + inference.b_enc).detach())
    for folder in ("training", "inference"):
        weights, _ = format_saelens.read(tmp_path / folder)
        assert weights.arch == "jumprelu"
        torch.testing.assert_close(featurestore_encode(weights, x), theirs, rtol=1e-4, atol=1e-4)


def scaled_model(arch: str, seed: int = 2) -> CrossCoder:
    """A featurestore SAE of `arch` with random weights, a norm scale of 2.5 and a threshold
    that gates about half of the activations."""
    torch.manual_seed(seed)
    config = CrossCoderConfig(n_sources=1, d_model=D_IN, d_hidden=D_SAE, arch=arch, k=K,
                              **({"group_sizes": (D_SAE // 4, D_SAE - D_SAE // 4)}
                                 if arch == "matryoshka" else {}))
    model = CrossCoder(config, torch.tensor([2.5]))
    randomise(model)
    x = superposed()[:, None, :] * 2.5
    pre = model.pre_activations(x).detach()
    with torch.no_grad():
        if arch == "jumprelu":
            model.log_threshold.copy_(gating_threshold(pre).log())
        elif arch in ("batchtopk", "matryoshka"):
            scores = torch.relu(pre) * model.decoder_norms().sum(dim=1)
            model.threshold.fill_(midway(scores))
    return model.eval()


@pytest.mark.parametrize("arch", ["vanilla", "topk", "jumprelu", "batchtopk", "matryoshka"])
def test_exported_saelens_sae_loads_with_saelens_and_encodes_the_same(tmp_path, arch):
    from sae_lens import SAE

    model = scaled_model(arch)
    x = superposed(seed=3)
    format_saelens.write(DictionaryWeights.from_crosscoder(model), tmp_path, {"hook_name": "h"})
    sae = SAE.load_from_disk(tmp_path)
    expected = {"vanilla": "standard", "topk": "topk"}.get(arch, "jumprelu")
    assert sae.cfg.architecture() == expected
    ours = model.encode(x[:, None, :])
    theirs = sae.encode(x).detach()
    if arch != "vanilla":
        assert_gates(ours, torch.relu(model.pre_activations(x[:, None, :] * 2.5)))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.decode(theirs).detach(), model.decode(ours)[:, 0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field,value", [
    ("architecture", "gated"), ("normalize_activations", "layer_norm"),
    ("normalize_activations", "constant_norm_rescale"), ("reshape_activations", "hook_z")])
def test_saelens_dictionaries_that_cannot_be_mapped_are_refused_naming_the_field(
        tmp_path, field, value):
    saelens_sae("standard").save_model(tmp_path)
    config = json.loads((tmp_path / "cfg.json").read_text())
    config[field] = value
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(FeaturestoreError, match=f"{field}.*{value}"):
        format_saelens.read(tmp_path)


# -- sparsify ---------------------------------------------------------------------------------


def dense(top_acts: torch.Tensor, top_indices: torch.Tensor, width: int) -> torch.Tensor:
    return torch.zeros(len(top_acts), width).scatter_(1, top_indices, top_acts)


def test_sparsify_coder_imports_with_the_packages_encoding(tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
    randomise(coder)
    coder.save_to_disk(tmp_path)
    weights, _ = format_sparsify.read(tmp_path)
    assert (weights.arch, weights.k) == ("topk", K)
    x = superposed()
    out = coder.encode(x)
    theirs = dense(out.top_acts.detach(), out.top_indices, D_SAE)
    assert ((theirs > 0).sum(dim=1) <= K).all() and (theirs > 0).sum() > len(x)
    torch.testing.assert_close(featurestore_encode(weights, x), theirs, rtol=1e-4, atol=1e-4)
    x_hat = coder.decode(out.top_acts, out.top_indices).detach()
    torch.testing.assert_close(weights.to_crosscoder().decode(theirs)[:, 0], x_hat,
                               rtol=1e-4, atol=1e-4)


def test_exported_sparsify_coder_loads_with_sparsify_and_encodes_the_same(tmp_path):
    from sparsify import SparseCoder

    model = scaled_model("topk")
    format_sparsify.write(DictionaryWeights.from_crosscoder(model), tmp_path)
    coder = SparseCoder.load_from_disk(tmp_path)
    x = superposed(seed=4)
    out = coder.encode(x)
    torch.testing.assert_close(dense(out.top_acts.detach(), out.top_indices, D_SAE),
                               model.encode(x[:, None, :]), rtol=1e-4, atol=1e-4)


def test_sparsify_refuses_what_it_cannot_encode(tmp_path):
    with pytest.raises(FeaturestoreError, match="sparsify encodes with per-token TopK only"):
        format_sparsify.write(DictionaryWeights.from_crosscoder(scaled_model("batchtopk")),
                              tmp_path / "bt")
    from sparsify import SparseCoder, SparseCoderConfig

    for field, value in (("activation", "groupmax"), ("transcode", True),
                         ("skip_connection", True)):
        folder = tmp_path / field
        SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K)).save_to_disk(folder)
        config = json.loads((folder / "cfg.json").read_text())
        config[field] = value
        (folder / "cfg.json").write_text(json.dumps(config))
        with pytest.raises(FeaturestoreError, match=f"{field} = {json.dumps(value)}"):
            format_sparsify.read(folder)


# -- dictionary_learning ----------------------------------------------------------------------


def test_dictionary_learning_autoencoders_import_with_the_packages_encoding(tmp_path):
    from dictionary_learning import AutoEncoder, JumpReluAutoEncoder

    x = superposed()
    relu_ae = AutoEncoder(D_IN, D_SAE)
    jump_ae = JumpReluAutoEncoder(D_IN, D_SAE)
    for module in (relu_ae, jump_ae):
        randomise(module)
    with torch.no_grad():
        jump_ae.threshold.copy_(gating_threshold(x @ jump_ae.W_enc + jump_ae.b_enc))
    for name, module in (("relu", relu_ae), ("jump", jump_ae)):
        (tmp_path / name).mkdir()
        torch.save(module.state_dict(), tmp_path / name / "ae.pt")
        weights, described = format_dictionary_learning.read(tmp_path / name)
        theirs = module.encode(x).detach()
        torch.testing.assert_close(featurestore_encode(weights, x), theirs, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(weights.to_crosscoder().decode(theirs)[:, 0],
                                   module.decode(theirs).detach(), rtol=1e-4, atol=1e-4)
    assert_gates(jump_ae.encode(x), torch.relu(x @ jump_ae.W_enc + jump_ae.b_enc))
    # the package's loader (without its decoder renormalisation) reads the same code
    loaded = AutoEncoder.from_pretrained(str(tmp_path / "relu" / "ae.pt"),
                                         normalize_decoder=False)
    torch.testing.assert_close(loaded.encode(x), relu_ae.encode(x))


def fork_crosscoder_state(layers: int, d: int, h: int, code_normalization: int,
                          threshold: float | None, seed: int = 5) -> dict[str, torch.Tensor]:
    """The state dict of the fork's (Batch TopK) CrossCoder, with an activation normaliser."""
    g = torch.Generator().manual_seed(seed)
    state = {"encoder.weight": torch.randn(layers, d, h, generator=g) * 0.3,
             "encoder.bias": torch.randn(h, generator=g) * 0.3,
             "decoder.weight": torch.randn(layers, h, d, generator=g) * 0.3,
             "decoder.bias": torch.randn(layers, d, generator=g),
             "code_normalization_id": torch.tensor(code_normalization),
             "activation_mean": torch.randn(layers, d, generator=g),
             "activation_std": torch.rand(layers, d, generator=g) + 0.5,
             "target_rms": torch.tensor(1.0)}
    state["activation_global_scale"] = 1 / state["activation_std"].pow(2).sum(dim=-1).sqrt()
    if threshold is not None:
        state["k"], state["threshold"] = torch.tensor(K), torch.tensor(threshold)
    return state


def fork_encode(state: dict[str, torch.Tensor], x: np.ndarray, normalisation: str) -> np.ndarray:
    """What the fork's CrossCoder / BatchTopKCrossCoder encode computes, in numpy."""
    s = {key: value.double().numpy() for key, value in state.items()}
    normalised = (x - s["activation_mean"]) * s["activation_global_scale"][None, :, None]
    f = np.maximum(np.einsum("bld,ldh->bh", normalised, s["encoder.weight"])
                   + s["encoder.bias"], 0)
    if "threshold" not in s:
        return f
    norms = np.linalg.norm(s["decoder.weight"], axis=2)  # [layers, h]
    weight = {"CROSSCODER": norms.sum(axis=0), "SAE": np.sqrt((norms ** 2).sum(axis=0)),
              "NONE": np.ones(norms.shape[1])}[normalisation]
    return f * (f * weight > s["threshold"])


@pytest.mark.parametrize("normalisation,code", [("CROSSCODER", 1), ("SAE", 2), ("NONE", 4),
                                                (None, 0)])
def test_fork_crosscoders_import_with_the_forks_encoding(tmp_path, normalisation, code):
    rng = np.random.default_rng(6)
    x = np.stack([superposed(seed=7).numpy(), superposed(seed=8).numpy()], axis=1)
    x = x + rng.normal(size=x.shape[1:])
    probe = fork_crosscoder_state(2, D_IN, D_SAE, max(code, 1), None)
    f = fork_encode(probe, x, "NONE")
    threshold = None if normalisation is None else float(midway(torch.tensor(f)))
    state = fork_crosscoder_state(2, D_IN, D_SAE, max(code, 1), threshold)
    torch.save(state, tmp_path / "model_final.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": "CrossCoder" if normalisation is None else "BatchTopKCrossCoder"}}))
    weights, _ = format_dictionary_learning.read(tmp_path)
    assert weights.arch == {"CROSSCODER": "batchtopk", None: "vanilla"}.get(normalisation,
                                                                          "jumprelu")
    expected = fork_encode(state, x, normalisation or "NONE")
    if normalisation is not None:
        assert_gates(torch.tensor(expected), torch.tensor(f))
    ours = weights.to_crosscoder().encode(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=1e-4, atol=1e-4)
    # the decoder maps back through the normaliser's inverse
    s = {key: value.double().numpy() for key, value in state.items()}
    x_hat = ((np.einsum("bh,lhd->bld", expected, s["decoder.weight"]) + s["decoder.bias"])
             / s["activation_global_scale"][None, :, None] + s["activation_mean"])
    np.testing.assert_allclose(weights.to_crosscoder().decode(ours).double().numpy(), x_hat,
                               rtol=1e-4, atol=1e-3)


def test_fork_batchtopk_sae_and_topk_autoencoder_import(tmp_path):
    g = torch.Generator().manual_seed(9)
    x = superposed()
    base = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
            "encoder.bias": torch.randn(D_SAE, generator=g) * 0.3,
            "decoder.weight": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
            "b_dec": torch.randn(D_IN, generator=g)}
    f = torch.relu((x - base["b_dec"]) @ base["encoder.weight"].T + base["encoder.bias"])
    # AutoEncoderTopK: k comes from the training config
    (tmp_path / "topk").mkdir()
    torch.save(base, tmp_path / "topk" / "ae.pt")
    with pytest.raises(FeaturestoreError, match="does not store k"):
        format_dictionary_learning.read(tmp_path / "topk")
    (tmp_path / "topk" / "config.json").write_text(json.dumps({"trainer": {"k": K}}))
    weights, described = format_dictionary_learning.read(tmp_path / "topk")
    assert described["dict_class"] == "AutoEncoderTopK"
    top = f.topk(K, dim=1)
    expected = torch.zeros_like(f).scatter_(1, top.indices, top.values)
    torch.testing.assert_close(featurestore_encode(weights, x), expected, rtol=1e-4, atol=1e-4)
    # BatchTopKSAE: the plain activation against one threshold, after the normaliser
    mean, scale = torch.randn(D_IN, generator=g), torch.tensor(0.7)
    state = {**base, "k": torch.tensor(K), "threshold": torch.tensor(0.0),
             "activation_mean": mean, "activation_std": torch.ones(D_IN),
             "activation_global_scale": scale, "target_rms": torch.tensor(1.0)}
    fn = torch.relu(((x - mean) * scale - base["b_dec"]) @ base["encoder.weight"].T
                    + base["encoder.bias"])
    state["threshold"] = midway(fn)
    (tmp_path / "batchtopk").mkdir()
    torch.save(state, tmp_path / "batchtopk" / "ae.pt")
    weights, described = format_dictionary_learning.read(tmp_path / "batchtopk")
    assert described["dict_class"] == "BatchTopKSAE"
    expected = fn * (fn > state["threshold"])
    assert_gates(expected, fn)
    torch.testing.assert_close(featurestore_encode(weights, x), expected, rtol=1e-4, atol=1e-4)


def test_pickles_that_need_code_are_refused_naming_the_file(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "ae.pt")
    with pytest.raises(FeaturestoreError, match=r"ae\.pt is not a state dict of tensors that "
                                                r"loads with weights_only=True"):
        format_dictionary_learning.read(tmp_path)
    (tmp_path / "ae.pt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(FeaturestoreError, match="ae.pt"):
        format_dictionary_learning.read(tmp_path)


def test_unknown_dictionary_learning_classes_are_refused(tmp_path):
    torch.save({"W_enc": torch.zeros(2, 2)}, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": "GatedAutoEncoder"}}))
    with pytest.raises(FeaturestoreError, match="dict_class 'GatedAutoEncoder' cannot be"):
        format_dictionary_learning.read(tmp_path)


def test_crosscoders_have_no_single_input_export(tmp_path):
    torch.manual_seed(0)
    model = CrossCoder(CrossCoderConfig(n_sources=2, d_model=8, d_hidden=16, arch="vanilla"))
    with pytest.raises(FeaturestoreError, match="over 2 sources has no single-input form"):
        format_saelens.write(DictionaryWeights.from_crosscoder(model), tmp_path, {})
    assert not Path(tmp_path / "cfg.json").exists()
