"""Aligned activations of several sources, served as [batch, n_sources, d_model] tensors.

The sources (activation sets of different models, checkpoints or layers) must hold the same
tokens row for row. Batches follow a seeded global shuffle that is a pure function of the step:
step t reads rows t*B .. (t+1)*B of the concatenation of per-epoch permutations, so a resumed run
reads exactly what an uninterrupted one would, with no data position to save. Only the current
epoch's permutation is held (8 bytes per token), never the activations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from featurestore.activations import ActivationSet, check_finite
from featurestore.errors import FeaturestoreError, InvalidActivationsError

FINITE_CHECK_ROWS = 65_536


@dataclass(frozen=True)
class Source:
    label: str
    activations: ActivationSet  # carries its norm_scale


class AlignedActivations:
    def __init__(self, sources: list[Source], seed: int = 0):
        if not sources:
            raise InvalidActivationsError("a crosscoder needs at least one --source LABEL=SET")
        self.sources = sources
        self.seed = seed
        self._validate()
        self.n_tokens = len(sources[0].activations)
        self.d_model = sources[0].activations.d_model
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sources]

    @property
    def norm_scales(self) -> torch.Tensor:
        return torch.tensor([s.activations.norm_scale for s in self.sources], dtype=torch.float32)

    def _validate(self) -> None:
        """Same tokens, same width, finite values, a norm scale: checked before any training."""
        first = self.sources[0]
        if len(first.activations) == 0:
            raise InvalidActivationsError(f"source {first.label}: the activation set is empty")
        first_tokens = first.activations.token_columns()
        for source in self.sources:
            acts = source.activations
            if acts.norm_scale is None:
                raise InvalidActivationsError(f"source {source.label}: no norm scale")
            if acts.d_model != first.activations.d_model:
                raise InvalidActivationsError(
                    f"d_model mismatch: source {first.label} has d_model "
                    f"{first.activations.d_model} but {source.label} has {acts.d_model}"
                )
            if len(acts) != len(first.activations):
                raise InvalidActivationsError(
                    f"misaligned sources: {first.label} has {len(first.activations)} tokens but "
                    f"{source.label} has {len(acts)}; collect them on the same tokens"
                )
            tokens = acts.token_columns()
            differs = ((tokens.sequence_id != first_tokens.sequence_id)
                       | (tokens.position != first_tokens.position)
                       | (tokens.token_id != first_tokens.token_id))
            if differs.any():
                raise InvalidActivationsError(
                    f"misaligned sources: {first.label} and {source.label} hold different tokens "
                    f"(first difference at row {int(np.flatnonzero(differs)[0])}); collect them "
                    "on the same tokens"
                )
            for start in range(0, len(acts), FINITE_CHECK_ROWS):
                rows = np.arange(start, min(start + FINITE_CHECK_ROWS, len(acts)))
                check_finite(acts.rows(rows), f"source {source.label} ({acts.name})")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_tokens)
            self._epoch = epoch
        return self._order

    def with_seed(self, seed: int) -> AlignedActivations:
        """The same rows in another seeded order (no re-validation)."""
        other = copy.copy(self)
        other.seed, other._epoch, other._order = seed, -1, np.empty(0, dtype=np.int64)
        return other

    def indices_for_step(self, step: int, batch_size: int) -> np.ndarray:
        """Row numbers of the batch at `step` in the seeded global shuffle (may span epochs)."""
        start = step * batch_size
        parts = []
        while batch_size > 0:
            epoch, offset = divmod(start, self.n_tokens)
            take = min(batch_size, self.n_tokens - offset)
            parts.append(self._epoch_order(epoch)[offset:offset + take])
            start += take
            batch_size -= take
        return np.concatenate(parts)

    def batch(self, index: np.ndarray, normalized: bool = True) -> torch.Tensor:
        """Activations of the given rows from every source: [len(index), n_sources, d_model]."""
        order = np.argsort(index, kind="stable")  # sorted reads are sequential in the memory map
        rows = np.stack([s.activations.rows(index[order], normalized) for s in self.sources],
                        axis=1)
        out = np.empty_like(rows)
        out[order] = rows
        return torch.from_numpy(out)

    def in_order(self, batch_size: int, max_tokens: int | None = None):
        """Batches covering the rows in order (for evaluation passes)."""
        end = self.n_tokens if max_tokens is None else min(self.n_tokens, max_tokens)
        for start in range(0, end, batch_size):
            yield self.batch(np.arange(start, min(start + batch_size, end)))

    def calibration_batches(self, after_step: int, batch_size: int, n: int):
        """The n batches the shuffle would serve after training (the BatchTopK threshold's)."""
        return (self.batch(self.indices_for_step(after_step + i, batch_size)) for i in range(n))

    def state_at(self, position: int) -> None:
        """Nothing to save: the order is a pure function of the seed and the step."""
        return None

    def restore(self, state: dict | None) -> None:
        if state is not None:
            raise FeaturestoreError(
                "--resume: the saved run read its batches from models (--tokens-from); resume it "
                "with the same model sources and --tokens-from")

    def progress(self) -> dict[str, str]:
        return {}


class PooledActivations(AlignedActivations):
    """Several checkpoints' activations on the same tokens, pooled into one source.

    Each checkpoint is normalised by its own norm scale, so checkpoints contribute in comparable
    units. By default every checkpoint contributes all n of its tokens; `weights` (one per
    checkpoint, in [0, 1]) lets a checkpoint contribute round(w * n) of them instead, spread
    evenly over its rows: a random-initialisation checkpoint, whose activations are unlike every
    trained one, would otherwise take a large share of the dictionary. Pooled rows are numbered
    checkpoint by checkpoint, and the shuffle covers all of them at once.
    """

    def __init__(self, sources: list[Source], seed: int = 0, label: str = "pooled",
                 weights: list[float] | None = None):
        super().__init__(sources, seed)  # validates that the checkpoints hold the same tokens
        self.label = label
        n = self.tokens_per_checkpoint = self.n_tokens
        weights = [1.0] * len(sources) if weights is None else weights
        if len(weights) != len(sources) or not all(0 <= w <= 1 for w in weights):
            raise ValueError(f"need one weight in [0, 1] per checkpoint, got {weights}")
        # The rows each checkpoint contributes, evenly strided over its token set.
        self.checkpoint_rows = [np.floor(np.arange(round(w * n)) * (n / max(round(w * n), 1)))
                                .astype(np.int64) for w in weights]
        counts = np.array([len(rows) for rows in self.checkpoint_rows])
        if counts.sum() == 0:
            raise ValueError("every checkpoint has weight 0: nothing to fit on")
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n_tokens = int(self.starts[-1])

    @property
    def labels(self) -> list[str]:
        return [self.label]

    @property
    def norm_scales(self) -> torch.Tensor:
        return torch.ones(1)  # rows are already normalised, each by its own checkpoint's scale

    def batch(self, index: np.ndarray, normalized: bool = True) -> torch.Tensor:
        """Normalised activations of the given pooled rows: [len(index), 1, d_model]."""
        if not normalized:
            raise ValueError("pooled rows exist only normalised (checkpoints differ in scale)")
        checkpoint = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty((len(index), 1, self.d_model), dtype=np.float32)
        for c in np.unique(checkpoint):
            where = np.flatnonzero(checkpoint == c)
            rows = self.checkpoint_rows[c][index[where] - self.starts[c]]
            out[where, 0] = self.sources[c].activations.rows(rows, normalized=True)
        return torch.from_numpy(out)
