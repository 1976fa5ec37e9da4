"""Feature births on hard planted activations: which birth rule can be trusted, at which fit.

The planted run of featurestore/planted.py (64 true features in superposition in d_model 32,
firing 1-10% of tokens at log-normal magnitudes, births at every one of 14 log-spaced checkpoints
including the last two, a few deaths, directions drifting slightly) is registered once into a
temporary warehouse. For every point of a small grid of dictionaries (dict_size 2x and 4x the
true features, k the true pooled L0 rounded up and twice that, so k above the true L0 is always
in) a pooled shared basis is fitted (shared-feature-fit, the quality bounds relaxed to what the
planted data supports) and swept (feature-trajectory-sweep), and every birth rule of RULES is run
(feature-birth-analyze, i.e. analyze_births with the rule's keyword arguments).

Planted features are matched to learned ones as a researcher would: by the best decoder cosine
of each planted (final) direction, never by index. For each (grid point, rule) it reports:

    births      planted births detected within one checkpoint of the truth (censored births
                included), of the planted ones (46 by default)
    cens        how many of those were censored (in the last K-1 checkpoints)
    well        births found / planted births among features matched at cosine >= 0.9 alone:
                tells a rule's misses from features the dictionary did not learn
    init        share of present-from-init features flagged present_at_init
    late@init   share of truly late features (born at index >= 1) flagged present_at_init
    null FBR    the shuffled-order null's false-birth rate (analyze_births' figure)
    null/born   the null's mean births over the births found: the share of what was found that
                the shuffled order produces too
    null@match  the null restricted to the learned features planted ones match (a diagnostic:
                how much of the null comes from latents that learned nothing planted)
    deaths      planted deaths detected within one checkpoint, of the planted ones (5)
    extra       births of learned features that no planted feature matches best
    cos         mean and min best-match decoder cosine of the planted features

against the bounds: births >= 95%, init >= 95%, late@init <= 5%, null FBR <= 5%; a figure out of
bounds is marked with `!`. The first rule, {}, is analyze_births' defaults, whatever they are;
rules whose keywords analyze_births does not take are skipped with a note. Stage wall times are
the measurements (seconds, timed once); the table is in the notes and, row by row, in details of
benchmarks/results/births.json. --quick runs one grid point with a shorter fit. Alone:
`python benchmarks/run.py --only births [--quick]`, or
`python benchmarks/bench_births.py [--quick] [--threads N]`.
"""

from __future__ import annotations

import inspect
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import BenchmarkResult, Measurement, RunOptions

from featurestore.ingest.birth_analysis import analyze_births
from featurestore.ingest.register import register_planted_run
from featurestore.ingest.shared_feature_fit import shared_feature_fit
from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep
from featurestore.planted import (
    PlantedConfig,
    PlantedRun,
    generate,
    match_features,
    score_births,
)
from featurestore.warehouse import connect

RUN, STAGE = "planted", "planted_stage"
CONFIG = PlantedConfig()
# Birth rules: keyword arguments of analyze_births (a threshold left out is the rule's default).
# Extend freely; a rule with a keyword that analyze_births does not take is skipped with a note.
RULES: list[dict] = [
    {},  # analyze_births' defaults, whatever they are
    {"metric": "activation_rate", "presence": "absolute"},  # default thresholds
    {"metric": "energy", "presence": "absolute"},
    {"metric": "mean_activation", "presence": "absolute"},
    {"metric": "mean_activation", "presence": "relative", "threshold": 0.1},
    {"metric": "mean_activation", "presence": "relative", "threshold": 0.2},
    {"metric": "activation_rate", "presence": "relative", "threshold": 0.2},
    {"metric": "energy", "presence": "relative", "threshold": 0.2},
    {"metric": "energy", "presence": "relative", "threshold": 0.1},
    {"metric": "energy", "presence": "relative", "threshold": 0.3},
    {"metric": "energy", "presence": "relative", "threshold": 0.4},
]
DICT_MULTIPLES = (2, 4)  # dict_size = multiple x true features
K_MULTIPLES = (1, 2)  # k = multiple x ceil(true pooled L0)
QUICK_GRID = ((2, 2),)  # (dict multiple, k multiple): k above the true L0
FIT_STEPS, QUICK_FIT_STEPS = 2000, 800
FIT_BATCH, FIT_LR = 512, 3e-3
# Planted data is denser than real stages (k / dict_size above the default 5%) and a 4x dictionary
# has many latents with nothing to learn: those bounds are relaxed; explained variance is not.
FIT_BOUNDS = {"max_active_fraction": 0.2, "max_dead_fraction": 0.9}
BOUNDS = {"births_share": (">=", 0.95), "init_share": (">=", 0.95),
          "late_at_init_share": ("<=", 0.05), "null_fbr": ("<=", 0.05)}
