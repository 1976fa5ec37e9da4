"""Stages: named places in a model's forward pass, read through nnsight.

A stage name means the same thing in every model family:

    embed                 the residual stream entering block 0 (token + position embeddings)
    layer_{i}_post_attn   the residual stream after block i's attention has been added
    layer_{i}_mlp_hidden  block i's MLP hidden activations (after the nonlinearity)
    layer_{i}_post_mlp    the residual stream after block i's MLP: the block's output
    final_norm            the output of the final LayerNorm (what the unembedding reads)

Each family (the demo model, GPT-2, GPT-NeoX/Pythia, Llama-style) maps these names to a module
and whether to read its input or its output; any other model gets its Family from an adapter
file (featurestore.custom_model). Every read goes through nnsight, so the same sites can later
be patched with the same names.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from featurestore.errors import FeaturestoreError, UnknownStageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Site:
    """Where a stage lives: a module (dotted path, '{i}' for the block index) and which port."""

    module: str
    port: Literal["input", "output"]

    def at(self, layer: int) -> Site:
        return Site(self.module.format(i=layer), self.port)


@dataclass(frozen=True)
class Family:
    """How one model family names its modules."""

    name: str
    token_embedding: str  # the nn.Embedding of token ids
    block: str  # a block's module path; its output is layer_{i}_post_mlp
    embed: Site
    post_attn: Site | None  # None: not a residual-stream point in this family (parallel blocks)
    mlp_hidden: Site
    final_norm: Site
    # Where lineage finds the components that write the residual stream ('{i}': block index):
    attn_out: str  # attention's output projection; its input is the heads' outputs side by side,
    #                head h in columns h*d_head:(h+1)*d_head
    mlp_out: str  # the MLP's output projection; its input is the mlp_hidden activations
    final_norm_kind: Literal["layernorm", "rmsnorm"]  # how the final norm is linearised
    unembed: str  # the Linear from the final norm's output to the logits


FAMILIES = {
    "demo": Family(
        name="demo",
        token_embedding="wte",
        block="blocks.{i}",
        embed=Site("blocks.0", "input"),
        post_attn=Site("blocks.{i}.ln_2", "input"),
        mlp_hidden=Site("blocks.{i}.mlp.act", "output"),
        final_norm=Site("ln_f", "output"),
        attn_out="blocks.{i}.attn.proj",
        mlp_out="blocks.{i}.mlp.proj",
        final_norm_kind="layernorm",
        unembed="unembed",
    ),
    "gpt2": Family(
        name="gpt2",
        token_embedding="transformer.wte",
        block="transformer.h.{i}",
        embed=Site("transformer.drop", "output"),
        post_attn=Site("transformer.h.{i}.ln_2", "input"),
        mlp_hidden=Site("transformer.h.{i}.mlp.act", "output"),
        final_norm=Site("transformer.ln_f", "output"),
        attn_out="transformer.h.{i}.attn.c_proj",
        mlp_out="transformer.h.{i}.mlp.c_proj",
        final_norm_kind="layernorm",
        unembed="lm_head",
    ),
    "gpt_neox": Family(
        name="gpt_neox",
        token_embedding="gpt_neox.embed_in",
        block="gpt_neox.layers.{i}",
        embed=Site("gpt_neox.emb_dropout", "output"),
        post_attn=Site("gpt_neox.layers.{i}.post_attention_layernorm", "input"),
        mlp_hidden=Site("gpt_neox.layers.{i}.mlp.act", "output"),
        final_norm=Site("gpt_neox.final_layer_norm", "output"),
        attn_out="gpt_neox.layers.{i}.attention.dense",
        mlp_out="gpt_neox.layers.{i}.mlp.dense_4h_to_h",
        final_norm_kind="layernorm",
        unembed="lm_head",  # transformers 5 name; 4.x called it embed_out
    ),
    "llama": Family(
        name="llama",
        token_embedding="model.embed_tokens",
        block="model.layers.{i}",
        embed=Site("model.embed_tokens", "output"),
        post_attn=Site("model.layers.{i}.post_attention_layernorm", "input"),
        mlp_hidden=Site("model.layers.{i}.mlp.down_proj", "input"),
        final_norm=Site("model.norm", "output"),
        attn_out="model.layers.{i}.self_attn.o_proj",
        mlp_out="model.layers.{i}.mlp.down_proj",
        final_norm_kind="rmsnorm",
        unembed="lm_head",
    ),
}

# Hugging Face model_type values and the family whose module names they share.
HF_MODEL_TYPES = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}

_LAYER_STAGE = re.compile(r"^layer_(\d+)_(post_attn|mlp_hidden|post_mlp)$")


class StageReader:
    """A model wrapped in nnsight, with the stage names of its family."""

    def __init__(self, module: torch.nn.Module, family: str | Family, n_layers: int,
                 parallel_residual: bool = False, n_heads: int | None = None):
        from nnsight import NNsight

        if isinstance(family, str):
            if family not in FAMILIES:
                raise FeaturestoreError(
                    f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}"
                )
            family = FAMILIES[family]
        self.family = family
        self.n_layers = n_layers
        self.n_heads = n_heads  # attention heads per block, for lineage; None if unknown
        self.parallel_residual = parallel_residual
        self.module = module.eval()
        self.model = NNsight(self.module)

    @property
    def vocab_size(self) -> int:
        return self.module.get_submodule(self.family.token_embedding).num_embeddings

    @property
    def stage_names(self) -> list[str]:
        """Every valid stage, in the order the forward pass reaches them."""
        names = ["embed"]
        for i in range(self.n_layers):
            if self.family.post_attn is not None and not self.parallel_residual:
                names.append(f"layer_{i}_post_attn")
            names += [f"layer_{i}_mlp_hidden", f"layer_{i}_post_mlp"]
        return names + ["final_norm"]

    def site(self, stage: str) -> Site:
        if stage not in self.stage_names:
            raise UnknownStageError(
                f"unknown stage {stage!r} for this {self.family.name} model with "
                f"{self.n_layers} blocks; valid stages: {', '.join(self.stage_names)}"
            )
        if stage == "embed":
            return self.family.embed
        if stage == "final_norm":
            return self.family.final_norm
        layer_text, kind = _LAYER_STAGE.match(stage).groups()
        layer = int(layer_text)
        if kind == "post_mlp":
            return Site(self.family.block, "output").at(layer)
        return getattr(self.family, kind).at(layer)

    def read(self, tokens: torch.Tensor, stages: list[str]) -> dict[str, torch.Tensor]:
        """Activations [batch, seq, width] at each stage for a batch of token ids, via nnsight.

        The forward pass stops after the deepest requested stage.
        """
        import torch

        order = {name: n for n, name in enumerate(self.stage_names)}
        sites = {stage: self.site(stage) for stage in stages}
        # nnsight hands out values in execution order, so request them in that order.
        ordered = sorted(sites, key=order.__getitem__)
        saved = {}
        with torch.no_grad(), self.model.trace(tokens) as tracer:
            for stage in ordered:
                envoy = self._envoy(sites[stage].module)
                value = envoy.input if sites[stage].port == "input" else envoy.output
                saved[stage] = value.save()
            tracer.stop()
        return {stage: _tensor(saved[stage]) for stage in stages}

    def run_with(self, tokens: torch.Tensor, stage: str,
                 replacement: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the stage's value [batch, seq, width], logits) of a full forward pass, via nnsight.

        With `replacement` (same shape), the stage's value is overwritten in place before the
        rest of the model runs: a residual-stream stage read at a module's input is the very
        tensor the block adds to, so the residual stream itself is patched. The returned value
        is the one the model computed, before the replacement.
        """
        import torch

        site = self.site(stage)
        with torch.no_grad(), self.model.trace(tokens):
            envoy = self._envoy(site.module)
            port = envoy.input if site.port == "input" else envoy.output
            hidden = port[0] if isinstance(port, tuple) else port
            value = hidden.clone().save()
            if replacement is not None:
                hidden[:] = replacement
            output = self.model.output
            logits = (output.logits if hasattr(output, "logits") else output).save()
        return value.detach(), logits.detach()

    def _envoy(self, dotted: str):
        envoy = self.model
        for part in dotted.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy


