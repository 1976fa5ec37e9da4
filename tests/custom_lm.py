"""A small causal LM written from scratch, for the custom-model tests: its module names match no
built-in family (embedding, layers[i].mixer, layers[i].ffn.hidden, readout)."""

from __future__ import annotations

import torch
from torch import nn

ADAPTER = {
    "n_layers": 2,
    "n_heads": 4,
    "token_embedding": "embedding",
    "block": "layers.{i}",
    "embed": "layers.0:input",
    "post_attn": "layers.{i}.pre_ffn:input",
    "mlp_hidden": "layers.{i}.ffn.hidden:output",
    "final_norm": "out_norm:output",
    "attn_out": "layers.{i}.mixer.merge",
    "mlp_out": "layers.{i}.ffn.down",
    "final_norm_kind": "layernorm",
    "unembed": "readout",
}
CONFIG = {"vocab": 48, "width": 32, "heads": 4, "depth": 2, "context": 16}


class Mixer(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.merge = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        heads = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.merge(heads.transpose(1, 2).reshape(batch, seq, width))


class FeedForward(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.hidden = nn.GELU()
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(self.up(x)))


class Layer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.pre_mixer = nn.LayerNorm(width)
        self.mixer = Mixer(width, heads)
        self.pre_ffn = nn.LayerNorm(width)
        self.ffn = FeedForward(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.pre_mixer(x))
        return x + self.ffn(self.pre_ffn(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, width: int, heads: int, depth: int, context: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(context, width) * 0.1)
        self.layers = nn.ModuleList(Layer(width, heads) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids) + self.positions[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.readout(self.out_norm(x))


def build(config: dict) -> TinyLM:
    """The factory: TinyLM from the config dict."""
    return TinyLM(**config)