# Columns of `births` that key a rule's rows, when analyze_births' result carries them too.
RULE_KEYS = ("metric", "presence", "threshold", "persistence", "stable_eps", "stable_cos")


def run(options: RunOptions) -> BenchmarkResult:
    planted = generate(CONFIG)
    l0 = math.ceil(planted.mean_l0)
    grid = QUICK_GRID if options.quick else [(d, k) for d in DICT_MULTIPLES for k in K_MULTIPLES]
    points = [(d * planted.n_features, k * l0) for d, k in grid]
    fit_steps = QUICK_FIT_STEPS if options.quick else FIT_STEPS
    rules, skipped = usable_rules(RULES)
    for rule, why in skipped:
        print(f"  skipped rule {describe(rule)}: {why}", flush=True)

    timings: dict[str, list[float]] = {"register": [], "fit": [], "sweep": [], "analyze": []}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-births-") as tmp:
        root = Path(tmp) / "warehouse"
        started = time.perf_counter()
        register_planted_run(root, Path(tmp) / "activations", planted, STAGE, name=RUN)
        timings["register"].append(time.perf_counter() - started)
        print(f"  planted: {planted.n_features} features in d_model {CONFIG.d_model}, "
              f"{len(planted.present_from_init)} present from init, {len(planted.born)} born, "
              f"{len(planted.deaths)} deaths, {planted.n_checkpoints} checkpoints x "
              f"{planted.n_tokens} tokens, pooled L0 {planted.mean_l0:.2f}", flush=True)
        for dict_size, k in points:
            basis = f"planted-d{dict_size}-k{k}"
            started = time.perf_counter()
            fit = shared_feature_fit(RUN, STAGE, basis, dict_size=dict_size, k=k,
                                     steps=fit_steps, batch_size=FIT_BATCH, lr=FIT_LR,
                                     warehouse=root, progress=False, **FIT_BOUNDS)
            timings["fit"].append(time.perf_counter() - started)
            started = time.perf_counter()
            feature_trajectory_sweep(basis, warehouse=root, progress=False)
            timings["sweep"].append(time.perf_counter() - started)
            matches = learned_matches(root, basis, planted)
            cosines = [cosine for _, cosine in matches.values()]
            ev = min(fit.fit_quality["explained_variance"].values())
            print(f"  {basis}: fit {timings['fit'][-1]:.0f} s, min explained variance "
                  f"{ev:.3f}, match cosine mean {np.mean(cosines):.3f} min {min(cosines):.3f}, "
                  f"{len({f for f, _ in matches.values()})} distinct matches", flush=True)
            for rule in rules:
                started = time.perf_counter()
                result = analyze_births(basis, warehouse=root, **rule)
                timings["analyze"].append(time.perf_counter() - started)
                births = stored_births(root, basis, result)
                resolved = {key: value for key, value in result.to_dict().items()
                            if key in ("metric", "presence", "threshold")}
                row = {"dict_size": dict_size, "k": k,
                       "rule": describe(rule) if rule else f"default: {describe(resolved)}",
                       "resolved_rule": resolved,
                       "threshold_used": result.threshold, "min_explained_variance": ev,
                       "null_fbr": result.null_false_birth_rate, "births_found": result.births,
                       "null_births_mean": result.null_births_mean,
                       "null_per_birth": result.null_births_mean / max(result.births, 1),
                       "null_fbr_matched": matched_null_fbr(root, basis, result, matches, births),
                       **score_births(planted, matches, births).to_dict()}
                rows.append(row)
                print("  " + format_row(row), flush=True)

    measurements = [Measurement(f"{stage} ({len(t)}x)", "s", [sum(t)])
                    for stage, t in timings.items() if t]
    weighting = inspect.signature(shared_feature_fit).parameters.get("weighting")
    weighting = weighting.default if weighting is not None else "equal"
    notes = [f"planted: {describe_config(planted)}",
             f"grid (dict_size, k): {points}; fit {fit_steps} steps x {FIT_BATCH}, lr {FIT_LR}, "
             f"checkpoint weighting {weighting} (the default), bounds relaxed {FIT_BOUNDS}",
             "bounds: births >= 95% within one checkpoint, init >= 95%, late@init <= 5%, "
             "null FBR <= 5% (! marks a figure out of bounds)",
             HEADER, *[format_row(row) for row in rows]]
    notes += [f"skipped rule {describe(rule)}: {why}" for rule, why in skipped]
    return BenchmarkResult(
        name="births",
        description=(f"birth rules on hard planted activations: {len(rules)} rules x "
                     f"{len(points)} fits of {planted.n_features} features in superposition, "
                     f"{planted.n_checkpoints} checkpoints"),
        measurements=measurements,
        config={"planted": {k: v for k, v in vars(CONFIG).items()}, "grid": points,
                "fit_steps": fit_steps, "fit_batch": FIT_BATCH, "fit_lr": FIT_LR,
                "fit_weighting": weighting,
                "fit_bounds": FIT_BOUNDS, "rules": rules, "bounds": BOUNDS},
        details={"rows": rows, "skipped_rules": [{"rule": r, "why": w} for r, w in skipped],
                 "timings_s": timings},
        notes=notes,
    )


