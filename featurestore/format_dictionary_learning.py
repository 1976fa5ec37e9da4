"""dictionary_learning dictionaries (saprmarks/dictionary_learning and the science-of-finetuning
fork with crosscoders): a torch state dict (ae.pt, model_final.pt, or model.safetensors) and,
beside it, the config.json its training wrote.

The dictionary class comes from config.json (trainer.dict_class) or, without one, from the state
dict's keys. What each class computes, x being [d] for an SAE and [layers, d] for a crosscoder:

    AutoEncoder          f = ReLU((x - bias) @ encoder.weight.T + encoder.bias)
    AutoEncoderNew       f = ReLU(x @ encoder.weight.T + encoder.bias)
    JumpReluAutoEncoder  pre = x @ W_enc + b_enc;  f = ReLU(pre) * (pre > threshold_i)
    AutoEncoderTopK      the k largest of ReLU((x - b_dec) @ encoder.weight.T + encoder.bias)
    BatchTopKSAE         f = ReLU((n(x) - b_dec) @ encoder.weight.T + encoder.bias), kept where
                         f > threshold
    CrossCoder           f = ReLU(sum_l n(x)_l @ encoder.weight[l] + encoder.bias)
    BatchTopKCrossCoder  the same f, kept where f * c_i > threshold; c_i the code normalisation
                         of latent i (by default the sum over layers of its decoder norms)

where n(x) = (x - activation_mean) * activation_global_scale when the state dict holds an
activation normaliser, and the decoder maps back through its inverse. Every one of these folds
exactly into featurestore's form (featurestore.dictionary_weights). Decoupled code normalisation
(one code per layer) and gated autoencoders do not, and are refused.

Weights are read from safetensors, or from .pt files with torch.load(weights_only=True): a file
that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from featurestore.dictionary_weights import (
    DictionaryWeights,
    as_float,
    load_tensors,
    read_config,
    require_keys,
)
from featurestore.errors import FeaturestoreError

CONFIG_FILE = "config.json"
# The files a dictionary_learning folder keeps its weights in, in the order looked for.
WEIGHT_FILES = ("ae.pt", "model_final.pt", "model.safetensors", "ae.safetensors")
CLASSES = ("AutoEncoder", "AutoEncoderNew", "JumpReluAutoEncoder", "AutoEncoderTopK",
           "BatchTopKSAE", "CrossCoder", "BatchTopKCrossCoder")
# CodeNormalization's values in the fork (an Enum of auto() values, stored as
# code_normalization_id): how a BatchTopK crosscoder weights a latent's activation before
# comparing it with its threshold.
CODE_NORMALISATIONS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
# The fork's defaults for the MIXED weights, which its state dicts do not store.
MIXED_ALPHA_SAE, MIXED_ALPHA_CC = 1.0, 0.1
NORMALISER_KEYS = ("activation_mean", "activation_std", "activation_global_scale")


def read(path: Path) -> tuple[DictionaryWeights, dict]:
    """(weights, a description with the class and the training config) of the dictionary in
    `path`: a folder, or its weights file."""
    weights_file = _weights_file(path)
    config = (read_config(weights_file.parent, CONFIG_FILE, "", ())
              if (weights_file.parent / CONFIG_FILE).is_file() else {})
    tensors = {key.removeprefix("_orig_mod."): value  # saved from a torch.compile'd model
               for key, value in load_tensors(weights_file, "dictionary_learning weights").items()}
    trainer = config.get("trainer", {}) if isinstance(config.get("trainer"), dict) else {}
    dict_class = trainer.get("dict_class") or _class_from_keys(tensors, weights_file)
    if dict_class not in CLASSES:
        raise FeaturestoreError(
            f"{weights_file.parent / CONFIG_FILE}: trainer.dict_class {dict_class!r} cannot be "
            f"imported (featurestore maps one linear encoder and one activation); supported: "
            f"{', '.join(CLASSES)}")
    what = f"a dictionary_learning {dict_class}"
    description = {"dict_class": dict_class, "file": weights_file.name, "config": config}
    if dict_class == "JumpReluAutoEncoder":
        require_keys(tensors, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), weights_file,
                     what)
        W_enc, b_enc = as_float(tensors["W_enc"]), as_float(tensors["b_enc"])
        W_dec, b_dec = as_float(tensors["W_dec"]), as_float(tensors["b_dec"])
        # Its apply_b_dec_to_input is not in the state dict: as saved by its own training, off.
        return _sae(W_enc, b_enc, W_dec, b_dec, "jumprelu",
                    threshold=as_float(tensors["threshold"])), description
    if dict_class in ("CrossCoder", "BatchTopKCrossCoder"):
        return _crosscoder(tensors, dict_class, config, weights_file), description
    encoder_keys = ("encoder.weight", "encoder.bias", "decoder.weight")
    require_keys(tensors, encoder_keys, weights_file, what)
    W_enc = as_float(tensors["encoder.weight"]).T.contiguous()
    b_enc = as_float(tensors["encoder.bias"])
    W_dec = as_float(tensors["decoder.weight"]).T.contiguous()
    if dict_class == "AutoEncoder":
        require_keys(tensors, ("bias",), weights_file, what)
        bias = as_float(tensors["bias"])
        return _sae(W_enc, b_enc - bias @ W_enc, W_dec, bias, "vanilla"), description
    if dict_class == "AutoEncoderNew":
        require_keys(tensors, ("decoder.bias",), weights_file, what)
        return _sae(W_enc, b_enc, W_dec, as_float(tensors["decoder.bias"]), "vanilla"), description
    require_keys(tensors, ("b_dec",), weights_file, what)
    b_dec = as_float(tensors["b_dec"])
    b_enc = b_enc - b_dec @ W_enc
    if dict_class == "AutoEncoderTopK":
        k = tensors["k"].item() if "k" in tensors else trainer.get("k")
        if not isinstance(k, int):
            raise FeaturestoreError(
                f"{weights_file}: an AutoEncoderTopK state dict does not store k, and there is "
                f"no trainer.k in {weights_file.parent / CONFIG_FILE}; put the config.json its "
                "training wrote beside the weights")
        return _sae(W_enc, b_enc, W_dec, b_dec, "topk", k=int(k)), description
    # BatchTopKSAE: kept where the plain activation passes the threshold.
    require_keys(tensors, ("threshold",), weights_file, what)
    scale, mean = _normaliser(tensors, W_enc.shape[0], 1, weights_file)
    threshold = float(tensors["threshold"])
    weights = _sae(W_enc, b_enc - scale[0] * (mean[0] @ W_enc), W_dec,
                   b_dec + scale[0] * mean[0], "jumprelu",
                   threshold=torch.full((W_enc.shape[1],), max(threshold, 0.0)))
    weights.norm_scales = scale
    description["warnings"] = _threshold_warnings(threshold)
    return weights, description


def _sae(W_enc, b_enc, W_dec, b_dec, arch, k=None, threshold=None) -> DictionaryWeights:
    """One-source weights from W_enc [d, h], W_dec [h, d]."""
    return DictionaryWeights(W_enc=W_enc[None], b_enc=b_enc, W_dec=W_dec[:, None, :],
                             b_dec=b_dec[None], arch=arch, k=k, threshold=threshold)


def _crosscoder(tensors, dict_class: str, config: dict, weights_file: Path) -> DictionaryWeights:
    require_keys(tensors, ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"),
                 weights_file, f"a dictionary_learning {dict_class}")
    W_enc = as_float(tensors["encoder.weight"])  # [layers, d, h]
    b_enc = as_float(tensors["encoder.bias"])
    W_dec = as_float(tensors["decoder.weight"]).permute(1, 0, 2).contiguous()  # [h, layers, d]
    b_dec = as_float(tensors["decoder.bias"])  # [layers, d]
    layers, d_model, _ = W_enc.shape
    if W_dec.shape[1] != layers:
        raise FeaturestoreError(
            f"{weights_file}: the decoder writes {W_dec.shape[1]} layers and the encoder reads "
            f"{layers}; featurestore imports crosscoders that reconstruct what they read")
    scale, mean = _normaliser(tensors, d_model, layers, weights_file)
    # n(x)_l = (x_l - mean_l) * g_l: with norm_scales g, the mean goes into both biases.
    b_enc = b_enc - torch.einsum("ld,ldh->h", scale[:, None] * mean, W_enc)
    b_dec = b_dec + scale[:, None] * mean
    weights = DictionaryWeights(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                                arch="vanilla", norm_scales=scale)
    if dict_class == "CrossCoder":
        return weights
    threshold = float(tensors["threshold"].reshape(-1)[0]) if "threshold" in tensors else None
    if threshold is None or tensors["threshold"].numel() != 1:
        raise FeaturestoreError(
            f"{weights_file}: a BatchTopKCrossCoder needs one scalar threshold; a threshold per "
            "layer means decoupled code normalisation (one code per layer), which has no "
            "featurestore counterpart")
    normalisation = _code_normalisation(tensors, config)
    norms = W_dec.norm(dim=-1)  # [h, layers], in the normalised units the code lives in
    if threshold < 0:  # never learned: the package keeps every ReLU activation
        return weights
    if normalisation == "CROSSCODER":
        weights.arch, weights.threshold = "batchtopk", torch.tensor(threshold)
        weights.k = int(tensors["k"]) if "k" in tensors else None
        return weights
    if normalisation == "DECOUPLED":
        raise FeaturestoreError(
            f"{weights_file}: code_normalization DECOUPLED keeps one code per layer, which has "
            "no featurestore counterpart")
    weight = {"SAE": norms.pow(2).sum(dim=1).sqrt(),
              "NONE": torch.ones(norms.shape[0]),
              "MIXED": MIXED_ALPHA_SAE * norms.pow(2).sum(dim=1).sqrt()
              + MIXED_ALPHA_CC * norms.sum(dim=1)}[normalisation]
    # f * c_i > t  <=>  pre > t / c_i for c_i > 0; a latent with c_i = 0 never passes.
    weights.arch = "jumprelu"
    weights.threshold = torch.where(weight > 0, threshold / weight.clamp_min(1e-30),
                                    torch.full_like(weight, float("inf")))
    return weights


def _normaliser(tensors, d_model: int, layers: int, weights_file: Path
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(global scale [layers], mean [layers, d]) of the activation normaliser; (1, 0) if the
    state dict has none (its buffers absent or NaN, as the package's own check says)."""
    present = [key for key in NORMALISER_KEYS if key in tensors]
    if not present or any(torch.isnan(tensors[key]).any() for key in present):
        return torch.ones(layers), torch.zeros(layers, d_model)
    if len(present) != len(NORMALISER_KEYS):
        absent = sorted(set(NORMALISER_KEYS) - set(present))
        raise FeaturestoreError(
            f"{weights_file}: the activation normaliser is incomplete: it has "
            f"{', '.join(present)} but not {', '.join(absent)}")
    scale = as_float(tensors["activation_global_scale"]).reshape(layers)
    mean = as_float(tensors["activation_mean"]).reshape(layers, d_model)
    return scale, mean


