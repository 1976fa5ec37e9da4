"""Any nn.Module as a run: a factory that builds it, safetensors weights, and an adapter file.

A custom model is rebuilt from three things, stored together in runs.model_config:

    factory   'package.module:function' (importable) or '/abs/path/model.py:function'
    config    the JSON object the factory is called with: factory(config) -> nn.Module
    adapter   where the stages and the lineage components live in the built module

The module's forward takes token ids [batch, seq] and returns logits [batch, seq, vocab] (or an
object with .logits). Weights are safetensors state dicts, loaded with every key required:
nothing is unpickled.

The adapter file is JSON. Module paths are dotted names as in `model.named_modules()`, with
'{i}' standing for the block index; a site is 'module.path:input' or 'module.path:output' (the
port defaults to output):

    {
      "n_layers": 2,                              blocks; block n_layers must not exist
      "n_heads": 4,                               attention heads per block
      "token_embedding": "embedding",             the nn.Embedding of token ids
      "block": "layers.{i}",                      block i; its output is layer_{i}_post_mlp
      "embed": "layers.0:input",                  the residual stream entering block 0
      "post_attn": "layers.{i}.norm2:input",      the residual after attention; null if none
      "mlp_hidden": "layers.{i}.ffn.act:output",  the MLP's activations after the nonlinearity
      "final_norm": "norm:output",                what the unembedding reads
      "attn_out": "layers.{i}.attn.out",          attention's output Linear (heads side by side)
      "mlp_out": "layers.{i}.ffn.out",            the MLP's output Linear (reads mlp_hidden)
      "final_norm_kind": "layernorm",             layernorm or rmsnorm
      "unembed": "readout",                       the Linear from final_norm to the logits
      "parallel_residual": false                  optional: attention and MLP read one residual
    }

The adapter becomes a stages.Family named 'custom', so every stage name and every job that
reads or patches a stage works on the model as on the built-in families.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurestore.errors import CorruptCheckpointError, FeaturestoreError
from featurestore.stages import Family, Site, StageReader

if TYPE_CHECKING:
    import torch

FAMILY_NAME = "custom"
SITE_FIELDS = ("embed", "post_attn", "mlp_hidden", "final_norm")  # also --stage overrides
_PER_BLOCK = ("block", "post_attn", "mlp_hidden", "attn_out", "mlp_out")  # must hold '{i}'
_MODULE_KEYS = ("token_embedding", "block", "embed", "post_attn", "mlp_hidden", "final_norm",
                "attn_out", "mlp_out", "unembed")  # a module path (a site: path plus port)
_REQUIRED = ("n_layers", "n_heads", *_MODULE_KEYS, "final_norm_kind")
_OPTIONAL = ("parallel_residual",)
_PORTS = ("input", "output")


@dataclass(frozen=True)
class Adapter:
    """Where the stages and the lineage components of a custom model are (see the module doc)."""

    n_layers: int
    n_heads: int
    token_embedding: str
    block: str
    embed: Site
    post_attn: Site | None
    mlp_hidden: Site
    final_norm: Site
    attn_out: str
    mlp_out: str
    final_norm_kind: str
    unembed: str
    parallel_residual: bool = False

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Adapter:
        """Parse the adapter's JSON object; `source` names it in errors (a file or a flag)."""
        if not isinstance(data, dict):
            raise FeaturestoreError(f"{source}: the adapter must be a JSON object")
        unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise FeaturestoreError(f"{source}: unknown adapter key {', '.join(unknown)}; keys: "
                                    f"{', '.join(_REQUIRED + _OPTIONAL)}")
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise FeaturestoreError(f"{source}: the adapter lacks {', '.join(missing)} (use null "
                                    "for a post_attn the model does not have)")
        for key in ("n_layers", "n_heads"):
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 1:
                raise FeaturestoreError(f"{source}: {key} must be a positive integer, "
                                        f"got {data[key]!r}")
        if data["final_norm_kind"] not in ("layernorm", "rmsnorm"):
            raise FeaturestoreError(f"{source}: final_norm_kind must be layernorm or rmsnorm, "
                                    f"got {data['final_norm_kind']!r}")
        parallel = data.get("parallel_residual", False)
        if not isinstance(parallel, bool):
            raise FeaturestoreError(f"{source}: parallel_residual must be true or false")
        for key in _MODULE_KEYS:
            if key == "post_attn" and data[key] is None:
                continue
            if not isinstance(data[key], str) or not data[key]:
                raise FeaturestoreError(f"{source}: {key} must be a module path string")
            per_block = "{i}" in data[key]
            if per_block != (key in _PER_BLOCK):
                raise FeaturestoreError(
                    f"{source}: {key} {data[key]!r} " + ("needs '{i}' for the block index, e.g. "
                                                         "'layers.{i}...'" if key in _PER_BLOCK
                                                         else "is one module: no '{i}'"))
        return cls(
            n_layers=data["n_layers"], n_heads=data["n_heads"],
            token_embedding=data["token_embedding"], block=data["block"],
            embed=parse_site(data["embed"], f"{source}: embed"),
            post_attn=(None if data["post_attn"] is None
                       else parse_site(data["post_attn"], f"{source}: post_attn")),
            mlp_hidden=parse_site(data["mlp_hidden"], f"{source}: mlp_hidden"),
            final_norm=parse_site(data["final_norm"], f"{source}: final_norm"),
            attn_out=data["attn_out"], mlp_out=data["mlp_out"],
            final_norm_kind=data["final_norm_kind"], unembed=data["unembed"],
            parallel_residual=parallel,
        )

    def to_dict(self) -> dict:
        """The adapter's JSON form, as from_dict reads it."""
        def site(value: Site | None) -> str | None:
            return None if value is None else f"{value.module}:{value.port}"

        return {
            "n_layers": self.n_layers, "n_heads": self.n_heads,
            "token_embedding": self.token_embedding, "block": self.block,
            "embed": site(self.embed), "post_attn": site(self.post_attn),
            "mlp_hidden": site(self.mlp_hidden), "final_norm": site(self.final_norm),
            "attn_out": self.attn_out, "mlp_out": self.mlp_out,
            "final_norm_kind": self.final_norm_kind, "unembed": self.unembed,
            "parallel_residual": self.parallel_residual,
        }

    def family(self) -> Family:
        return Family(
            name=FAMILY_NAME, token_embedding=self.token_embedding, block=self.block,
            embed=self.embed, post_attn=self.post_attn, mlp_hidden=self.mlp_hidden,
            final_norm=self.final_norm, attn_out=self.attn_out, mlp_out=self.mlp_out,
            final_norm_kind=self.final_norm_kind, unembed=self.unembed,
        )

    def module_paths(self) -> list[tuple[str, str]]:
        """(adapter key, concrete module path) of every module the adapter names."""
        paths = []
        for key in _MODULE_KEYS:
            value = getattr(self, key)
            if value is None:  # a post_attn the model does not have
                continue
            path = value.module if isinstance(value, Site) else value
            layers = range(self.n_layers) if "{i}" in path else [0]
            paths += [(key, path.format(i=i)) for i in layers]
        return paths