def usable_rules(rules: list[dict]) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(rules analyze_births accepts, [(rule, why skipped)])."""
    accepted = set(inspect.signature(analyze_births).parameters)
    usable, skipped = [], []
    for rule in rules:
        unknown = sorted(set(rule) - accepted)
        if unknown:
            skipped.append((rule, f"analyze_births does not take {', '.join(unknown)} yet"))
        else:
            usable.append(rule)
    return usable, skipped


def learned_matches(root: Path, basis: str, planted: PlantedRun) -> dict[int, tuple[int, float]]:
    """Planted feature -> (learned feature id with the closest decoder direction, cosine)."""
    con = connect(root)
    try:
        rows = con.execute("SELECT feature_id, direction FROM decoder_directions WHERE basis = ? "
                           "ORDER BY feature_id", [basis]).fetchall()
    finally:
        con.close()
    ids = [feature for feature, _ in rows]
    matches = match_features(planted.directions, np.array([d for _, d in rows]))
    return {p: (ids[m.learned], m.cosine) for p, m in enumerate(matches)}


def stored_births(root: Path, basis: str, result) -> dict[int, dict]:
    """The `births` rows of the rule `result` came from: feature id -> row."""
    con = connect(root)
    try:
        columns = {name for (name,) in con.execute(
            "SELECT column_name FROM (DESCRIBE births)").fetchall()}
        found = result.to_dict()
        keys = [key for key in RULE_KEYS if key in columns and key in found]
        where = " AND ".join(f"{key} = ?" for key in keys)
        table = con.sql(f"SELECT * FROM births WHERE basis = ? AND {where}",
                        params=[basis, *[found[key] for key in keys]]).to_arrow_table()
    finally:
        con.close()
    return {row["feature_id"]: row for row in table.to_pylist()}


def matched_null_fbr(root: Path, basis: str, result, matches: dict[int, tuple[int, float]],
                     births: dict[int, dict], permutations: int = 20, seed: int = 0) -> float:
    """The shuffled-order null restricted to the learned features some planted feature matches
    best: mean false births per permutation among those not present at init, over their number.
    A diagnostic beside analyze_births' figure (which counts every latent of the dictionary, the
    ones that learned nothing planted included), from the same feature_births macro."""
    matched = sorted({learned for learned, _ in matches.values()})
    candidates = [f for f in matched if not births[f]["present_at_init"]]
    found = result.to_dict()
    presence = ", presence := $presence" if "presence" in found else ""
    rng = np.random.default_rng(seed)
    con = connect(root)
    try:
        n = con.execute("SELECT count(DISTINCT step) FROM trajectories WHERE basis = ?",
                        [basis]).fetchone()[0]
        orders = [rng.permutation(n).tolist() for _ in range(permutations)]
        (false_births,) = con.execute(
            "SELECT count(birth_step) FROM feature_births($basis, $metric, $threshold, "
            f"$persistence, $stable_eps, $stable_cos{presence}, permutations := $orders) "
            "WHERE ordering > 0 AND list_contains($candidates, feature_id)",
            {**{key: found[key] for key in RULE_KEYS if key in found}, "basis": basis,
             "orders": orders, "candidates": candidates}).fetchone()
    finally:
        con.close()
    return false_births / permutations / len(matched)


def describe(rule: dict) -> str:
    return " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in rule.items()) or "(defaults)"


def describe_config(planted: PlantedRun) -> str:
    c = planted.config
    return (f"{c.n_features} features, d_model {c.d_model}, {len(c.steps)} checkpoints "
            f"{list(c.steps)}, {c.n_tokens} tokens each, rates {c.min_rate}-{c.max_rate} "
            f"log-uniform, scale log-normal sigma {c.scale_sigma}, noise {c.noise_std}, birth "
            f"ramp {c.birth_ramp}, min direction cosine {c.min_direction_cosine}; "
            f"{len(planted.present_from_init)} present from init, {len(planted.born)} born, "
            f"{len(planted.deaths)} deaths, pooled L0 {planted.mean_l0:.2f}, seed {c.seed}")


HEADER = (f"{'dict':>4} {'k':>2}  {'rule':<52} {'births':>12} {'cens':>4} {'well':>5} "
          f"{'init':>6} {'late@init':>9} {'null FBR':>8} {'null/born':>9} {'null@match':>10} "
          f"{'deaths':>6} "
          f"{'extra':>5} "
          f"{'cos mean/min':>12}")


def format_row(row: dict) -> str:
    def mark(key: str, text: str) -> str:
        op, bound = BOUNDS[key]
        ok = row[key] >= bound if op == ">=" else row[key] <= bound
        return text + (" " if ok else "!")

    births = f"{row['births_within_one']}/{row['births_planted']} {row['births_share']:.0%}"
    well = f"{row['births_well_matched']}/{row['born_well_matched']}"
    init, late, fbr = (f"{row['init_share']:.0%}", f"{row['late_at_init_share']:.0%}",
                       f"{row['null_fbr']:.1%}")
    deaths = f"{row['deaths_within_one']}/{row['deaths_planted']}"
    return (f"{row['dict_size']:>4} {row['k']:>2}  {row['rule']:<52} "
            f"{mark('births_share', births):>12} {row['births_censored']:>4} {well:>5} "
            f"{mark('init_share', init):>6} {mark('late_at_init_share', late):>9} "
            f"{mark('null_fbr', fbr):>8} {row['null_per_birth']:>9.2f} "
            f"{row['null_fbr_matched']:>10.1%} {deaths:>6} "
            f"{row['extra_births']:>5} "
            f"{row['match_cosine_mean']:.3f}/{row['match_cosine_min']:.3f}")

if __name__ == "__main__":
    import argparse

    from harness import format_table

    from featurestore.settings import set_torch_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one grid point, a shorter fit")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_torch_threads(args.threads)
    started = time.perf_counter()
    outcome = run(RunOptions(quick=args.quick, repeats=1, warmup=0))
    print(format_table(outcome))
    print(f"wall time: {time.perf_counter() - started:.0f} s")
