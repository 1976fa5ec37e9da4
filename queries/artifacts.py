"""`featurestore export-artifacts`: one shared basis as the analysis plan's file layout.

Teams that read files rather than the warehouse get, under
`<out>/runs/<run>/analysis/shared_features/<stage>/`:

    shared_feature_basis.pt                  the weights, a dict of tensors (torch.load with
                                             weights_only=True), in the basis's normalised units,
                                             with each checkpoint's step and norm scale
    shared_feature_basis.json                the bases row: kind, config, fit quality, stability,
                                             checkpoints
    shared_feature_basis_features.json       one object per feature (features table), with
                                             top_examples: its top contexts at the last swept
                                             checkpoint (token and context as text, the token
                                             marked ⟦token⟧; token ids where there is no text)
    feature_examples.jsonl                   one feature_examples row per line, every step, with
                                             the same token and context for reading
    feature_trajectories.jsonl               one trajectories row per line
    feature_checkpoint_summary.json          checkpoint_summary rows
    feature_split_profiles.json              split_profiles rows
    feature_births.json                      births rows (every rule that was run)
    feature_birth_summary.json               birth_summary rows
    feature_compare_<source>_vs_<target>.json  diffs rows of one pair, one file per pair
    feature_patch_<source>_vs_<target>.json  patches rows of one pair, one file per pair
    feature_lineage_<step>.json              lineage_edges rows of one checkpoint
    graphs/                                  export_graphs: node-link, GraphML, attribution JSON
    plots/                                   export_plots: JSON spec + data, PNG, SVG, HTML

Every file is written from the warehouse by a SQL query. The stage directory is built whole in a
temporary sibling directory and swapped in with renames, so a reader sees the old layout or the
new one, never half of each; re-running replaces it. The temporary directory is locked while the
export runs (featurestore.scratch): one left by a killed export is deleted by the next export
into the same folder.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from featurestore.queries.exports import json_ready, json_records
from featurestore.registry import SHARED, get_basis
from featurestore.results import Result
from featurestore.scratch import Claim, remove_tree, sweep
from featurestore.warehouse import Warehouse

DEFAULT_OUT = "artifacts"
# A half-built layout with no lock file was left by an export of an older featurestore; one this
# old is no export's that is still running.
LOCKLESS_AGE = timedelta(hours=1)


@dataclass
class ArtifactExport(Result):
    basis: str
    directory: str  # the stage directory
    files: list[str]  # relative to `directory`, sorted
    seconds: float
    skipped_plots: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{len(self.files)} files of {self.basis!r} in {self.directory} "
                f"({self.seconds:.1f}s)")


def export_artifacts(basis: str, out: str | os.PathLike = DEFAULT_OUT,
                     warehouse: str | None = None) -> ArtifactExport:
    """Write the artifact layout of `basis` under `out` (default ./artifacts)."""
    from featurestore.queries.graph_files import export_graphs
    from featurestore.queries.plots import export_plots

    started = time.perf_counter()
    wh = Warehouse(warehouse)
    with wh.connect() as con:
        basis_row = json_ready(get_basis(con, basis, SHARED, needed_for=(
            "the artifact layout is per run and stage, for shared-feature-fit bases")))
        target = (Path(out).resolve() / "runs" / basis_row["run"] / "analysis"
                  / "shared_features" / basis_row["stage"])
        _remove_abandoned(target.parent)
        staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        claim = Claim(staging)
        try:
            _write_tables(wh, con, basis, basis_row, staging)
            export_graphs(basis, out=staging / "graphs", warehouse=warehouse)
            plots = export_plots(basis, out=staging / "plots", warehouse=warehouse)
            swap_in(staging, target, "export-artifacts")
        finally:
            claim.release(remove=True, warn="export-artifacts")
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    return ArtifactExport(basis, str(target), files, time.perf_counter() - started,
                          dict(plots.skipped))


def _write_tables(wh: Warehouse, con, basis: str, basis_row: dict, directory: Path) -> None:
    _write_weights(wh, basis_row, directory / "shared_feature_basis.pt")
    _write_json(directory / "shared_feature_basis.json", {
        **{k: v for k, v in basis_row.items() if k != "path"},
        "config": json.loads(basis_row["config"]),
        "trainer_config": json.loads(basis_row["trainer_config"]),
        "fit_quality": json.loads(basis_row["fit_quality"] or "null"),
        "final_metrics": json.loads(basis_row["final_metrics"] or "null")})
    by_basis = "WHERE basis = ? ORDER BY ALL"
    # Each feature with its top contexts at the last swept checkpoint, readable as text.
    examples: dict[int, list[dict]] = {}
    for row in json_records(con, f"""
            SELECT feature_id, step, rank, value, split, {_SHOWN_EXAMPLE}
            FROM feature_examples
            WHERE basis = ? AND step = (SELECT max(step) FROM feature_examples WHERE basis = ?)
            ORDER BY feature_id, rank""", [basis, basis]):
        examples.setdefault(row.pop("feature_id"), []).append(row)
    features = json_records(con, f"SELECT * FROM features {by_basis}", [basis])
    _write_json(directory / "shared_feature_basis_features.json",
                [{**f, "top_examples": examples.get(f["feature_id"], [])} for f in features])
    _write_jsonl(directory / "feature_examples.jsonl", json_records(
        con, f"SELECT *, {_SHOWN_EXAMPLE} FROM feature_examples WHERE basis = ? "
             "ORDER BY feature_id, step, rank", [basis]))
    _write_jsonl(directory / "feature_trajectories.jsonl",
                 json_records(con, "SELECT * FROM trajectories WHERE basis = ? "
                            "ORDER BY feature_id, step", [basis]))
    for name, table in (("feature_checkpoint_summary", "checkpoint_summary"),
                        ("feature_split_profiles", "split_profiles"),
                        ("feature_births", "births"), ("feature_birth_summary", "birth_summary")):
        _write_json(directory / f"{name}.json",
                    json_records(con, f"SELECT * FROM {table} {by_basis}", [basis]))
    for prefix, table in (("feature_compare", "diffs"), ("feature_patch", "patches")):
        pairs = con.execute(f"SELECT DISTINCT source_step, target_step FROM {table} "
                            "WHERE basis = ? ORDER BY ALL", [basis]).fetchall()
        for source, target in pairs:
            _write_json(directory / f"{prefix}_{source}_vs_{target}.json", json_records(
                con, f"SELECT * FROM {table} WHERE basis = ? AND source_step = ? AND "
                     "target_step = ? ORDER BY ALL", [basis, source, target]))
    for (step,) in con.execute("SELECT DISTINCT step FROM lineage_edges WHERE basis = ? "
                               "ORDER BY step", [basis]).fetchall():
        _write_json(directory / f"feature_lineage_{step}.json", json_records(
            con, "SELECT * FROM lineage_edges WHERE basis = ? AND step = ? "
                 "ORDER BY dst_id, method, src_type, rank", [basis, step]))


# An example's activating token and context for reading: decoded text with the token marked
# ⟦token⟧ where the run has token strings, else the ids marked (sql/macros/example_context.sql).
_SHOWN_EXAMPLE = (
    "example_token(token_text, context_token_ids, position, context_start) AS token, "
    "example_context(context_text, context_token_ids, position, context_start) AS context")


def _write_weights(wh: Warehouse, basis_row: dict, path: Path) -> None:
    """The basis's tensors as saved by the trainer, plus its checkpoints' steps and norm
    scales, so the file alone encodes any checkpoint's activations."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(wh.path(basis_row["path"]) / "crosscoder.safetensors")
    sources = sorted(basis_row["sources"], key=lambda s: s["step"])
    tensors["steps"] = torch.tensor([s["step"] for s in sources], dtype=torch.int64)
    tensors["norm_scales"] = torch.tensor([s["norm_scale"] for s in sources],
                                          dtype=torch.float64)
    torch.save(tensors, path)


def _json_default(value):
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, default=_json_default, indent=1, allow_nan=False) + "\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=_json_default, allow_nan=False) + "\n")


def swap_in(staging: Path, target: Path, job: str) -> None:
    """Replace `target` by `staging`: two renames in one directory, the old copy removed last
    (if that fails, the new layout stands and a warning from `job` names the old copy)."""
    if target.exists():
        retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        os.replace(target, retired)
        os.replace(staging, target)
        remove_tree(retired, warn=job)
    else:
        os.replace(staging, target)


def _remove_abandoned(folder: Path) -> None:
    """Layouts half built by exports that were killed (no export holds their lock), and old
    copies that a killed export swapped out but did not delete, beside the stage folders."""
    sweep(folder, lambda name: name.startswith(".") and ".tmp-" in name,
          lockless_age=LOCKLESS_AGE, warn="export-artifacts")
    sweep(folder, lambda name: name.startswith(".") and ".old-" in name,
          lockless_age=timedelta(0), warn="export-artifacts")
