"""EleutherAI sparsify dictionaries: a folder with cfg.json and sae.safetensors.

What sparsify's SparseCoder computes (version 1.x):

    pre = ReLU((x - b_dec) @ encoder.weight.T + encoder.bias)
    f   = the k largest of pre per token (activation "topk"), the others 0
    x_hat = f @ W_dec + b_dec

A transcoder (cfg.transcode), a skip connection (cfg.skip_connection, a second path from input to
output) and the "groupmax" activation have no counterpart in featurestore and are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from featurestore.dictionary_weights import (
    DictionaryWeights,
    as_float,
    load_tensors,
    require_keys,
)
from featurestore.errors import FeaturestoreError

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def read(path: Path) -> tuple[DictionaryWeights, dict]:
    """(weights, the sparsify config) of the sparse coder saved in folder `path`."""
    config = _read_config(path)
    for field, supported in (("activation", "topk"), ("transcode", False),
                             ("skip_connection", False)):
        value = config.get(field, supported)
        if value != supported:
            raise FeaturestoreError(
                f"{path / CONFIG_FILE}: {field} = {json.dumps(value)} has no featurestore "
                f"counterpart; only sparse coders with {field} = {json.dumps(supported)} can "
                "be imported")
    tensors = load_tensors(path / WEIGHTS_FILE, "sparsify weights")
    require_keys(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"),
                 path / WEIGHTS_FILE, "a sparsify sparse coder")
    encoder, bias = as_float(tensors["encoder.weight"]), as_float(tensors["encoder.bias"])
    W_dec, b_dec = as_float(tensors["W_dec"]), as_float(tensors["b_dec"])
    n_latents, d_in = encoder.shape
    if d_in != config["d_in"] or W_dec.shape != (n_latents, d_in):
        raise FeaturestoreError(
            f"{path}: encoder.weight {tuple(encoder.shape)} and W_dec {tuple(W_dec.shape)} do "
            f"not match d_in = {config['d_in']} in {CONFIG_FILE}")
    W_enc = encoder.T
    # (x - b_dec) @ W_enc + bias = x @ W_enc + (bias - b_dec @ W_enc)
    weights = DictionaryWeights(W_enc=W_enc[None].contiguous(), b_enc=bias - b_dec @ W_enc,
                                W_dec=W_dec[:, None, :], b_dec=b_dec[None], arch="topk",
                                k=int(config["k"]))
    return weights, config


def write(weights: DictionaryWeights, out: Path) -> None:
    """Write a TopK `weights` (one source) as a sparse coder SparseCoder.load_from_disk reads."""
    from safetensors.torch import save_file

    weights = weights.in_original_units()
    if weights.arch != "topk":
        raise FeaturestoreError(
            f"--format sparsify: sparsify encodes with per-token TopK only, and this basis is "
            f"{weights.arch}; export it with --format saelens, which has that architecture")
    W_enc, b_dec = weights.W_enc[0], weights.b_dec[0]
    config = {"activation": "topk", "num_latents": weights.d_hidden, "k": weights.k,
              "normalize_decoder": False, "multi_topk": False, "skip_connection": False,
              "transcode": False, "d_in": weights.d_model}
    # sparsify subtracts b_dec before encoding: its bias is ours plus b_dec @ W_enc.
    tensors = {"encoder.weight": W_enc.T, "encoder.bias": weights.b_enc + b_dec @ W_enc,
               "W_dec": weights.W_dec[:, 0, :], "b_dec": b_dec}
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().to(torch.float32).contiguous() for name, t in tensors.items()},
              out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FeaturestoreError(
            f"--path {path}: no {CONFIG_FILE}; a sparsify sparse-coder folder holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE} (what SparseCoder.save_to_disk writes; for a "
            "model trained on several hookpoints, give the hookpoint's folder)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise FeaturestoreError(f"{file} is not valid JSON: {error}") from None
    for field in ("d_in", "k"):
        if not isinstance(config.get(field), int):
            raise FeaturestoreError(f"{file}: field {field!r} must be an integer, got "
                                    f"{config.get(field)!r}")
    return config
