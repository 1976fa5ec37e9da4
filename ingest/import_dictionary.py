"""`featurestore import-dictionary`: register a dictionary trained elsewhere as a basis.

An SAE or crosscoder saved by SAELens, sparsify or dictionary_learning is read from its own files
(featurestore.format_saelens, format_sparsify, format_dictionary_learning), folded into an
equivalent featurestore crosscoder, and registered exactly as a basis featurestore trained would
be: its weights under warehouse/bases/<name>/, rows in `bases`, `features` and
`decoder_directions`, all in one commit. Every later job then works on it.

Two ways to say what the dictionary reads:

    --run RUN --stage STAGE [--checkpoints ...]   a shared basis over a run's checkpoints, for
                   trajectories and births: an SAE (one source) encodes each checkpoint on its
                   own (kind pooled); a crosscoder over N sources reads N checkpoints jointly
                   (kind crosscoder)
    --source LABEL=SET ...                          one activation set per source, as
                   train-crosscoder takes them: for crosscoder-sweep and, with two sources,
                   the model diff

The dictionary is used in its own units: each source's activations are multiplied by the scale
the format stores (1 where it stores none), never by featurestore's own norm scale. Its fit on
these activations is measured and recorded (bases.fit_quality) but, unlike a fit featurestore
trained, never rejected: a dictionary that explains little of a stage is reported as a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from featurestore import format_dictionary_learning, format_saelens, format_sparsify
from featurestore.dictionary_kinds import IMPORT_FORMATS
from featurestore.errors import FeaturestoreError
from featurestore.results import Result
from featurestore.settings import check_name
from featurestore.warehouse import Warehouse, derived_from_basis
from featurestore.writer import utc_now

# The reader of each of IMPORT_FORMATS.
READERS = {"saelens": format_saelens.read, "sparsify": format_sparsify.read,
           "dictionary_learning": format_dictionary_learning.read}
# Below this explained variance on a source, the import warns that the dictionary may have been
# trained on another stage or model.
LOW_EXPLAINED_VARIANCE = 0.5


@dataclass
class ImportResult(Result):
    name: str
    format: str
    kind: str  # pooled | crosscoder
    arch: str
    n_sources: int
    d_model: int
    d_hidden: int
    sources: list[str]  # activation sets, in source order
    explained_variance: dict[str, float]  # by source label, or by step for a run's checkpoints
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The import in one line; `warnings` are not part of it (the CLI prints them to stderr)."""
        explained = self.explained_variance.values()
        return (f"basis {self.name!r}: {self.format} {self.arch} {self.kind}, "
                f"{self.d_hidden} features over {self.n_sources} source(s) of width "
                f"{self.d_model}, registered on {len(self.sources)} activation set(s); "
                f"explained variance {min(explained):.3f}-{max(explained):.3f}")


def import_dictionary(format: str, path: str, name: str, run: str | None = None,
                      stage: str | None = None, checkpoints: str | None = None,
                      sources: list[str] | tuple[str, ...] = (), warehouse: str | None = None
                      ) -> ImportResult:
    """Read the dictionary at `path` in `format` and register it as basis `name`, reading either
    `stage` of `run`'s checkpoints (`checkpoints`, default: every one the stage was collected
    at) or the activation sets `sources` (LABEL=SET)."""
    check_name(name, "basis name")
    if format not in IMPORT_FORMATS:
        raise FeaturestoreError(f"--format {format!r}: use one of {', '.join(IMPORT_FORMATS)}")
    if (run is None) != (stage is None):
        raise FeaturestoreError("give --run and --stage together")
    if (run is None) == (not sources):
        raise FeaturestoreError(
            "say what the dictionary reads: --run RUN --stage STAGE (a run's checkpoints), or "
            "--source LABEL=SET once per source (activation sets), not both")
    weights, described = READERS[format](Path(path).expanduser().resolve())
    warnings = list(described.pop("warnings", []))
    wh = Warehouse(warehouse)
    with wh.writer(f"import-dictionary {name}") as writer:
        with wh.connect() as con:
            if run is not None:
                basis = _over_checkpoints(wh, con, weights, name, run, stage, checkpoints)
            else:
                basis = _over_sources(wh, con, weights, name, sources)
        model, kind, source_rows, report, feature_rows = basis
        model.save(writer.stage_dir(f"bases/{name}"))
        writer.put("bases", [{
            "name": name, "kind": kind, "arch": model.config.arch,
            "n_sources": model.config.n_sources, "d_model": model.config.d_model,
            "d_hidden": model.config.d_hidden,
            "k": model.config.k if model.config.arch in ("topk", "batchtopk") else None,
            "sources": source_rows, "config": json.dumps(model.config.to_dict()),
            # What was imported, in place of the settings of a training featurestore ran.
            "trainer_config": json.dumps({"imported": {
                "format": format, "path": str(Path(path).expanduser().resolve()),
                **{k: v for k, v in described.items() if k != "config"},
                "config": described.get("config", described)}}, default=str),
            "path": writer.versioned(f"bases/{name}"), "steps": 0, "tokens": 0,
            "final_metrics": None, "run": run, "stage": stage,
            "fit_quality": json.dumps(report), "stability": None, "seeds": None,
            "created_at": utc_now(),
        }])
        from featurestore.ingest.train_crosscoder import direction_rows

        writer.put("features", feature_rows, replace_where={"basis": name})
        writer.put("decoder_directions", direction_rows(name, model),
                   replace_where={"basis": name})
        writer.put("training_metrics", [], replace_where={"basis": name})
        # Rows computed from an earlier basis of this name go in the same commit.
        for table, where in derived_from_basis(name):
            writer.put(table, [], replace_where=where)
    explained = {label: float(value) for label, value in report["explained_variance"].items()}
    low = {label: value for label, value in explained.items() if value < LOW_EXPLAINED_VARIANCE}
    if low:
        warnings.append(
            "the dictionary explains little of the activations it was registered on ("
            + ", ".join(f"{label}: {value:.2f}" for label, value in low.items())
            + "); check that it was trained on this stage of this model")
    return ImportResult(name, format, kind, model.config.arch, model.config.n_sources,
                        model.config.d_model, model.config.d_hidden,
                        [row["activation_set"] for row in source_rows], explained, warnings)


