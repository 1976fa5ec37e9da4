"""`featurestore feature-compare`: how every feature of a shared basis changed between two
checkpoints, stored in `diffs`.

The numbers come from the `feature_compare` SQL macro (sql/macros/feature_compare.sql), so an
analyst's ad-hoc `SELECT * FROM feature_compare(...)` and the stored rows cannot disagree. This job
checks the inputs, materialises the macro's rows for one (basis, source, target) and replaces the
rows an earlier run stored for the same pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa

from featurestore import ranges
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.registry import get_basis
from featurestore.results import Result
from featurestore.schema import spec
from featurestore.text_table import format_cell, format_table
from featurestore.warehouse import Warehouse
from featurestore.writer import utc_now

# --rank-by value -> the diffs column holding that rank.
RANK_BY = {
    "rate_change": "rank_by_rate_change",
    "log_ratio": "rank_by_log_ratio",
    "mean_change": "rank_by_mean_change",
    "energy_change": "rank_by_energy_change",
}
DEFAULT_RANK_BY = "rate_change"
# Columns every row of one comparison shares; the result states them once instead.
_PAIR_COLUMNS = ("basis", "source_step", "target_step", "created_at")


@dataclass
class FeatureCompareResult(Result):
    basis: str
    source_step: int
    target_step: int
    n_features: int  # rows written to diffs: features with a trajectory at both steps
    n_cosine_undefined: int  # features silent (direction norm 0) or without a direction at a step
    rank_by: str
    top: list[dict]  # the highest-ranked rows by rank_by, diffs columns less _PAIR_COLUMNS

    def summary(self) -> str:
        return "\n".join([
            f"basis {self.basis!r}: {self.n_features} features compared from step "
            f"{self.source_step} to step {self.target_step} (stored in diffs); top {len(self.top)} "
            f"by {self.rank_by}:",
            format_table(
                ["rank", "feature", "rate source", "rate target", "rate change", "log ratio",
                 "mean change", "energy change", "cosine", "largest split change"],
                [[str(row[RANK_BY[self.rank_by]]), str(row["feature_id"]),
                  *(format_cell(row[c]) for c in (
                      "source_activation_rate", "target_activation_rate", "activation_rate_change",
                      "log_rate_ratio", "mean_activation_change", "energy_change",
                      "direction_cosine")),
                  _largest_split_change(row["split_rate_changes"])]
                 for row in self.top])])


def _largest_split_change(changes: dict[str, float]) -> str:
    if not changes:
        return ""
    split = max(changes, key=lambda s: abs(changes[s]))
    return f"{split} {changes[split]:+.3g}"


def compare_features(basis: str, source: int, target: int, warehouse: str | None = None,
                     top: int = 20, rank_by: str = DEFAULT_RANK_BY) -> FeatureCompareResult:
    """Compare every feature of `basis` between checkpoints `source` and `target`; store the
    rows in `diffs` (replacing earlier ones for this pair) and return the `top` by `rank_by`."""
    if rank_by not in RANK_BY:
        raise FeaturestoreError(
            f"--rank-by {rank_by!r} is not a ranking; use one of: {', '.join(RANK_BY)}."
        )
    if top < 0:
        raise FeaturestoreError(f"--top {top}: give a number of features >= 0.")
    ranges.STEP.check(source, "--source")
    ranges.STEP.check(target, "--target")
    if source == target:
        raise FeaturestoreError(
            f"--source and --target are both step {source}: a feature compared with itself has "
            "not changed. Give two different checkpoint steps."
        )

    wh = Warehouse(warehouse)
    with wh.writer(f"feature-compare {basis} {source}->{target}") as writer:
        # Checked and computed on one connection: one snapshot, under the writer lock.
        with wh.connect() as con:
            _check_inputs(con, basis, source, target)
            table = con.sql("SELECT * FROM feature_compare(?, ?, ?)",
                            params=[basis, source, target]).to_arrow_table()
        created_at = pa.array([utc_now()] * table.num_rows,
                              spec("diffs").arrow_schema.field("created_at").type)
        table = table.append_column("created_at", created_at)
        writer.put("diffs", table,
                   replace_where={"basis": basis, "source_step": source, "target_step": target})

    ranked = table.sort_by(RANK_BY[rank_by]).slice(0, top).drop_columns(list(_PAIR_COLUMNS))
    return FeatureCompareResult(
        basis=basis,
        source_step=source,
        target_step=target,
        n_features=table.num_rows,
        n_cosine_undefined=table["direction_cosine"].null_count,
        rank_by=rank_by,
        # Arrow gives a MAP as (key, value) pairs; a dict is what JSON readers expect.
        top=[{**row, "split_rate_changes": dict(row["split_rate_changes"])}
             for row in ranked.to_pylist()],
    )


def _check_inputs(con: duckdb.DuckDBPyConnection, basis: str, source: int, target: int) -> None:
    get_basis(con, basis)  # any basis with trajectories: checked next
    steps = [step for (step,) in con.execute(
        "SELECT DISTINCT step FROM trajectories WHERE basis = ? ORDER BY step", [basis]
    ).fetchall()]
    if not steps:
        raise NotFoundError(
            f"--basis {basis!r} has no trajectories: run `featurestore feature-trajectory-sweep` "
            "on it first."
        )
    for flag, step in (("--source", source), ("--target", target)):
        if step not in steps:
            raise NotFoundError(
                f"{flag} {step}: basis {basis!r} has no trajectories at step {step}; steps with "
                f"trajectories: {', '.join(map(str, steps))}. Pick one of these."
            )
