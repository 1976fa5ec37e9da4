"""Looking up what the warehouse has registered: runs, checkpoints, activation sets and bases.

Every lookup that comes up empty raises NotFoundError naming what exists, so a typo in a run name
or step is answered with the valid choices, never with a silent substitute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb

from featurestore.activations import ActivationSet
from featurestore.errors import FeaturestoreError, InvalidActivationsError, NotFoundError
from featurestore.warehouse import Warehouse, records


@dataclass(frozen=True)
class Run:
    run: str
    kind: str
    model_family: str | None
    d_model: int | None
    n_layers: int | None
    steps: int | None
    model_config: dict | None
    task_config: dict | None
    tokenizer: str | None = None  # a tokenizer folder given at registration


@dataclass(frozen=True)
class Checkpoint:
    run: str
    step: int
    path: Path | None  # absolute; None for runs without a model


def get_run(con: duckdb.DuckDBPyConnection, run: str) -> Run:
    rows = records(con, "SELECT * FROM runs WHERE run = ?", [run])
    if not rows:
        known = [r for (r,) in con.execute("SELECT run FROM runs ORDER BY run").fetchall()]
        raise NotFoundError(
            f"unknown run {run!r}; runs in this warehouse: {', '.join(known) or '(none)'}. "
            "Train one with `featurestore train-model --run NAME`."
        )
    row = rows[0]
    return Run(
        run=row["run"],
        kind=row["kind"],
        model_family=row["model_family"],
        d_model=row["d_model"],
        n_layers=row["n_layers"],
        steps=row["steps"],
        model_config=json.loads(row["model_config"]) if row["model_config"] else None,
        task_config=json.loads(row["task_config"]) if row["task_config"] else None,
        tokenizer=row["tokenizer"],
    )


# The two families of basis a command may need: one fitted on a run's checkpoints (shared-feature-
# fit, or a dictionary imported for a run's stage), or one trained by train-crosscoder on its
# sources (models or activation sets, with no run of its own).
SHARED = "shared"
CROSSCODER = "crosscoder"
_FAMILY_WHERE = {None: "", SHARED: "WHERE run IS NOT NULL", CROSSCODER: "WHERE run IS NULL"}
_FAMILY_LIST = {
    None: ("bases", "none (fit one with shared-feature-fit or train one with train-crosscoder)"),
    SHARED: ("shared bases", "none (fit one with shared-feature-fit)"),
    CROSSCODER: ("train-crosscoder bases", "none (train one with train-crosscoder)"),
}


def get_basis(con: duckdb.DuckDBPyConnection, name: str, family: str | None = None,
              needed_for: str = "", flag: str = "--basis") -> dict:
    """The `bases` row named `name`, every column (`sources` a list of dicts).

    With `family` (SHARED or CROSSCODER) a basis of the other family is refused, the error ending
    with `needed_for` (what needs this family, and where to go instead). An unknown name is a
    NotFoundError listing the bases of the family wanted.
    """
    rows = records(con, "SELECT * FROM bases WHERE name = ?", [name])
    if not rows:
        label, none = _FAMILY_LIST[family]
        names = [n for (n,) in con.execute(
            f"SELECT name FROM bases {_FAMILY_WHERE[family]} ORDER BY name").fetchall()]
        raise NotFoundError(f"{flag} {name!r}: no such basis; {label}: {', '.join(names) or none}")
    row = rows[0]
    if family == SHARED and row["run"] is None:
        raise FeaturestoreError(
            f"{flag} {name} was trained by train-crosscoder on {row['n_sources']} sources, not "
            f"fitted on one run's checkpoints: {needed_for}")
    if family == CROSSCODER and row["run"] is not None:
        raise FeaturestoreError(
            f"{flag} {name} is a shared basis fitted on the checkpoints of run {row['run']}: "
            f"{needed_for}")
    return row


def parse_steps(text: str | None, flag: str = "--checkpoints") -> list[int] | None:
    """'all' or None -> None (every checkpoint); '0,10,LAST' -> [0, 10, -1], -1 meaning the last."""
    if text is None or text.strip().lower() == "all":
        return None
    steps = []
    for part in text.split(","):
        part = part.strip()
        if part.upper() == "LAST":
            steps.append(-1)
        elif part.isdigit():
            steps.append(int(part))
        else:
            raise FeaturestoreError(
                f"{flag}: {part!r} is not a step; give 'all' or comma-separated steps such as "
                "0,100,LAST"
            )
    if len(set(steps)) != len(steps):
        raise FeaturestoreError(f"{flag}: steps repeat in {text!r}")
    return steps


def get_checkpoints(warehouse: Warehouse, con: duckdb.DuckDBPyConnection, run: str,
                    steps: list[int] | None = None) -> list[Checkpoint]:
    """The run's checkpoints, all of them or the listed steps (-1 = the last), in step order."""
    get_run(con, run)
    rows = con.execute(
        "SELECT step, path FROM checkpoints WHERE run = ? ORDER BY step", [run]
    ).fetchall()
    available = {step: path for step, path in rows}
    if not available:
        raise NotFoundError(f"run {run!r} has no checkpoints")
    if steps is None:
        chosen = list(available)
    else:
        chosen = [max(available) if s == -1 else s for s in steps]
        missing = [s for s in chosen if s not in available]
        if missing:
            raise NotFoundError(
                f"run {run!r} has no checkpoint at step {', '.join(map(str, missing))}; its "
                f"checkpoints are at steps {', '.join(map(str, available))}"
            )
    return [
        Checkpoint(run, s, warehouse.path(available[s]) if available[s] else None)
        for s in sorted(chosen)
    ]


def get_activation_set_row(con: duckdb.DuckDBPyConnection, name: str) -> dict:
    rows = records(con, "SELECT * FROM activation_sets WHERE name = ?", [name])
    if not rows:
        raise NotFoundError(
            f"no activation set named {name!r}; list them with "
            "`featurestore sql \"SELECT name FROM activation_sets\"` or collect it with "
            "`featurestore collect`"
        )
    return rows[0]


def get_stage_activation_sets(con: duckdb.DuckDBPyConnection, run: str,
                              stage: str) -> dict[int, dict]:
    """Step -> activation_sets row of every set collected for `run` at `stage`."""
    rows = records(con, "SELECT * FROM activation_sets WHERE run = ? AND stage = ?", [run, stage])
    return {row["step"]: row for row in rows}


def open_activation_set(warehouse: Warehouse, row: dict) -> ActivationSet:
    """Open a registered set, refusing files whose shape changed since they were registered
    (registered sets stay where they were written, outside the warehouse's control)."""
    path = warehouse.path(row["path"])
    acts = ActivationSet(path, row["format"], row["norm_scale"], row["name"])
    if (acts.d_model, len(acts)) != (row["d_model"], row["n_tokens"]):
        raise InvalidActivationsError(
            f"activation set {row['name']!r} at {path} now has {len(acts)} tokens of d_model "
            f"{acts.d_model}, but was registered with {row['n_tokens']} of d_model "
            f"{row['d_model']}: the files changed after registration. Register them again "
            "(featurestore register-activations) or restore the original files."
        )
    return acts


def activation_set_name(run: str, step: int, stage: str) -> str:
    return f"{run}@{step}:{stage}"
