"""`featurestore feature-birth-analyze`: when each feature of a shared basis is born, stabilises and
dies, against a null control, stored in `births` and `birth_summary`.

The rule is the `feature_births` SQL macro (sql/macros/feature_births.sql), so a stored row and an
analyst's `SELECT * FROM feature_births(...)` cannot disagree. Births are read off the ORDER of the
checkpoints (they are log-spaced; spacing plays no part). The null control is the same macro given
seeded permutations of that order: each feature's metric values are reassigned to shuffled
checkpoints, and the births the rule still finds there are false births. Their mean count over the
permutations, divided by the number of features, is the false-birth rate. One permutation is
applied to all features at once (a small list handed to SQL), so the counts of one permutation move
together: the spread between permutations (birth_summary.null_births_sd) is large, and more
--permutations steady the mean. The null is weak for small K: a feature present at half of the
checkpoints has K = 2 of them adjacent in most shuffles.

The job's queries are the files of sql/birth_analysis/.

Default thresholds, when --threshold is not given:
    activation_rate   0.01: active on at least 1% of tokens.
    energy            0.1 / number of features: a tenth of an even share of the reconstruction.
    mean_activation,  10% of the 99th percentile of the metric over all of the basis's
    decoder_norm      (feature, checkpoint) rows: both are in the basis's own units.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import duckdb
import numpy as np

from featurestore import ranges
from featurestore.birth_rules import (
    DEFAULT_ACTIVATION_RATE,
    DEFAULT_ENERGY_SHARE,
    DEFAULT_METRIC,
    DEFAULT_PEAK_SHARE,
    DEFAULT_PERSISTENCE,
    DEFAULT_PRESENCE,
    DEFAULT_RELATIVE_THRESHOLD,
    DEFAULT_STABLE_COS,
    DEFAULT_STABLE_EPS,
    METRICS,
    PRESENCE,
)
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.ingest.shared_feature_fit import MATCH_COSINE
from featurestore.registry import get_basis
from featurestore.results import Result
from featurestore.schema import load_query
from featurestore.text_table import format_cell, format_table
from featurestore.warehouse import Warehouse

# Born features listed in the result (earliest births first).
SHOWN_FEATURES = 10


@dataclass
class BirthAnalysisResult(Result):
    basis: str
    metric: str
    presence: str  # absolute | relative (threshold = a share of each feature's peak)
    threshold: float  # the threshold used (resolved from the default when none was given)
    persistence: int
    stable_eps: float
    stable_cos: float
    n_features: int
    n_checkpoints: int
    births: int
    censored_births: int  # of births: in the last persistence-1 checkpoints, present to the end
    present_at_init: int
    deaths: int
    birth_rate: float  # births / n_features
    null_births_mean: float  # mean births per permutation of the checkpoint order
    null_censored_births_mean: float
    null_false_birth_rate: float  # null_births_mean / n_features
    # --seeds N fits: share of features matched across seeds whose births agree within one
    # checkpoint, and how many matched pairs that is over (None with one seed)
    seed_births_agreement: float | None
    seed_matched_features: int | None
    permutations: int
    seed: int
    windows: list[dict]  # birth_summary rows: window_start, window_end, births, null_births_*
    first_born: list[dict]  # the earliest born features with their steps and drift
    last_born: list[dict]  # the latest born features (censored births are among them)
    seconds: float

    def summary(self) -> str:
        bound = (f"{self.threshold:.4g} x its peak" if self.presence == "relative"
                 else f"{self.threshold:.4g}")
        lines = [
            f"basis {self.basis!r}, {self.metric} >= {bound} for {self.persistence} "
            f"checkpoints: {self.births} of {self.n_features} features born "
            f"({self.censored_births} censored), {self.present_at_init} present at init, "
            f"{self.deaths} died (stored in births, birth_summary)",
            f"null ({self.permutations} shuffled orders): {self.null_births_mean:.1f} births "
            f"({self.null_censored_births_mean:.1f} censored), false-birth rate "
            f"{self.null_false_birth_rate:.3f} vs birth rate {self.birth_rate:.3f}",
            format_table(
                ["window", "births", "censored", "null mean"],
                [[f"({w['window_start']}, {w['window_end']}]", str(w["births"]),
                  str(w["censored_births"]), f"{w['null_births_mean']:.2f}"]
                 for w in self.windows])]
        if self.first_born:
            lines.append(f"first {len(self.first_born)} born:")
            lines.append(format_table(
                ["feature", "birth", "stabilized", "death", "drift"],
                [[str(f["feature_id"]), *(format_cell(f[c]) for c in (
                    "birth_step", "stabilization_step", "death_step", "drift"))]
                 for f in self.first_born]))
        if any(f["birth_censored"] for f in self.last_born):
            lines.append("censored births (present to the last checkpoint, fewer than K observed): "
                         + ", ".join(f"feature {f['feature_id']} at step {f['birth_step']}"
                                     for f in self.last_born if f["birth_censored"]))
        return "\n".join(lines)


def analyze_births(basis: str, metric: str = DEFAULT_METRIC, threshold: float | None = None,
                   presence: str = DEFAULT_PRESENCE, persistence: int = DEFAULT_PERSISTENCE,
                   stable_eps: float = DEFAULT_STABLE_EPS,
                   stable_cos: float = DEFAULT_STABLE_COS, permutations: int = 20, seed: int = 0,
                   warehouse: str | None = None) -> BirthAnalysisResult:
    """Find births, stabilisations and deaths of every feature of `basis` and the shuffled-order
    null; store them in `births` and `birth_summary`, replacing rows of the same parameters."""
    started = time.monotonic()
    _check_parameters(metric, presence, threshold, persistence, stable_eps, stable_cos,
                      permutations)
    ranges.SEED.check(seed, "--seed")

    wh = Warehouse(warehouse)
    with wh.writer(f"feature-birth-analyze {basis}") as writer:
        # Checked and computed on one connection: one snapshot, under the writer lock.
        with wh.connect() as con:
            n_features, n_checkpoints = _check_trajectories(con, basis, metric, persistence)
            if threshold is None:
                threshold = _default_threshold(con, basis, metric, presence, n_features)
            rng = np.random.default_rng(seed)
            orders = [rng.permutation(n_checkpoints).tolist() for _ in range(permutations)]
            params = {"basis": basis, "metric": metric, "presence": presence,
                      "threshold": threshold,
                      "persistence": persistence, "stable_eps": stable_eps,
                      "stable_cos": stable_cos}
            # Real order (ordering 0) and every permutation in one call of the one rule.
            con.execute(load_query("birth_analysis/all_births"), {**params, "orders": orders})
            births = con.sql(load_query("birth_analysis/births"), params=params).to_arrow_table()
            agreement, matched = _seed_agreement(con, params)
            summary = con.sql(load_query("birth_analysis/summary"), params={
                **params, "permutations": permutations, "seed": seed,
                "agreement": agreement, "matched": matched}).to_arrow_table()
        writer.put("births", births, replace_where=params)
        writer.put("birth_summary", summary, replace_where=params)

    born = [row for row in births.to_pylist() if row["birth_step"] is not None]
    born.sort(key=lambda row: (row["birth_step"], row["feature_id"]))
    windows = summary.select(["window_start", "window_end", "births", "censored_births",
                              "null_births_mean", "null_censored_births_mean",
                              "null_births_sd"]).to_pylist()
    shown = ("feature_id", "birth_step", "birth_censored", "stabilization_step", "death_step",
             "drift")
    return BirthAnalysisResult(
        basis=basis, metric=metric, presence=presence, threshold=threshold,
        persistence=persistence, stable_eps=stable_eps, stable_cos=stable_cos,
        n_features=n_features, n_checkpoints=n_checkpoints, births=len(born),
        censored_births=sum(bool(row["birth_censored"]) for row in born),
        present_at_init=sum(births["present_at_init"].to_pylist()),
        deaths=births.num_rows - births["death_step"].null_count,
        birth_rate=len(born) / n_features,
        null_births_mean=math.fsum(w["null_births_mean"] for w in windows),
        null_censored_births_mean=math.fsum(w["null_censored_births_mean"] for w in windows),
        null_false_birth_rate=summary["null_false_birth_rate"][0].as_py(),
        seed_births_agreement=summary["seed_births_agreement"][0].as_py(),
        seed_matched_features=summary["seed_matched_features"][0].as_py(),
        permutations=permutations, seed=seed, windows=windows,
        first_born=[{k: row[k] for k in shown} for row in born[:SHOWN_FEATURES]],
        last_born=[{k: row[k] for k in shown} for row in born[-SHOWN_FEATURES:][::-1]],
        seconds=time.monotonic() - started,
    )


def _seed_agreement(con: duckdb.DuckDBPyConnection, params: dict
                    ) -> tuple[float | None, int | None]:
    """(agreement, matched pairs) of births across the basis's seeds, or (None, None) for a
    basis fitted with one seed (or swept before its other seeds were).

    The same rule runs on every other seed's trajectories; each feature of a seed is paired with
    the basis feature it matches (seed_trajectories.matched_feature_id, decoder cosine >=
    MATCH_COSINE). A pair agrees when both are present at init, both are never born, or both are
    born within one checkpoint of each other.
    """
    seeds = [s for (s,) in con.execute(load_query("birth_analysis/seeds"),
                                       {"basis": params["basis"]}).fetchall()]
    if not seeds:
        return None, None
    agree = pairs = 0
    for other in seeds:
        ((one, both),) = con.execute(load_query("birth_analysis/seed_agreement"), {
            **params, "other": other, "cosine": MATCH_COSINE}).fetchall()
        agree, pairs = agree + (one or 0), pairs + both
    return (agree / pairs if pairs else None), pairs


def _check_parameters(metric: str, presence: str, threshold: float | None, persistence: int,
                      stable_eps: float, stable_cos: float, permutations: int) -> None:
    if metric not in METRICS:
        raise NotFoundError(
            f"--metric {metric!r} is not a trajectory metric; use one of: {', '.join(METRICS)}."
        )
    if presence not in PRESENCE:
        raise FeaturestoreError(
            f"--presence {presence!r}: use absolute (the threshold itself) or relative (a share "
            "of each feature's own peak of the metric)."
        )
    if threshold is not None:
        if not math.isfinite(threshold) or threshold <= 0:
            raise FeaturestoreError(
                f"--threshold {threshold}: give a number > 0 (every metric is >= 0, so a "
                "threshold <= 0 makes every feature present from the first checkpoint)."
            )
        if presence == "relative" and threshold > 1:
            raise FeaturestoreError(
                f"--threshold {threshold}: with --presence relative the threshold is a share of "
                "each feature's peak, in (0, 1]; above 1 no feature is ever present."
            )
        if metric == "activation_rate" and threshold > 1:
            raise FeaturestoreError(
                f"--threshold {threshold}: activation_rate is a share of tokens, at most 1; give "
                f"a threshold in (0, 1] (default {DEFAULT_ACTIVATION_RATE})."
            )
    if persistence < 1:
        raise FeaturestoreError(
            f"--persistence {persistence}: give a number of checkpoints >= 1 (1: no persistence "
            "required)."
        )
    if not math.isfinite(stable_eps) or stable_eps < 0:
        raise FeaturestoreError(
            f"--stable-eps {stable_eps}: give a relative tolerance >= 0, e.g. 0.1 (within 10% of "
            "the final value)."
        )
    if not -1 <= stable_cos <= 1:
        raise FeaturestoreError(f"--stable-cos {stable_cos}: a cosine lies in [-1, 1].")
    if permutations < 1:
        raise FeaturestoreError(
            f"--permutations {permutations}: the null needs at least 1 shuffled order (default 20)."
        )


def _check_trajectories(con: duckdb.DuckDBPyConnection, basis: str, metric: str,
                        persistence: int) -> tuple[int, int]:
    """(features, checkpoints) of the basis's trajectories, after checking the rule can run."""
    get_basis(con, basis)  # any basis with trajectories: checked next
    n_rows, n_features, n_checkpoints, missing_decoder = con.execute(
        load_query("birth_analysis/trajectory_counts"), {"basis": basis}).fetchone()
    if n_rows == 0:
        raise NotFoundError(
            f"--basis {basis!r} has no trajectories: run `featurestore feature-trajectory-sweep` "
            "on it first."
        )
    if metric == "decoder_norm" and missing_decoder:
        raise FeaturestoreError(
            f"--metric decoder_norm: basis {basis!r} has no decoder norms ({missing_decoder} "
            "trajectory rows are NULL); only crosscoder-kind bases have one decoder per "
            "checkpoint. Use --metric activation_rate, mean_activation or energy."
        )
    if n_checkpoints < persistence + 1:
        raise FeaturestoreError(
            f"--persistence {persistence} needs at least {persistence + 1} checkpoints (a first "
            f"one to be absent at, then {persistence} to persist over); basis {basis!r} has "
            f"{n_checkpoints}. Lower --persistence."
        )
    if n_rows != n_features * n_checkpoints:
        # Positions in the order would shift for the features with gaps.
        raise FeaturestoreError(
            f"basis {basis!r}: trajectories have {n_rows} rows, not one per feature and "
            f"checkpoint ({n_features} x {n_checkpoints}); re-run "
            "`featurestore feature-trajectory-sweep` on it."
        )
    return n_features, n_checkpoints


def _default_threshold(con: duckdb.DuckDBPyConnection, basis: str, metric: str, presence: str,
                       n_features: int) -> float:
    if presence == "relative":
        return DEFAULT_PEAK_SHARE
    if metric == "activation_rate":
        return DEFAULT_ACTIVATION_RATE
    if metric == "energy":
        return DEFAULT_ENERGY_SHARE / n_features
    (p99,) = con.execute(
        f"SELECT quantile_cont({metric}, 0.99) FROM trajectories WHERE basis = ?", [basis]
    ).fetchone()
    if not p99 or p99 <= 0:
        raise FeaturestoreError(
            f"--metric {metric}: basis {basis!r} has {metric} 0 almost everywhere, so no default "
            "threshold can be derived; give --threshold."
        )
    return DEFAULT_RELATIVE_THRESHOLD * p99
