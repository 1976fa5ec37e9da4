"""A dictionary's weights in featurestore's terms, the meeting point of every outside format.

Each format (SAELens, sparsify, dictionary_learning) writes its encoder in its own way: some
subtract the decoder bias before encoding, some normalise the input, some scale activations by
decoder norms. Every one of those is an affine map of the input followed by one nonlinearity, so
each reader folds them into this single form, the one featurestore's crosscoder computes:

    pre[h]   = sum_s (x[s] * norm_scale[s]) @ W_enc[s] + b_enc
    f        = ReLU(pre) kept by the arch's rule (all, top k per token, pre > threshold_i, or a
               BatchTopK score above its learned threshold)
    x_hat[s] = (f @ W_dec[:, s] + b_dec[s]) / norm_scale[s]

and each writer unfolds this form into its format. Folding is exact algebra; the encodings differ
from the other tool's only by float rounding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featurestore.crosscoder import CrossCoder, CrossCoderConfig
from featurestore.errors import FeaturestoreError
from featurestore.file_formats import require_safetensors, starts_with

# What an imported dictionary may be, in featurestore's architectures.
IMPORTED_ARCHS = ("vanilla", "topk", "jumprelu", "batchtopk")


@dataclass
class DictionaryWeights:
    W_enc: torch.Tensor  # [n_sources, d_model, d_hidden]
    b_enc: torch.Tensor  # [d_hidden]
    W_dec: torch.Tensor  # [d_hidden, n_sources, d_model]
    b_dec: torch.Tensor  # [n_sources, d_model]
    arch: str  # one of IMPORTED_ARCHS
    k: int | None = None  # topk: latents kept per token; batchtopk: k it was trained with
    # jumprelu: one threshold per latent on the pre-activation; batchtopk: the scalar threshold
    # on the activation times the latent's summed decoder norms.
    threshold: torch.Tensor | None = None
    norm_scales: torch.Tensor | None = None  # [n_sources]; None: 1 (original units)
    source_labels: tuple[str, ...] = field(default=())

    @property
    def n_sources(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_hidden(self) -> int:
        return self.W_enc.shape[2]

    def to_crosscoder(self, source_labels: tuple[str, ...] = ()) -> CrossCoder:
        """The equivalent featurestore crosscoder (an SAE when there is one source)."""
        labels = source_labels or self.source_labels
        config = CrossCoderConfig(
            n_sources=self.n_sources, d_model=self.d_model, d_hidden=self.d_hidden,
            arch=self.arch, k=self.k or 1, aux_k=0, source_labels=tuple(labels))
        model = CrossCoder(config, self.norm_scales)
        with torch.no_grad():
            model.W_enc.copy_(self.W_enc)
            model.b_enc.copy_(self.b_enc)
            model.W_dec.copy_(self.W_dec)
            model.b_dec.copy_(self.b_dec)
            if self.arch == "jumprelu":
                # exp(log t) returns t to within rounding; a zero threshold stays zero (-inf).
                model.log_threshold.copy_(self.threshold.log())
            elif self.arch == "batchtopk":
                model.threshold.fill_(float(self.threshold))
        return model.eval()

    @classmethod
    def from_crosscoder(cls, model: CrossCoder) -> DictionaryWeights:
        """A featurestore crosscoder's weights (designated shared latents expanded per source)."""
        config = model.config
        arch = config.arch
        threshold = None
        if arch == "jumprelu":
            threshold = model.log_threshold.detach().exp()
        elif arch in ("batchtopk", "matryoshka"):
            # Matryoshka encodes exactly as BatchTopK does; the nesting only shaped training.
            arch = "batchtopk"
            threshold = model.threshold.detach().clone()
        return cls(W_enc=model.W_enc.detach().clone(), b_enc=model.b_enc.detach().clone(),
                   W_dec=model.decoder().detach().clone(), b_dec=model.b_dec.detach().clone(),
                   arch=arch, k=config.k if arch in ("topk", "batchtopk") else None,
                   threshold=threshold, norm_scales=model.norm_scales.detach().clone(),
                   source_labels=config.source_labels)

    def in_original_units(self) -> DictionaryWeights:
        """The same dictionary with norm_scales folded into the weights (norm_scales = 1), for
        formats without an input scale. BatchTopK's score uses the decoder norms, which the
        folding changes, so its threshold becomes per latent: a JumpReLU with the same code."""
        if self.n_sources != 1:
            raise FeaturestoreError(
                f"a crosscoder over {self.n_sources} sources has no single-input form")
        scale = 1.0 if self.norm_scales is None else float(self.norm_scales[0])
        weights = DictionaryWeights(
            W_enc=self.W_enc * scale, b_enc=self.b_enc.clone(), W_dec=self.W_dec / scale,
            b_dec=self.b_dec / scale, arch=self.arch, k=self.k, threshold=self.threshold,
            norm_scales=None, source_labels=self.source_labels)
        if self.arch == "batchtopk":
            # ReLU(pre) * ||W_dec_i|| > t  <=>  pre > t / ||W_dec_i|| (a latent with a zero
            # decoder never scores above t: an infinite threshold keeps it off).
            norms = self.W_dec.norm(dim=-1).sum(dim=1)
            per_latent = torch.where(norms > 0, self.threshold / norms.clamp_min(1e-30),
                                     torch.full_like(norms, math.inf))
            weights.arch, weights.threshold, weights.k = "jumprelu", per_latent, None
        return weights


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a torch .pt/.pth state dict loaded with
    weights_only=True (no code runs); anything else is refused, naming the file."""
    if not path.is_file():
        raise FeaturestoreError(f"{what}: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        require_safetensors(path, f"{what} {path}")
        return load_file(path)
    if path.suffix not in (".pt", ".pth"):
        raise FeaturestoreError(
            f"{what} {path}: featurestore reads weights from .safetensors, or from .pt/.pth "
            "state dicts of tensors only")
    import pickle

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise FeaturestoreError(
            f"{what} {path} is not a state dict of tensors that loads with weights_only=True "
            f"({starts_with(path)}; {first_line}). featurestore never runs pickled code: save "
            "the model's state_dict() with torch.save or safetensors") from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor)
                                               for v in loaded.values()):
        raise FeaturestoreError(
            f"{what} {path} holds a {type(loaded).__name__}, not a state dict of tensors: save "
            "model.state_dict()")
    return loaded


def require_keys(tensors: dict[str, torch.Tensor], keys: tuple[str, ...], path: Path,
                 what: str) -> None:
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise FeaturestoreError(
            f"{path}: {what} needs the tensors {', '.join(keys)}; missing "
            f"{', '.join(missing)} (it has {', '.join(sorted(tensors)) or 'none'})")


def as_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float32).clone()


def read_config(folder: Path, name: str, missing: str, integers: tuple[str, ...]) -> dict:
    """The JSON config `name` in `folder`; `missing` says what the folder should hold when it is
    not there, and the `integers` fields must be integers."""
    file = folder / name
    if not file.is_file():
        raise FeaturestoreError(f"--path {folder}: no {name}; {missing}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise FeaturestoreError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise FeaturestoreError(f"{file} holds a JSON {type(config).__name__}, not an object")
    for key in integers:
        if not isinstance(config.get(key), int):
            raise FeaturestoreError(f"{file}: field {key!r} must be an integer, got "
                                    f"{config.get(key)!r}")
    return config


def write_folder(out: Path, tensors: dict[str, torch.Tensor], weights_name: str, config: dict,
                 config_name: str) -> None:
    """A format's folder: the tensors as float32 safetensors and the config as JSON."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({key: t.detach().to(torch.float32).contiguous() for key, t in tensors.items()},
              out / weights_name)
    (out / config_name).write_text(json.dumps(config, indent=2))
