"""How what a residual-stream stage holds reaches the logits, and the output weights of a model's
components: the final norm linearised per token, the projections that write into the residual
stream, and the logits a direction adds. Read by feature-lineage and the feature dashboards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from featurestore.errors import FeaturestoreError

if TYPE_CHECKING:  # torch is imported when a job runs, not when the CLI starts
    import torch

    from featurestore.stages import StageReader


@dataclass(frozen=True)
class FinalNorm:
    """The model's final norm, linearised per token: a write c to the residual stream reaches the
    final_norm stage as gamma * centre(c) / denominator, where a LayerNorm centres (c - mean(c))
    and divides by the token's std, and an RMSNorm does not centre and divides by the token's rms
    (both with eps under the root). Its bias, if any, is a constant and no source's."""

    kind: str  # layernorm | rmsnorm (Family.final_norm_kind)
    gamma: torch.Tensor  # [d], float64
    eps: float

    @classmethod
    def of(cls, reader: StageReader) -> FinalNorm:
        path = reader.family.final_norm.module
        norm = reader.module.get_submodule(path)
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))  # LlamaRMSNorm's name
        if eps is None:
            raise FeaturestoreError(
                f"the final norm {path!r} ({type(norm).__name__}) has no eps or variance_epsilon "
                "attribute; lineage needs it to linearise the norm for a final_norm basis")
        return cls(reader.family.final_norm_kind, norm.weight.detach().double(), float(eps))

    def centre(self, values: torch.Tensor, dim: int) -> torch.Tensor:
        if self.kind == "layernorm":
            return values - values.mean(dim=dim, keepdim=True)
        return values

    def read_directions(self, directions: torch.Tensor) -> torch.Tensor:
        """[d, F]: the directions the stage's encoder rows [d, F] amount to on a write c before
        the norm, less the per-token denominator: (gamma * centre(c)) . w = c . centre(gamma * w),
        centring being symmetric."""
        return self.centre(self.gamma[:, None] * directions, dim=0)

    def passes_on(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, d]: directions written before the norm as it passes them on, up to the per-token
        denominator."""
        return self.gamma * self.centre(rows, dim=1)

    def denominator(self, residual: torch.Tensor) -> torch.Tensor:
        """[n]: each token's std (LayerNorm) or rms (RMSNorm) of the norm's input [n, d]."""
        spread = (residual.var(dim=1, unbiased=False) if self.kind == "layernorm"
                  else residual.pow(2).mean(dim=1))
        return (spread + self.eps).sqrt()


def projection(reader: StageReader, field_name: str, block: int = 0) -> torch.Tensor:
    """The [out, in] weight (a detached view) of the projection the family names in
    `field_name`: attn_out or mlp_out of block `block`, or unembed. nn.Linear stores it so,
    transformers' Conv1D (GPT-2) as [in, out]."""
    import torch

    path = getattr(reader.family, field_name).format(i=block)
    try:
        layer = reader.module.get_submodule(path)
    except AttributeError:
        raise FeaturestoreError(
            f"the {reader.family.name} model has no module {path!r} (its family's {field_name}); "
            "lineage reads the components' output weights there") from None
    if isinstance(layer, torch.nn.Linear):
        return layer.weight.detach()
    from transformers.pytorch_utils import Conv1D

    if isinstance(layer, Conv1D):
        return layer.weight.detach().T
    raise FeaturestoreError(
        f"module {path!r} (the {reader.family.name} family's {field_name}) is a "
        f"{type(layer).__name__}; lineage reads output weights from torch.nn.Linear or "
        "transformers Conv1D projections only")


def output_logits(reader: StageReader, directions: np.ndarray, stage: str) -> np.ndarray:
    """[n, vocab]: the logits that directions [n, d] in raw units, written at residual-stream
    stage `stage`, add to every token through the unembedding. At final_norm (what the
    unembedding reads) this is exact. Written before the final norm, a direction takes the direct
    path: the norm passes it on linearised (FinalNorm.passes_on), less the per-token denominator,
    as dashboards that fold the norm's weights into the unembedding show it; later blocks are
    not run."""
    import torch

    rows = torch.from_numpy(directions).double()
    if stage != "final_norm":
        rows = FinalNorm.of(reader).passes_on(rows)
    return (rows @ projection(reader, "unembed").double().T).numpy()