def _code_normalisation(tensors, config: dict) -> str:
    if "code_normalization_id" in tensors:
        value = int(tensors["code_normalization_id"])
        if value not in CODE_NORMALISATIONS:
            raise FeaturestoreError(f"code_normalization_id {value} is not one of "
                                    f"{CODE_NORMALISATIONS}")
        return CODE_NORMALISATIONS[value]
    # Saved before the id was stored: the fork's loader assumes CROSSCODER.
    named = config.get("code_normalization") or config.get("trainer", {}).get(
        "code_normalization")
    return str(named).upper() if named else "CROSSCODER"


def _threshold_warnings(threshold: float) -> list[str]:
    if threshold >= 0:
        return []
    return ["the BatchTopK threshold was never learned (it is negative), so the dictionary "
            "keeps every positive activation, as the package's own encode does"]


def _class_from_keys(tensors: dict, weights_file: Path) -> str:
    keys = set(tensors)
    if {"W_enc", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    if "encoder.weight" in keys and tensors["encoder.weight"].dim() == 3:
        return "BatchTopKCrossCoder" if "threshold" in keys else "CrossCoder"
    if "bias" in keys:
        return "AutoEncoder"
    if "decoder.bias" in keys:
        return "AutoEncoderNew"
    if {"k", "threshold"} <= keys:
        return "BatchTopKSAE"
    if "b_dec" in keys:
        return "AutoEncoderTopK"
    raise FeaturestoreError(
        f"{weights_file}: the tensors ({', '.join(sorted(keys))}) match no dictionary_learning "
        f"class; put the config.json its training wrote (trainer.dict_class) beside the weights")


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FeaturestoreError(f"--path {path} does not exist")
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(p.name for p in path.iterdir()
                        if p.suffix in (".pt", ".pth", ".safetensors"))
    if len(candidates) == 1:
        return path / candidates[0]
    raise FeaturestoreError(
        f"--path {path}: found {'no weights file' if not candidates else ', '.join(candidates)}"
        f"; give the weights file itself (looked for {', '.join(WEIGHT_FILES)})")

