"""`featurestore export-dictionary`: a basis as files another tool loads with its own loader.

    saelens    cfg.json + sae_weights.safetensors: SAE.load_from_disk(DIR)
    sparsify   cfg.json + sae.safetensors: SparseCoder.load_from_disk(DIR) (TopK bases only)

Both formats are single-input SAEs, so the basis must have one source: a pooled shared basis or
a one-source crosscoder. The exported SAE reads activations in original units, so the basis's
norm scale is folded into its weights; a pooled basis scales each checkpoint by its own norm
scale, so when those differ, --step says which checkpoint the SAE is for. A BatchTopK or
Matryoshka basis encodes with its learned threshold, which is exported as a JumpReLU threshold
per latent: the same code. The folder is built beside its target and swapped in whole.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from featurestore import format_saelens, format_sparsify
from featurestore.dictionary_kinds import EXPORT_FORMATS
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.queries.artifacts import swap_in
from featurestore.registry import get_basis
from featurestore.results import Result
from featurestore.scratch import Claim
from featurestore.warehouse import Warehouse


@dataclass
class DictionaryExport(Result):
    basis: str
    format: str
    directory: str
    arch: str  # the exported architecture, in the format's own terms
    d_in: int
    d_sae: int
    step: int | None  # pooled bases: the checkpoint whose norm scale was folded in (None: all
    # of the basis's checkpoints share one)
    files: list[str]

    def summary(self) -> str:
        return (f"{self.basis!r} written as a {self.format} {self.arch} SAE ({self.d_in} -> "
                f"{self.d_sae}) to {self.directory}: {', '.join(self.files)}")


def export_dictionary(basis: str, format: str, out: str | os.PathLike | None = None,
                      step: int | None = None, warehouse: str | None = None
                      ) -> DictionaryExport:
    """Write `basis` in `format` to `out` (default WAREHOUSE/exports/BASIS/FORMAT)."""
    from featurestore.crosscoder import CrossCoder
    from featurestore.dictionary_weights import DictionaryWeights

    if format not in EXPORT_FORMATS:
        raise FeaturestoreError(f"--format {format!r}: use one of {', '.join(EXPORT_FORMATS)}")
    wh = Warehouse(warehouse)
    with wh.connect() as con:
        row = get_basis(con, basis)
    if row["n_sources"] != 1:
        raise FeaturestoreError(
            f"--basis {basis} is a crosscoder over {row['n_sources']} sources; {format} holds "
            "single-input SAEs, so only one-source bases (a pooled shared basis, or a "
            "crosscoder trained on one source) can be exported")
    model = CrossCoder.load(wh.path(row["path"]))
    weights = DictionaryWeights.from_crosscoder(model)
    chosen_step = None
    if row["kind"] == "pooled":
        chosen_step, scale = _pooled_scale(basis, row["sources"], step)
        weights.norm_scales = torch.tensor([scale])
    elif step is not None:
        raise FeaturestoreError(
            f"--step: basis {basis} reads one activation set with one norm scale; drop --step")
    weights = weights.in_original_units()  # the form written: scale folded, thresholds per latent
    target = Path(out).resolve() if out else wh.root / "exports" / basis / format
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    claim = Claim(staging)
    try:
        if format == "saelens":
            format_saelens.write(weights, staging, {
                "model_name": row["run"], "hook_name": row["stage"], "featurestore_basis": basis,
                "featurestore_step": chosen_step})
        else:
            format_sparsify.write(weights, staging)
        swap_in(staging, target, "export-dictionary")
    finally:
        claim.release(remove=True, warn="export-dictionary")
    exported_arch = ({"vanilla": "standard"}.get(weights.arch, weights.arch)
                     if format == "saelens" else "topk")
    return DictionaryExport(basis, format, str(target), exported_arch, weights.d_model,
                            weights.d_hidden, chosen_step,
                            sorted(p.name for p in target.iterdir() if p.is_file()))


def _pooled_scale(basis: str, sources: list[dict], step: int | None
                  ) -> tuple[int | None, float]:
    """(step, norm scale) of the checkpoint the exported SAE reads; step None when every
    checkpoint has the same norm scale and the SAE reads them all alike."""
    by_step = {source["step"]: source["norm_scale"] for source in sources}
    steps = ", ".join(map(str, sorted(by_step)))
    if step is not None:
        if step not in by_step:
            raise NotFoundError(f"--step {step}: basis {basis} was not fitted on it; its steps "
                                f"are {steps}")
        return step, by_step[step]
    if len(set(by_step.values())) > 1:
        raise FeaturestoreError(
            f"--step: basis {basis} scales each checkpoint by its own norm scale, and the "
            f"exported SAE reads activations in original units, so it is for one checkpoint: "
            f"give --step, one of {steps}")
    return None, next(iter(by_step.values()))
