"""A shared feature basis: one dictionary that gives every feature one id at every checkpoint.

Two kinds, both trained by the crosscoder trainer on activations of one stage at several
checkpoints of one run (featurestore.ingest.shared_feature_fit):

    pooled      one encoder/decoder for all checkpoints: an SAE on the checkpoints' pooled
                activations. A checkpoint is encoded on its own; feature i's activation there is
                its latent value.
    crosscoder  one encoder/decoder slice per checkpoint and one latent code for all of them. The
                code is joint, so the value at checkpoint c is the latent times the norm of its
                decoder slice for c: the size of what the feature writes into that checkpoint.
                The decoder norm itself is the presence signal.

Everything here is in normalised units (each checkpoint's activations times its norm scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from featurestore.crosscoder import CrossCoder
from featurestore.errors import FeaturestoreError, NotFoundError


@dataclass(frozen=True)
class BasisCheckpoint:
    step: int
    activation_set: str  # activation_sets.name
    norm_scale: float


@dataclass
class SharedBasis:
    name: str
    kind: str  # pooled | crosscoder
    run: str
    stage: str
    model: CrossCoder
    checkpoints: list[BasisCheckpoint]
    # shared-feature-fit --seeds N: the dictionaries of the other seeds, by seed
    seed_models: dict[int, CrossCoder] = field(default_factory=dict)

    def seed_basis(self, seed: int) -> SharedBasis:
        """The same basis with another seed's dictionary, to encode checkpoints in."""
        return replace(self, model=self.seed_models[seed], seed_models={})

    @property
    def d_hidden(self) -> int:
        return self.model.config.d_hidden

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def resolve_steps(self, wanted: list[int] | None, flag: str) -> list[int]:
        """The wanted steps (None: all; -1: the last) in order, each one the basis was fitted
        on, or an error naming `flag` and the steps there are."""
        if wanted is None:
            return self.steps
        chosen = [self.steps[-1] if s == -1 else s for s in wanted]
        missing = [s for s in chosen if s not in self.steps]
        if missing:
            raise NotFoundError(
                f"{flag}: basis {self.name} was not fitted on step "
                f"{', '.join(map(str, missing))}; its steps are {', '.join(map(str, self.steps))}")
        return sorted(set(chosen))

    def require_pooled(self, flag: str) -> None:
        """Refuse a crosscoder-kind basis where a checkpoint must be encoded on its own."""
        if self.kind != "pooled":
            raise FeaturestoreError(
                f"{flag} {self.name} is a crosscoder-kind basis: its code is joint over all "
                "checkpoints, so a feature's activation at one checkpoint is not a function of "
                "that checkpoint's model alone. Use a pooled basis (shared-feature-fit --kind "
                "pooled).")

    @torch.no_grad()
    def encode_all(self, rows: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """encode() for every checkpoint at once, from every checkpoint's normalised rows of the
        same tokens; the crosscoder kind's joint code is computed once, not once per checkpoint."""
        if self.kind == "pooled":
            return [self.encode([x], c) for c, x in enumerate(rows)]
        latents = self.model.encode(torch.stack(rows, dim=1), normalized=True)
        reconstruction = self.model.decode(latents, normalized=True)
        norms = self.model.decoder_norms()
        return [(latents * norms[:, c], reconstruction[:, c]) for c in range(len(rows))]

    @torch.no_grad()
    def encode(self, rows: list[torch.Tensor], c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature values [n, h], reconstruction [n, d]) of checkpoint c.

        rows: the normalised activations of the same n tokens, one tensor [n, d] per checkpoint
        for the crosscoder kind (its code is joint), or just checkpoint c's for the pooled kind.
        """
        if self.kind == "pooled":
            latents = self.model.encode(rows[0][:, None, :], normalized=True)
            return latents, self.model.decode(latents, normalized=True)[:, 0]
        x = torch.stack(rows, dim=1)
        latents = self.model.encode(x, normalized=True)
        norms = self.model.decoder_norms()[:, c]
        return latents * norms, self.model.decode(latents, normalized=True)[:, c]

    def decoder_directions(self, c: int) -> np.ndarray:
        """[h, d]: each feature's decoder vector for checkpoint c."""
        decoder = self.model.decoder().detach()
        return decoder[:, 0 if self.kind == "pooled" else c].double().numpy()


@dataclass
class ReconstructionSums:
    """Running sums over batches of one checkpoint's tokens, for the reconstruction metrics the
    crosscoder metrics define (explained variance about the mean, relative error), streamed."""

    n: int = 0
    residual: float = 0.0  # sum ||x - x_hat||^2
    squares: float = 0.0  # sum ||x||^2
    total: np.ndarray | None = None  # sum x
    relative_error: float = 0.0  # sum ||x - x_hat|| / ||x||

    def add(self, x: np.ndarray, x_hat: np.ndarray) -> None:
        self.n += len(x)
        self.residual += float(((x - x_hat) ** 2).sum())
        self.squares += float((x ** 2).sum())
        self.total = x.sum(axis=0) if self.total is None else self.total + x.sum(axis=0)
        self.relative_error += float((np.linalg.norm(x - x_hat, axis=1)
                                      / np.maximum(np.linalg.norm(x, axis=1), 1e-12)).sum())

    @property
    def explained_variance(self) -> float:
        centred = self.squares - float((self.total ** 2).sum()) / self.n
        return 1 - self.residual / centred

    @property
    def mean_relative_error(self) -> float:
        return self.relative_error / self.n


def seed_folder(seed: int) -> str:
    """Where a basis keeps the weights of one of its other seeds, under its own folder."""
    return f"seed_{seed}"


def load_shared_basis(warehouse, con, name: str, flag: str = "--basis"
                      ) -> tuple[SharedBasis, list]:
    """The registered shared basis `name` and its checkpoints' activation sets (in step order)."""
    from featurestore.registry import SHARED, get_activation_set_row, get_basis, open_activation_set

    row = get_basis(con, name, SHARED, flag=flag, needed_for=(
        "this command reads a basis at each checkpoint of a run (shared-feature-fit). A "
        "crosscoder's latents per source and their contexts come from `featurestore "
        f"crosscoder-sweep --basis {name}`"))
    kind, run, stage, path, sources, seeds = (row[c] for c in ("kind", "run", "stage", "path",
                                                               "sources", "seeds"))
    model = CrossCoder.load(warehouse.path(path))
    seed_models = {seed: CrossCoder.load(warehouse.path(path) / seed_folder(seed))
                   for seed in (seeds or [])[1:]}
    checkpoints = [BasisCheckpoint(s["step"], s["activation_set"], s["norm_scale"])
                   for s in sorted(sources, key=lambda s: s["step"])]
    sets = []
    for checkpoint in checkpoints:
        row = get_activation_set_row(con, checkpoint.activation_set)
        acts = open_activation_set(warehouse, row)
        acts.norm_scale = checkpoint.norm_scale  # the scale the basis was trained with
        sets.append(acts)
    return SharedBasis(name, kind, run, stage, model, checkpoints, seed_models), sets
