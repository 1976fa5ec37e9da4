"""The demo model: a small decoder-only transformer, in one file.

The architecture is GPT-2 shaped (pre-LayerNorm blocks, learned positional embeddings, causal
self-attention, GELU MLP) and deliberately plain, so that every intermediate value the feature
store records has an obvious name. Other code reads the model's internals through nnsight by
module name, so the names below are a contract:

    wte, wpe                 token and position embeddings; block 0 reads wte(tokens) + wpe(pos)
    blocks[i].ln_1           LayerNorm before attention
    blocks[i].attn.qkv       Linear(d_model, 3 * d_model): queries, keys and values for all heads
    blocks[i].attn.proj      Linear(d_model, d_model); its input is the per-head outputs
                             concatenated, head h in columns [h * d_head, (h + 1) * d_head)
    blocks[i].ln_2           LayerNorm before the MLP; its input is the residual after attention
    blocks[i].mlp.fc         Linear(d_model, d_mlp)
    blocks[i].mlp.act        nn.GELU
    blocks[i].mlp.proj       Linear(d_mlp, d_model)
    blocks[i]                output is the residual stream after the MLP
    ln_f                     final LayerNorm
    unembed                  Linear(d_model, vocab_size, bias=False), not tied to wte
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

ConfigT = TypeVar("ConfigT")


def config_from_dict(config_class: type[ConfigT], data: dict[str, Any]) -> ConfigT:
    """Build a config dataclass from a plain dict, refusing keys the dataclass does not have.

    Configs are stored as JSON next to checkpoints; a key we do not know usually means the file
    was written by a different version of the code, and silently dropping it would load a model
    that is not the one that was saved.
    """
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown {config_class.__name__} keys: {', '.join(unknown)} "
            f"(expected a subset of: {', '.join(sorted(known))})"
        )
    return config_class(**data)


@dataclass
class ModelConfig:
    vocab_size: int
    n_ctx: int  # longest sequence the position embedding covers
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int | None = None  # None means 4 * d_model; always an int after construction

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name) for name in ("vocab_size", "n_ctx", "d_model",
                                                        "n_layers", "n_heads", "d_mlp")}
        bad = [f"{name}={value!r}" for name, value in sizes.items()
               if value is not None and (not isinstance(value, int) or value < 1)]
        if bad:
            raise ValueError(f"sizes must be positive integers, got {', '.join(bad)}")
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return config_from_dict(cls, data)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=-1)
        # [batch, seq, d_model] -> [batch, heads, seq, d_head], the layout attention expects.
        q, k, v = (t.view(batch, seq, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # Back to [batch, seq, heads * d_head]: head h lands in columns h*d_head:(h+1)*d_head,
        # which is the layout per-head analyses of proj's input rely on.
        heads = heads.transpose(1, 2).reshape(batch, seq, d_model)
        return self.proj(heads)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_mlp)
        self.act = nn.GELU()
        self.proj = nn.Linear(config.d_mlp, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.n_ctx, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.unembed = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor[batch, seq] -> logits: FloatTensor[batch, seq, vocab_size]."""
        seq = tokens.shape[1]
        if seq > self.config.n_ctx:
            raise ValueError(f"sequence length {seq} exceeds n_ctx={self.config.n_ctx}")
        positions = torch.arange(seq, device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))


def _init_weights(module: nn.Module) -> None:
    # GPT-2 initialisation. Every draw comes from torch's global generator, so seeding it with
    # torch.manual_seed before building the model makes the initial weights reproducible.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
