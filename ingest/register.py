"""`featurestore register-activations`: bring activations collected elsewhere into the warehouse.

Input in the activation-set format (a datasets folder or Parquet file whose activations are a
fixed-length float32 list) stays where it is (an absolute path is recorded). Every other accepted
form (featurestore.activation_inputs: float16/float64 values, variable-length lists of one width,
.npz arrays) is converted once, slice by slice, into an ordinary activation set inside the
warehouse; the input file is only read. Either way the set is checked completely before anything
is registered: the columns, one width, finite values. A set registered with --run/--step/--stage
is an ordinary activation set for every later job. If the run is not in the warehouse it is
created as an `external` run (no model), with a checkpoint row per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore import ranges
from featurestore.activation_inputs import open_input
from featurestore.activations import (
    ActivationSet,
    ActivationSetWriter,
    TokenColumns,
    check_finite,
    norm_sample,
    norm_scale,
)
from featurestore.errors import FeaturestoreError, InvalidActivationsError
from featurestore.planted import PlantedRun
from featurestore.registry import activation_set_name, get_checkpoints
from featurestore.results import Result
from featurestore.schema import package_version
from featurestore.settings import check_name
from featurestore.warehouse import Warehouse
from featurestore.writer import utc_now

# Rows checked per slice, so a large set is validated without loading it whole.
CHECK_ROWS = 65_536
# Where converted sets tied to no checkpoint (--name) go, under activations/; run names start
# with a letter or digit, so this folder never collides with a run's.
NAMED_SETS = "_named"


@dataclass
class RegisterResult(Result):
    name: str
    path: str  # where the set is read from: the input itself, or its converted copy
    format: str
    n_tokens: int
    d_model: int
    norm_scale: float
    created_run: bool
    input_path: str  # the file or folder given
    converted_from: str | None  # the input's form when it was converted; None: used in place

    def summary(self) -> str:
        lines = [f"registered {self.name!r}: {self.n_tokens} tokens x d_model "
                 f"{self.d_model} ({self.format}), norm scale {self.norm_scale:.4f}"]
        if self.converted_from is not None:
            lines.append(f"converted from {self.converted_from} in {self.input_path} to float32 "
                         f"at {self.path} (the input is unchanged)")
        return "\n".join(lines)


def register_activations(path: str, name: str | None = None, run: str | None = None,
                         step: int | None = None, stage: str | None = None,
                         include_first_position: bool = False, token_ids: str | None = None,
                         warehouse: str | None = None) -> RegisterResult:
    tied = [run is not None, step is not None, stage is not None]
    if name is not None and any(tied):
        raise FeaturestoreError("give either --name or --run/--step/--stage, not both")
    if name is None and not all(tied):
        raise FeaturestoreError(
            "give --name NAME, or all three of --run RUN --step STEP --stage STAGE"
        )
    if name is not None:
        check_name(name, "activation set name")
    else:
        check_name(run, "run name")
        check_name(stage, "stage name")
        ranges.STEP.check(step, "--step")
        name = activation_set_name(run, step, stage)

    given = open_input(path, token_ids)
    relative = (f"activations/{NAMED_SETS}/{name}" if run is None
                else f"activations/{run}/{stage}/step_{step:09d}")
    if given.in_place:  # checked before the lock is taken: nothing is written but rows
        activations = ActivationSet(given.path, given.kind, name=name)
        tokens, scale = _check(activations, str(given.path), include_first_position)

    wh = Warehouse(warehouse)
    created_run = False
    with wh.writer(f"register-activations {name}") as writer:
        if run is not None:
            created_run = _ensure_checkpoint(wh, writer, run, step, given.d_model)
        if given.in_place:
            stored, fmt, source = str(given.path), given.kind, "registered"
        else:
            target = wh.path(relative).resolve()
            if given.path == target or target in given.path.parents:
                raise FeaturestoreError(
                    f"{given.path} lies where its converted copy would go ({target}), which the "
                    "registration replaces; move the input out of the warehouse first")
            staged = writer.stage_dir(relative)
            with ActivationSetWriter(staged, given.d_model) as out:
                for values, columns in given.slices():
                    out.write(values, columns)
            activations = ActivationSet(staged, "hf_dataset", name=name)
            tokens, scale = _check(activations, f"{given.path} (converted to float32)",
                                   include_first_position)
            stored, fmt, source = writer.versioned(relative), "hf_dataset", "converted"
        writer.put("activation_sets", [{
            "name": name, "run": run, "step": step, "stage": stage, "path": stored,
            "format": fmt, "source": source, "n_tokens": len(activations),
            "d_model": activations.d_model, "norm_scale": scale,
            "norm_excludes_first": not include_first_position,
            "tokens_fingerprint": tokens.fingerprint(),
            "token_source": (f"registered {given.path}" if given.in_place else
                             f"converted from {given.path} ({given.form})"),
            "created_at": utc_now(),
        }])
    return RegisterResult(name, str(wh.path(stored)), fmt, len(activations), activations.d_model,
                          scale, created_run, str(given.path),
                          None if given.in_place else given.form)


def _check(activations: ActivationSet, what: str,
           include_first_position: bool) -> tuple[TokenColumns, float]:
    """Check every row is finite, slice by slice; (the token columns, the norm scale)."""
    for start in range(0, len(activations), CHECK_ROWS):
        rows = activations.rows(np.arange(start, min(start + CHECK_ROWS, len(activations))))
        check_finite(rows, f"{what} rows {start}..{start + len(rows) - 1}")
    tokens = activations.token_columns()
    sample = norm_sample(tokens.position, exclude_first=not include_first_position)
    return tokens, norm_scale(activations.rows(sample))


def _ensure_checkpoint(wh: Warehouse, writer, run: str, step: int, d_model: int) -> bool:
    """Check run@step can take this set; create an external run or checkpoint row if needed."""
    with wh.connect() as con:  # inside the writer: an empty warehouse if there is none yet
        found = con.execute("SELECT kind, d_model FROM runs WHERE run = ?", [run]).fetchall()
        known_run = found[0] if found else None
        if known_run and known_run[0] != "external":
            get_checkpoints(wh, con, run, [step])  # a model run: the step must exist
        steps = {s for (s,) in con.execute(
            "SELECT step FROM checkpoints WHERE run = ?", [run]).fetchall()}
    if known_run and known_run[1] is not None and known_run[1] != d_model:
        raise InvalidActivationsError(
            f"d_model mismatch: run {run!r} has d_model {known_run[1]} but the set has {d_model}"
        )
    if known_run and known_run[0] != "external":
        return False
    if known_run is None:
        writer.put("runs", [{
            "run": run, "kind": "external", "model_family": None, "parent_run": None,
            "parent_step": None, "seed": None, "steps": None, "d_model": d_model,
            "n_layers": None, "model_config": None, "task_config": None,
            "train_config": None, "featurestore_version": package_version(),
            "created_at": utc_now(),
        }])
    if known_run is None or step not in steps:
        writer.put("checkpoints", [{
            "run": run, "step": step, "tokens_seen": None, "path": None,
            "train_loss": None, "train_accuracy": None, "heldout_loss": None,
            "heldout_accuracy": None, "split_metrics": None, "created_at": utc_now(),
        }])
    return known_run is None


def register_planted_run(warehouse_root: str | Path, tmp_dir: str | Path, run: PlantedRun,
                         stage: str, name: str = "planted") -> list[RegisterResult]:
    """Write every checkpoint of a planted run (featurestore.planted) to
    tmp_dir/step_<step>.parquet and register it as run `name` at its step and `stage`
    (`featurestore register-activations --run --step --stage`).
    The files must outlive the warehouse's use of them: they are registered where they lie.
    Returns the RegisterResults, in checkpoint order."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for c, step in enumerate(run.steps):
        path = run.write_checkpoint(c, tmp_dir / f"step_{step}.parquet")
        results.append(register_activations(str(path), run=name, step=step, stage=stage,
                                            warehouse=str(warehouse_root)))
    return results