def _tensor(value):
    # Some modules return (hidden_states, extras...); the stage is the hidden states.
    return value[0] if isinstance(value, tuple) else value


def demo_reader(model) -> StageReader:
    """A StageReader on the built-in demo Transformer."""
    return StageReader(model, "demo", model.config.n_layers, n_heads=model.config.n_heads)


def hf_config(directory: str | os.PathLike):
    """The transformers config of a local model folder, checked to have a stage adapter."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise FeaturestoreError(
            f"{path} is not a Hugging Face model directory (no config.json); pass a folder "
            "written by save_pretrained."
        )
    # The model_type is checked before transformers reads the config, so a type transformers
    # itself does not know gets the same answer as one featurestore has no adapter for.
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise FeaturestoreError(f"{path / 'config.json'} is not a JSON object ({error})") from None
    if model_type not in HF_MODEL_TYPES:
        raise FeaturestoreError(
            f"{path}: model_type {model_type!r} has no stage adapter (built in: "
            f"{', '.join(sorted(HF_MODEL_TYPES))}). Register it as a custom model instead: "
            "featurestore register-model --run NAME --factory model.py:build --config "
            "config.json --weights 'step_*.safetensors' --adapter adapter.json (README: "
            "'Your own model')."
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def hf_reader(directory: str | os.PathLike) -> StageReader:
    """A StageReader on a local Hugging Face causal LM directory (save_pretrained layout).

    Only the local files are read (the hub is never contacted), and only safetensors weights.
    """
    from transformers import AutoModelForCausalLM

    config = hf_config(directory)
    module = AutoModelForCausalLM.from_pretrained(Path(directory), local_files_only=True,
                                                  use_safetensors=True)
    return StageReader(
        module,
        HF_MODEL_TYPES[config.model_type],
        config.num_hidden_layers,
        parallel_residual=bool(getattr(config, "use_parallel_residual", False)),
        n_heads=config.num_attention_heads,
    )
