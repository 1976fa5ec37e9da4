"""Birth rules: the parameters of feature-birth-analyze, their defaults, and the SQL that selects
one rule's rows in `births` and `birth_summary` (which hold a row set per rule analysed).

Jobs, plots, graphs and the CLI all read the defaults from here, so one basis's graph, plots and
summaries show the same rule.
"""

from __future__ import annotations

import math

import duckdb

from featurestore.warehouse import records

METRICS = ("activation_rate", "mean_activation", "energy", "decoder_norm")
PRESENCE = ("absolute", "relative")
DEFAULT_ACTIVATION_RATE = 0.01
# energy: this fraction of an even share (1 / number of features) of the reconstruction.
DEFAULT_ENERGY_SHARE = 0.1
# mean_activation, decoder_norm: this fraction of the metric's 99th percentile over the basis.
DEFAULT_RELATIVE_THRESHOLD = 0.1
# The default rule: present where the feature's share of the reconstruction's energy is at least
# DEFAULT_PEAK_SHARE of its own peak over the checkpoints. On planted data with superposed
# features, varying rates and late births (featurestore.planted, benchmarks/bench_births.py), an
# absolute activation rate counted the weak firing a latent shows before its direction exists as
# presence, and flagged most late-born features present at init; energy relative to the peak
# does not.
DEFAULT_METRIC = "energy"
# K: with 3, the shuffled null found about a tenth as many births as the real order (5.5% of a
# 2x dictionary on the planted run); with 4, a sixteenth (3.4%), with the same births found.
DEFAULT_PERSISTENCE = 4
DEFAULT_PRESENCE = "relative"
DEFAULT_PEAK_SHARE = 0.4
DEFAULT_STABLE_EPS = 0.1
DEFAULT_STABLE_COS = 0.9

# The columns that key one birth-rule parameter set in `births` and `birth_summary`.
BIRTH_RULE_COLUMNS = ("metric", "presence", "threshold", "persistence", "stable_eps",
                      "stable_cos")


def default_births_rule() -> dict:
    """feature-birth-analyze's default parameter set, with the threshold it resolves for them
    (None where that depends on the basis's data: mean_activation, energy or decoder_norm under
    absolute presence)."""
    threshold = None
    if DEFAULT_PRESENCE == "relative":
        threshold = DEFAULT_PEAK_SHARE
    elif DEFAULT_METRIC == "activation_rate":
        threshold = DEFAULT_ACTIVATION_RATE
    return {"metric": DEFAULT_METRIC, "presence": DEFAULT_PRESENCE, "threshold": threshold,
            "persistence": DEFAULT_PERSISTENCE, "stable_eps": DEFAULT_STABLE_EPS,
            "stable_cos": DEFAULT_STABLE_COS}


def births_rule_sets(con: duckdb.DuckDBPyConnection, basis: str,
                     table: str = "births") -> list[dict]:
    """Every birth-rule parameter set stored for `basis` in `table` (births or birth_summary),
    preferred first (see the module docstring), each with `default` (whether it is
    feature-birth-analyze's default set) and `n_rows` (its rows in `table`)."""
    if table not in ("births", "birth_summary"):
        raise ValueError(f"births_rule_sets: table {table!r} is not births or birth_summary")
    columns = ", ".join(BIRTH_RULE_COLUMNS)
    sets = records(con, f"SELECT {columns}, count(*) AS n_rows FROM {table} WHERE basis = ? "
                        "GROUP BY ALL", [basis])
    default = default_births_rule()
    for candidate in sets:
        candidate["default"] = all(
            default[k] is None or same_value(candidate[k], default[k]) for k in BIRTH_RULE_COLUMNS)
    sets.sort(key=lambda r: (not r["default"], r["metric"] != default["metric"],
                             r["presence"] != default["presence"],
                             r["persistence"] != default["persistence"], r["threshold"],
                             r["persistence"], r["stable_eps"], r["stable_cos"], r["metric"],
                             r["presence"]))
    return sets


def shown_births_rule(con: duckdb.DuckDBPyConnection, basis: str,
                      table: str = "births") -> dict | None:
    """The one birth-rule parameter set that graphs, plots, feature cards and the web app show
    for `basis` (the preferred of births_rule_sets), keyed by BIRTH_RULE_COLUMNS plus `default`;
    None when no births are stored."""
    sets = births_rule_sets(con, basis, table)
    return {k: sets[0][k] for k in (*BIRTH_RULE_COLUMNS, "default")} if sets else None


def same_value(a, b) -> bool:
    """Equal, floats up to rounding (thresholds read back from Parquet)."""
    if isinstance(b, float):
        return a is not None and math.isclose(float(a), b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b