def parse_site(text: str, source: str) -> Site:
    """'module.path:input', 'module.path:output' or 'module.path' (the output)."""
    module, _, port = text.rpartition(":") if ":" in text else (text, "", "output")
    if port not in _PORTS or not module:
        raise FeaturestoreError(f"{source}: {text!r} is not a site; write module.path:input or "
                                "module.path:output")
    return Site(module, port)


def apply_stage_overrides(adapter: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """The adapter's JSON object with --stage NAME=module.path[:input|output] overrides applied
    (NAME one of embed, post_attn, mlp_hidden, final_norm)."""
    adapter = dict(adapter)
    for text in overrides:
        name, _, site = text.partition("=")
        if name not in SITE_FIELDS or not site:
            raise FeaturestoreError(f"--stage {text!r}: write NAME=module.path[:input|output] "
                                    f"with NAME one of {', '.join(SITE_FIELDS)}")
        adapter[name] = site
    return adapter


def read_json_file(path: str | Path, flag: str) -> Any:
    file = Path(path).expanduser()
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise FeaturestoreError(f"{flag} {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeaturestoreError(f"{flag} {path}: not valid JSON ({error})") from None


def normalise_factory(text: str) -> str:
    """'package.module:function' as given, or 'path/to/model.py:function' with the file made
    absolute (so later jobs, run from anywhere, find it)."""
    target, _, function = text.rpartition(":")
    if not target or not function.isidentifier():
        raise FeaturestoreError(f"--factory {text!r}: write package.module:function or "
                                "path/to/model.py:function")
    if target.endswith(".py"):
        file = Path(target).expanduser().resolve()
        if not file.is_file():
            raise FeaturestoreError(f"--factory {text!r}: no such file {file}")
        return f"{file}:{function}"
    return text


def load_factory(factory: str):
    """The function `factory` names (see normalise_factory), imported."""
    target, _, function = factory.rpartition(":")
    if target.endswith(".py"):
        # A unique module name per file, so two model files called model.py do not collide.
        name = "featurestore_custom_" + hashlib.sha1(target.encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and typing look their module up here
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[name]
            raise FeaturestoreError(f"--factory {factory}: importing {target} raised "
                                    f"{type(error).__name__}: {error}") from error
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise FeaturestoreError(
                f"--factory {factory}: cannot import {target!r} ({error}). Install its package "
                "(pip install -e .), add its folder to PYTHONPATH, or name the file: --factory "
                f"path/to/model.py:{function}") from None
    if not callable(getattr(module, function, None)):
        raise FeaturestoreError(f"--factory {factory}: {target} has no function {function!r}")
    return getattr(module, function)


@dataclass(frozen=True)
class CustomModel:
    """Everything that rebuilds a custom model but its weights: runs.model_config of the run."""

    factory: str
    config: dict
    adapter: Adapter

    def to_json(self) -> dict:
        return {"factory": self.factory, "config": self.config,
                "adapter": self.adapter.to_dict()}

    @classmethod
    def from_json(cls, data: dict) -> CustomModel:
        return cls(data["factory"], data["config"],
                   Adapter.from_dict(data["adapter"], "runs.model_config adapter"))

    def build(self) -> torch.nn.Module:
        """factory(config), with random weights."""
        import torch

        function = load_factory(self.factory)
        try:
            module = function(self.config)
        except Exception as error:
            raise FeaturestoreError(
                f"--factory {self.factory} raised {type(error).__name__}: {error} (it is called "
                "with the --config JSON object)") from error
        if not isinstance(module, torch.nn.Module):
            raise FeaturestoreError(f"--factory {self.factory} returned a "
                                    f"{type(module).__name__}, not a torch.nn.Module")
        return module

    def load(self, weights: str | Path, module: torch.nn.Module | None = None) -> torch.nn.Module:
        """The built module (or `module`) with the weights of a safetensors file, every key
        required and none left over."""
        module = self.build() if module is None else module
        load_weights(module, Path(weights))
        return module.eval()

    def reader(self, weights: str | Path) -> StageReader:
        return StageReader(self.load(weights), self.adapter.family(), self.adapter.n_layers,
                           parallel_residual=self.adapter.parallel_residual,
                           n_heads=self.adapter.n_heads)


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a safetensors state dict into `module` in place, strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not path.is_file():
        raise CorruptCheckpointError(f"weights file {path} does not exist")
    try:
        # load_model, unlike load_state_dict, knows tied weights saved once (save_model).
        missing, unexpected = load_model(module, path, strict=False)
    except SafetensorError as error:
        raise CorruptCheckpointError(f"weights file {path} is not a safetensors file ({error}); "
                                     "save it with safetensors.torch.save_file") from None
    except RuntimeError as error:  # shapes that differ from the module's
        raise FeaturestoreError(f"weights file {path} does not fit the module the factory "
                                f"built: {error}") from None
    if missing or unexpected:
        raise FeaturestoreError(
            f"weights file {path} does not match the module the factory built: "
            f"missing {_some(missing)}; unexpected {_some(unexpected)}. Check --config (the "
            "sizes) and that the file is a state_dict of this model")


def _some(names, n: int = 8) -> str:
    names = sorted(names)
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@dataclass(frozen=True)
class CheckedModel:
    """What registration learned from building and running the model."""

    d_model: int
    vocab_size: int
    stage_widths: dict[str, int]


def check_model(custom: CustomModel, module: torch.nn.Module) -> CheckedModel:
    """Check the adapter against a built module and run it on two tokens; raise on anything
    that would make a later job fail."""
    import torch

    names = [name for name, _ in module.named_modules() if name]
    adapter = custom.adapter
    for key, path in adapter.module_paths():
        try:
            module.get_submodule(path)
        except AttributeError:
            close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
            raise FeaturestoreError(
                f"--adapter: {key} names {path!r}, which the model built by {custom.factory} "
                f"does not have; close matches: {', '.join(close) or '(none)'}") from None
    beyond = adapter.block.format(i=adapter.n_layers)
    if beyond in names:
        raise FeaturestoreError(f"--adapter: n_layers is {adapter.n_layers} but the model has "
                                f"{beyond!r}; give the model's number of blocks")
    embedding = module.get_submodule(adapter.token_embedding)
    if not isinstance(embedding, torch.nn.Embedding):
        raise FeaturestoreError(f"--adapter: token_embedding {adapter.token_embedding!r} is a "
                                f"{type(embedding).__name__}, not an nn.Embedding")
    for key, path in adapter.module_paths():
        if key in ("attn_out", "mlp_out", "unembed"):
            weight = getattr(module.get_submodule(path), "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
                raise FeaturestoreError(f"--adapter: {key} {path!r} has no 2-D weight; it must "
                                        "be a Linear (weight [out, in])")
            if key == "attn_out" and weight.shape[1] % adapter.n_heads:
                raise FeaturestoreError(
                    f"--adapter: {path} reads {weight.shape[1]} features, not a multiple of "
                    f"n_heads {adapter.n_heads}")

    d_model, vocab = embedding.embedding_dim, embedding.num_embeddings
    reader = StageReader(module, adapter.family(), adapter.n_layers,
                         parallel_residual=adapter.parallel_residual, n_heads=adapter.n_heads)
    tokens = torch.tensor([[0, min(1, vocab - 1)]])
    try:
        values = reader.read(tokens, reader.stage_names)
        _, logits = reader.run_with(tokens, "final_norm")
    except Exception as error:
        raise FeaturestoreError(
            f"running the model of {custom.factory} on token ids [[0, 1]] through the adapter's "
            f"sites failed: {type(error).__name__}: {error}") from error
    widths = {}
    for stage, value in values.items():
        if not isinstance(value, torch.Tensor) or value.shape[:2] != (1, 2) or value.ndim != 3:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise FeaturestoreError(
                f"--adapter: stage {stage} at {reader.site(stage)} gives {shape}, not a tensor "
                "[batch, seq, width]; pick a module port that carries the hidden states")
        widths[stage] = value.shape[-1]
        if "mlp_hidden" not in stage and value.shape[-1] != d_model:
            raise FeaturestoreError(
                f"--adapter: stage {stage} at {reader.site(stage)} is {value.shape[-1]} wide, "
                f"but the residual stream (the token embedding) is {d_model} wide")
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, 2, vocab):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise FeaturestoreError(
            f"the model of {custom.factory} returned {shape} for token ids [1, 2]; forward must "
            f"return logits [batch, seq, vocab={vocab}] (or an object with .logits)")
    return CheckedModel(d_model, vocab, widths)
