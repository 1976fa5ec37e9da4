"""SAELens dictionaries: a folder with cfg.json and sae_weights.safetensors.

What SAELens's inference SAEs compute (sae_lens.saes, version 6):

    sae_in = x - b_dec            if cfg.apply_b_dec_to_input, else x
    pre    = sae_in @ W_enc + b_enc
    standard   f = ReLU(pre)
    topk       f = ReLU(top k of pre per token), pre first multiplied by ||W_dec_i|| when
               cfg.rescale_acts_by_decoder_norm (and f divided by it again before decoding)
    jumprelu   f = ReLU(pre) * (pre > threshold_i)
    x_hat  = f @ W_dec + b_dec

A training SAE saved with save_model keeps its training form: `batchtopk` and
`matryoshka_batchtopk` hold a scalar topk_threshold, which SAELens turns into a JumpReLU with that
threshold for every latent when it saves the inference model; so does this reader.

Input normalisations that depend on the token (constant_norm_rescale, layer_norm) are not an
affine map and are refused, as are architectures with a second encoder path (gated) or another
output than the input (transcoders).
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
    write_folder,
)
from featurestore.errors import FeaturestoreError

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# SAELens architectures this reader maps, to featurestore's.
ARCHITECTURES = {"standard": "vanilla", "topk": "topk", "jumprelu": "jumprelu",
                 "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}
# normalize_activations values that leave the input as it is at inference. SAELens folds the
# "expected_average_only_in" factor into the weights when it saves a trained SAE, and its
# inference SAEs do nothing for it at run time; this reader does the same.
IDENTITY_NORMALISATIONS = ("none", "expected_average_only_in")
SAELENS_FORMAT_VERSION = "6.0.0"


def read(path: Path) -> tuple[DictionaryWeights, dict]:
    """(weights, the SAELens config) of the SAE saved in folder `path`."""
    config = read_config(path, CONFIG_FILE, f"a SAELens SAE folder holds {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE} (what SAE.save_model writes)", ("d_in", "d_sae"))
    architecture = config.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise FeaturestoreError(
            f"{path / CONFIG_FILE}: architecture {architecture!r} cannot be mapped to a "
            f"featurestore dictionary (one linear encoder and one activation); supported: "
            f"{', '.join(ARCHITECTURES)}")
    for field, allowed in (("normalize_activations", IDENTITY_NORMALISATIONS),
                           ("reshape_activations", ("none",))):
        value = config.get(field, "none")
        if value not in allowed:
            raise FeaturestoreError(
                f"{path / CONFIG_FILE}: {field} = {value!r} is not supported (it changes each "
                f"token differently, which no fixed input scale reproduces); supported: "
                f"{', '.join(allowed)}")
    if config.get("finetuning_scaling_factor"):
        raise FeaturestoreError(
            f"{path / CONFIG_FILE}: finetuning_scaling_factor = true is not supported; fold the "
            "scaling factor into W_dec and save again")
    tensors = load_tensors(path / WEIGHTS_FILE, "SAELens weights")
    require_keys(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), path / WEIGHTS_FILE,
                 f"a SAELens {architecture} SAE")
    W_enc, b_enc = as_float(tensors["W_enc"]), as_float(tensors["b_enc"])
    W_dec, b_dec = as_float(tensors["W_dec"]), as_float(tensors["b_dec"])
    d_in, d_sae = W_enc.shape
    if (d_in, d_sae) != (config["d_in"], config["d_sae"]) or W_dec.shape != (d_sae, d_in):
        raise FeaturestoreError(
            f"{path}: W_enc {tuple(W_enc.shape)} and W_dec {tuple(W_dec.shape)} do not match "
            f"d_in = {config['d_in']}, d_sae = {config['d_sae']} in {CONFIG_FILE}")
    if config.get("apply_b_dec_to_input", True):
        # (x - b_dec) @ W_enc + b_enc = x @ W_enc + (b_enc - b_dec @ W_enc)
        b_enc = b_enc - b_dec @ W_enc
    arch = ARCHITECTURES[architecture]
    threshold, k = None, None
    if architecture in ("topk", "batchtopk", "matryoshka_batchtopk") and config.get(
            "rescale_acts_by_decoder_norm", architecture != "topk"):
        # Selecting on pre * ||W_dec_i|| and decoding f / ||W_dec_i|| is the same code as an
        # encoder scaled by the norms and a unit-norm decoder.
        norms = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    if architecture == "topk":
        k = int(config["k"])
    elif architecture == "jumprelu":
        require_keys(tensors, ("threshold",), path / WEIGHTS_FILE, "a SAELens jumprelu SAE")
        threshold = as_float(tensors["threshold"])
    elif arch == "jumprelu":  # a BatchTopK training SAE: its threshold for every latent
        require_keys(tensors, ("topk_threshold",), path / WEIGHTS_FILE,
                     f"a SAELens {architecture} SAE")
        threshold = torch.full((d_sae,), float(tensors["topk_threshold"]))
    weights = DictionaryWeights(W_enc=W_enc[None], b_enc=b_enc, W_dec=W_dec[:, None, :],
                                b_dec=b_dec[None], arch=arch, k=k, threshold=threshold)
    return weights, config


def write(weights: DictionaryWeights, out: Path, metadata: dict) -> None:
    """Write `weights` (one source) as a SAELens inference SAE that SAE.load_from_disk reads."""
    weights = weights.in_original_units()
    architecture = {"vanilla": "standard", "topk": "topk", "jumprelu": "jumprelu"}[weights.arch]
    d_model, d_hidden = weights.d_model, weights.d_hidden
    config = {"architecture": architecture, "d_in": d_model, "d_sae": d_hidden,
              "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
              "normalize_activations": "none", "reshape_activations": "none",
              # The config layout of SAELens 6, whose loader reads older layouts differently.
              "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, **metadata}}
    tensors = {"W_enc": weights.W_enc[0], "b_enc": weights.b_enc,
               "W_dec": weights.W_dec[:, 0, :], "b_dec": weights.b_dec[0]}
    if architecture == "topk":
        config.update(k=weights.k, rescale_acts_by_decoder_norm=False)
    elif architecture == "jumprelu":
        tensors["threshold"] = weights.threshold
    write_folder(out, tensors, WEIGHTS_FILE, config, CONFIG_FILE)