def _over_checkpoints(wh, con, weights, name, run, stage, checkpoints):
    """A shared basis over `run`'s checkpoints at `stage` (after shared-feature-fit's checks)."""
    from featurestore.ingest.shared_feature_fit import fit_report, resolve_checkpoints
    from featurestore.ingest.train_crosscoder import feature_rows
    from featurestore.registry import get_stage_activation_sets
    from featurestore.shared_basis import BasisCheckpoint, SharedBasis

    if checkpoints is None:
        collected = sorted(get_stage_activation_sets(con, run, stage))
        checkpoints = ",".join(map(str, collected)) if collected else "all"
    chosen = resolve_checkpoints(wh, con, run, stage, checkpoints)
    _require_width(weights, chosen[0][0].activations.d_model, f"--stage {stage} of run {run}")
    if weights.n_sources > 1 and weights.n_sources != len(chosen):
        raise FeaturestoreError(
            f"--checkpoints: the crosscoder reads {weights.n_sources} sources, one checkpoint "
            f"each, and {len(chosen)} were chosen ({', '.join(str(r['step']) for _, r in chosen)})"
            f"; name {weights.n_sources} steps of run {run}")
    kind = "pooled" if weights.n_sources == 1 else "crosscoder"
    scales = _scales(weights)
    checkpoint_scales = [scales[0] if kind == "pooled" else scales[c] for c in range(len(chosen))]
    for (source, _), scale in zip(chosen, checkpoint_scales):
        source.activations.norm_scale = scale
    labels = tuple(f"step_{row['step']}" for _, row in chosen)
    model = weights.to_crosscoder(labels[:weights.n_sources] if kind == "pooled" else labels)
    basis = SharedBasis(name, kind, run, stage, model,
                        [BasisCheckpoint(row["step"], row["name"], scale)
                         for (_, row), scale in zip(chosen, checkpoint_scales)])
    report, stats = fit_report(basis, [source for source, _ in chosen])
    rows = [{"label": label, "activation_set": row["name"], "run": run, "step": row["step"],
             "stage": stage, "norm_scale": scale}
            for label, (_, row), scale in zip(labels, chosen, checkpoint_scales)]
    return model, kind, rows, report, feature_rows(name, model, stats)


def _over_sources(wh, con, weights, name, sources):
    """A crosscoder basis over activation sets, as train-crosscoder registers one."""
    from featurestore.aligned import AlignedActivations
    from featurestore.ingest.train_crosscoder import (
        EVAL_BATCH,
        EVAL_TOKENS,
        feature_rows,
        fit_report,
        parse_source,
        resolve_source,
    )
    from featurestore.latent_scaling import latent_scaling

    parsed = [parse_source(text) for text in sources]
    labels = tuple(label for label, _ in parsed)
    if len(set(labels)) != len(labels):
        raise FeaturestoreError(f"--source labels repeat: {list(labels)}")
    if len(parsed) != weights.n_sources:
        raise FeaturestoreError(
            f"--source: the dictionary reads {weights.n_sources} source(s) and {len(parsed)} "
            f"were given; give --source LABEL=SET once per source, in the dictionary's order")
    resolved = [resolve_source(wh, con, label, target) for label, target in parsed]
    for (source, _), (label, target) in zip(resolved, parsed):
        _require_width(weights, source.activations.d_model, f"--source {label}={target}")
    scales = _scales(weights)
    for (source, _), scale in zip(resolved, scales):
        source.activations.norm_scale = scale
    data = AlignedActivations([source for source, _ in resolved], seed=0)
    model = weights.to_crosscoder(labels)
    report, stats = fit_report(model, data)
    scaling = latent_scaling(model, data.in_order(EVAL_BATCH, EVAL_TOKENS))
    rows = [{"label": source.label, **info, "norm_scale": scale}
            for (source, info), scale in zip(resolved, scales)]
    return model, "crosscoder", rows, report, feature_rows(name, model, stats, scaling)


def _scales(weights) -> list[float]:
    if weights.norm_scales is None:
        return [1.0] * weights.n_sources
    return [float(s) for s in weights.norm_scales]


def _require_width(weights, d_model: int, what: str) -> None:
    if weights.d_model != d_model:
        raise FeaturestoreError(
            f"{what} has width {d_model} and the dictionary reads width {weights.d_model}: it "
            "was trained on another stage or model")
