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
WEIGHTS_FILE = "sae.safetensors"


def read(path: Path) -> tuple[DictionaryWeights, dict]:
    """(weights, the sparsify config) of the sparse coder saved in folder `path`."""
    config = read_config(path, CONFIG_FILE,
                         f"a sparsify sparse-coder folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                         "(what SparseCoder.save_to_disk writes; for a model trained on several "
                         "hookpoints, give the hookpoint's folder)", ("d_in", "k"))
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
    write_folder(out, tensors, WEIGHTS_FILE, config, CONFIG_FILE)

