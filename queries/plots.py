"""Plots of one basis, built straight from warehouse SQL, exported as JSON, PNG, SVG and HTML.

    from featurestore.queries.plots import export_plots
    export_plots("demo-l2")   # -> <warehouse>/exports/demo-l2/plots/<plot>.{json,png,svg,html}

Each plot is one small function `(con, basis) -> altair chart` over a `featurestore.connect()`
connection; `PLOTS` maps plot names to them. A function whose data the basis lacks (a pooled basis
has no relative-norm histogram, nothing patched yet, ...) raises `NoPlotData` with the reason and
the command that would produce the data; `export_plots` records it as skipped, not failed.

Data goes into every chart as `alt.InlineData(values=rows)`: rows are plain dicts from SQL, so the
exported spec carries exactly the rows the query returned. InlineData is also not run through
altair's data transformers, so a chart of more than 5,000 rows (a heatmap of every feature at
every checkpoint) never meets altair's MaxRowsError, and no global altair setting is changed.

Rendering is vl-convert's (bundled Vega, Vega-Lite and fonts): no browser and no network.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import altair as alt
import duckdb
import vl_convert as vlc
from altair.utils.schemapi import debug_mode

from featurestore.errors import FeaturestoreError
from featurestore.queries.exports import json_records, write_atomic
from featurestore.queries.page_queries import page_query
from featurestore.registry import get_basis
from featurestore.results import Result
from featurestore.schema import package_version
from featurestore.warehouse import Warehouse

WIDTH = 480
HEIGHT = 300
TOP_FEATURES = 12  # lines in the trajectory plot: more than ~12 colours cannot be told apart
PNG_SCALE = 2.0  # PNG pixels per Vega pixel: sharp on high-density screens and in papers
# model_diff's bands (sql/views/model_diff.sql): exclusive to the first source below 0.3,
# to the second above 0.7, shared between.
EXCLUSIVE_LOW, EXCLUSIVE_HIGH = 0.3, 0.7
FORMATS = ("json", "png", "svg", "html")


class NoPlotData(FeaturestoreError):
    """The basis has no rows for this plot (yet); the message says which job would write them."""


# -- the plots, one function each ---------------------------------------------------------------


def feature_trajectories(con: duckdb.DuckDBPyConnection, basis: str,
                         top: int = TOP_FEATURES) -> alt.Chart:
    """Activation rate over training of the `top` features with the largest peak energy (share of
    the reconstructed variance): the features that matter most at some point in training."""
    info = _basis(con, basis)
    rows = json_records(con, """
        WITH top AS (
            SELECT feature_id FROM trajectories WHERE basis = ?
            GROUP BY feature_id ORDER BY max(energy) DESC, feature_id LIMIT ?)
        SELECT feature_id, step, activation_rate, energy
        FROM trajectories
        WHERE basis = ? AND feature_id IN (SELECT feature_id FROM top)
        ORDER BY feature_id, step""", [basis, top, basis])
    _require(rows, _missing(info, "trajectories", "feature-trajectory-sweep"))
    chart, context = _with_top_context(alt.Chart(inline_data(rows)), con, basis)
    return (
        chart
        .transform_calculate(step_plus_1="datum.step + 1")
        .mark_line(point=True)
        .encode(
            x=_log_step_axis("step_plus_1"),
            y=alt.Y("activation_rate:Q", title="activation rate (share of tokens)"),
            color=alt.Color("feature_id:N", title="feature",
                            scale=alt.Scale(scheme="tableau20")),
            tooltip=[alt.Tooltip("feature_id:N", title="feature"), "step:Q",
                     alt.Tooltip("activation_rate:Q", format=".4f"),
                     alt.Tooltip("energy:Q", format=".4f"), *context],
        )
        .properties(
            title=alt.Title(f"{basis}: feature activation rate over training",
                            subtitle=f"the {top} features with the largest peak energy"),
            width=WIDTH, height=HEIGHT)
    )


def activation_heatmap(con: duckdb.DuckDBPyConnection, basis: str) -> alt.Chart:
    """Activation rate of every feature at every checkpoint, features in order of birth: present
    at initialisation first, then by birth step, then those never born. A censored birth (in the
    last K-1 checkpoints, present from it to the last) is labelled "born at step S (censored)" in
    the tooltip and counted in the subtitle. Checkpoints are columns of equal width (they are
    log-spaced, so a linear step axis would squash the early ones)."""
    info = _basis(con, basis)
    params = _birth_parameters(con, "births", basis)
    where, values = _parameter_filter(params)
    rows = json_records(con, f"""
        WITH born AS (
            SELECT feature_id, birth_step, birth_censored, present_at_init FROM births
            WHERE basis = ? {where}),
        features AS (
            SELECT DISTINCT feature_id FROM trajectories WHERE basis = ?),
        ordered AS (
            SELECT feature_id, birth_step, birth_censored, present_at_init,
                   row_number() OVER (ORDER BY coalesce(present_at_init, false) DESC,
                                               birth_step NULLS LAST, feature_id) AS birth_order
            FROM features LEFT JOIN born USING (feature_id))
        SELECT t.feature_id, t.step, t.activation_rate, o.birth_order,
               CASE WHEN o.present_at_init THEN 'present at init'
                    WHEN o.birth_censored THEN 'born at step ' || o.birth_step || ' (censored)'
                    WHEN o.birth_step IS NOT NULL THEN 'born at step ' || o.birth_step
                    ELSE 'not born' END AS birth,
               coalesce(o.birth_censored, false) AS birth_censored
        FROM trajectories AS t JOIN ordered AS o USING (feature_id)
        WHERE t.basis = ?
        ORDER BY o.birth_order, t.step""", [basis, *values, basis, basis])
    _require(rows, _missing(info, "trajectories", "feature-trajectory-sweep"))
    n_features = len({r["feature_id"] for r in rows})
    n_steps = len({r["step"] for r in rows})
    censored = len({r["feature_id"] for r in rows if r["birth_censored"]})
    order = (f"births: {_describe_parameters(params)}"
             + (f"; {censored} censored (present from birth to the last checkpoint, fewer than "
                f"K = {params['persistence']} observed)" if censored else "")
             if params else "no births stored (feature-birth-analyze), so in feature order")
    chart, context = _with_top_context(alt.Chart(inline_data(rows)), con, basis)
    return (
        chart
        .mark_rect()
        .encode(
            x=alt.X("step:O", title="checkpoint step"),
            y=alt.Y("feature_id:O", sort=alt.EncodingSortField("birth_order", op="min"),
                    title="feature (present at init, then by birth step)",
                    # Thousands of feature ids are unreadable: the order is what matters.
                    axis=alt.Axis(labels=n_features <= 100, ticks=n_features <= 100)),
            color=alt.Color("activation_rate:Q", title="activation rate",
                            scale=alt.Scale(type="sqrt", scheme="viridis")),
            tooltip=[alt.Tooltip("feature_id:O", title="feature"), "step:O",
                     alt.Tooltip("activation_rate:Q", format=".4f"), "birth:N", *context],
        )
        .properties(
            title=alt.Title(f"{basis}: activation rate of every feature at every checkpoint",
                            subtitle=f"{n_features} features x {n_steps} checkpoints; {order}"),
            width=_clamp(n_steps * 32, 240, 900), height=_clamp(n_features * 8, 200, 900))
    )


# birth_timeline's bar colours: births confirmed over K checkpoints, and censored births.
CONFIRMED_BIRTHS = "confirmed (present at K checkpoints)"
CENSORED_BIRTHS = "censored (present to the last checkpoint, < K observed)"


def birth_timeline(con: duckdb.DuckDBPyConnection, basis: str) -> alt.LayerChart:
    """Feature births per step window against the shuffled-order null: bars are real births,
    stacked as confirmed births (present at K checkpoints) under censored ones (present from the
    birth to the last checkpoint with fewer than K left, so only in the last K-1 windows); the
    grey band is the null's mean +- sd. Bars well above the band are births the order explains."""
    info = _basis(con, basis)
    params = _birth_parameters(con, "birth_summary", basis)
    _require(params, _missing(info, "birth_summary rows", "feature-birth-analyze"))
    where, values = _parameter_filter(params)
    # censored_births is NULL on rows written before births could be censored: the rule of then
    # found none, so they count as 0.
    rows = json_records(con, f"""
        SELECT window_start, window_end, births,
               coalesce(censored_births, 0) AS censored_births,
               births - coalesce(censored_births, 0) AS confirmed_births,
               null_births_mean, null_censored_births_mean,
               coalesce(null_births_sd, 0) AS null_births_sd,
               greatest(null_births_mean - coalesce(null_births_sd, 0), 0) AS null_low,
               null_births_mean + coalesce(null_births_sd, 0) AS null_high,
               n_features, n_present_at_init, permutations
        FROM birth_summary WHERE basis = ? {where}
        ORDER BY window_end""", [basis, *values])
    # Windows are (window_start, window_end] on a log step axis: step + 1 so step 0 has a place.
    base = alt.Chart().transform_calculate(
        x0="datum.window_start + 1", x1="datum.window_end + 1"
    ).encode(x=_log_step_axis("x0"), x2="x1:Q")
    # One bar segment per window and kind, stacked by hand: confirmed from 0, censored on top.
    # A bar ranged in x does not start at zero by itself: y2 pins each segment's foot.
    bars = base.transform_fold(
        ["confirmed_births", "censored_births"], as_=["kind", "count"]
    ).transform_filter("datum.count > 0").transform_calculate(
        censored="datum.kind == 'censored_births'",
        birth_kind=f"datum.kind == 'censored_births' ? '{CENSORED_BIRTHS}' : '{CONFIRMED_BIRTHS}'",
        foot="datum.kind == 'censored_births' ? datum.confirmed_births : 0",
        top="datum.kind == 'censored_births' ? datum.births : datum.confirmed_births",
    ).mark_bar(stroke="white", opacity=0.85).encode(
        y=alt.Y("top:Q", title="features born in the window"), y2="foot:Q",
        color=alt.Color("birth_kind:N", title="births",
                        scale=alt.Scale(domain=[CONFIRMED_BIRTHS, CENSORED_BIRTHS],
                                        range=["#4c78a8", "#f58518"]),
                        legend=alt.Legend(orient="bottom", direction="vertical",
                                          labelLimit=400)),
        tooltip=["window_start:Q", "window_end:Q", "births:Q",
                 alt.Tooltip("confirmed_births:Q", title="confirmed births"),
                 alt.Tooltip("censored_births:Q", title="censored births"),
                 alt.Tooltip("null_births_mean:Q", format=".2f"),
                 alt.Tooltip("null_censored_births_mean:Q", format=".2f"),
                 alt.Tooltip("null_births_sd:Q", format=".2f"), "permutations:Q"])
    # The band goes over the bars, see-through and outlined, so both stay readable.
    null_band = base.mark_rect(color="#555555", opacity=0.35, stroke="black", strokeWidth=1
                               ).encode(y="null_low:Q", y2="null_high:Q")
    null_mean = base.mark_rule(color="black", strokeDash=[4, 3]).encode(y="null_births_mean:Q")
    first = rows[0]
    censored = sum(r["censored_births"] for r in rows)
    return alt.layer(bars, null_band, null_mean, data=inline_data(rows)).properties(
        title=alt.Title(
            f"{basis}: feature births per checkpoint window",
            subtitle=[f"{_describe_parameters(params)}; {first['n_features']} features, "
                      f"{first['n_present_at_init']} present at init, "
                      f"{sum(r['births'] for r in rows)} born ({censored} censored)",
                      f"censored: born in the last K-1 = {params['persistence'] - 1} window(s), "
                      "present to the last checkpoint, persistence not observed in full",
                      f"grey: shuffled-order null mean +- sd ({first['permutations']} "
                      "permutations); dashed: null mean"]),
        width=WIDTH, height=HEIGHT)


def compare_scatter(con: duckdb.DuckDBPyConnection, basis: str) -> alt.LayerChart:
    """Activation rate of every feature at the source against the target checkpoint of the most
    recent feature-compare. Symlog axes: rates span orders of magnitude and many are exactly 0,
    which a log axis cannot show; the linear zone is one token's worth of rate."""
    info = _basis(con, basis)
    pair = con.execute("""
        SELECT source_step, target_step FROM diffs WHERE basis = ?
        GROUP BY source_step, target_step
        ORDER BY max(created_at) DESC, target_step - source_step DESC
        LIMIT 1""", [basis]).fetchall()
    _require(pair, _missing(info, "diffs", "feature-compare", "--source STEP --target STEP"))
    source, target = pair[0]
    rows = json_records(con, """
        SELECT feature_id, source_activation_rate, target_activation_rate, log_rate_ratio,
               direction_cosine, rank_by_log_ratio
        FROM diffs WHERE basis = ? AND source_step = ? AND target_step = ?
        ORDER BY feature_id""", [basis, source, target])
    # The pseudo-count of log_rate_ratio (diffs): one token of activity at either checkpoint.
    (tokens,) = con.execute("SELECT min(n_tokens) FROM trajectories WHERE basis = ? AND step IN "
                            "(?, ?)", [basis, source, target]).fetchone()
    one_token = 1.0 / tokens if tokens else 1e-4
    ticks = [0.0] + [10.0 ** -k for k in range(6, -1, -1) if 10.0 ** -k >= one_token]

    def rate_axis(channel, field_name: str, title: str):
        return channel(field_name, title=title, axis=alt.Axis(values=ticks, format="~g"),
                       scale=alt.Scale(type="symlog", constant=one_token, domain=[0, 1]))

    diagonal = alt.Chart(inline_data([{"rate": 0.0}, {"rate": 1.0}])).mark_line(
        color="grey", strokeDash=[4, 4]
    ).encode(x=rate_axis(alt.X, "rate:Q", f"activation rate at step {source}"),
             y=rate_axis(alt.Y, "rate:Q", f"activation rate at step {target}"))
    chart, context = _with_top_context(alt.Chart(inline_data(rows)), con, basis)
    points = chart.mark_circle(size=40, opacity=0.8).encode(
        x=rate_axis(alt.X, "source_activation_rate:Q", f"activation rate at step {source}"),
        y=rate_axis(alt.Y, "target_activation_rate:Q", f"activation rate at step {target}"),
        color=alt.Color("log_rate_ratio:Q", title="log rate ratio",
                        scale=alt.Scale(scheme="blueorange", domainMid=0)),
        tooltip=[alt.Tooltip("feature_id:N", title="feature"),
                 alt.Tooltip("source_activation_rate:Q", format=".4f"),
                 alt.Tooltip("target_activation_rate:Q", format=".4f"),
                 alt.Tooltip("log_rate_ratio:Q", format=".3f"),
                 alt.Tooltip("direction_cosine:Q", format=".3f"), "rank_by_log_ratio:Q",
                 *context])
    return alt.layer(diagonal, points).properties(
        title=alt.Title(f"{basis}: activation rate per feature, step {source} vs step {target}",
                        subtitle="dashed: unchanged; symlog axes, linear below one token"),
        width=HEIGHT + 60, height=HEIGHT + 60)


def patch_effects(con: duckdb.DuckDBPyConnection, basis: str) -> alt.FacetChart:
    """Loss change of patching each feature set, per token split, for the most recent
    feature-patch checkpoint pair; one panel per mode. The grey bar behind each effect reaches
    +-|spliced_loss_delta|: the loss change of splicing the whole reconstruction in, i.e. what the
    basis's approximation alone can do. An effect inside it is not evidence of a causal feature."""
    info = _basis(con, basis)
    pair = con.execute("""
        SELECT source_step, target_step FROM patches WHERE basis = ? AND metric = 'loss'
        GROUP BY source_step, target_step
        ORDER BY max(created_at) DESC, target_step DESC, source_step
        LIMIT 1""", [basis]).fetchall()
    _require(pair, _missing(info, "patches", "feature-patch", "--source STEP --target STEP"))
    source, target = pair[0]
    rows = json_records(con, """
        SELECT CASE WHEN mode = 'scale' THEN 'scale x' || scale ELSE mode END AS mode,
               feature_set, len(feature_ids) AS n_features, split, clean, patched, delta,
               spliced_loss_delta, -abs(spliced_loss_delta) AS recon_low,
               abs(spliced_loss_delta) AS recon_high, recon_rel_error, error_norm_share, n_tokens,
               dense_rank() OVER (ORDER BY len(feature_ids), feature_ids) AS set_order
        FROM patches
        WHERE basis = ? AND metric = 'loss' AND source_step = ? AND target_step = ?
        ORDER BY mode, set_order, split""", [basis, source, target])
    base = alt.Chart().encode(
        x=alt.X("feature_set:N", title="patched feature set",
                sort=alt.EncodingSortField("set_order", op="min")),
        xOffset=alt.XOffset("split:N"))
    # Same width as the effect bar, behind it: grey showing beyond the bar is reconstruction
    # error the effect does not exceed.
    recon = base.mark_bar(color="lightgrey").encode(y="recon_low:Q", y2="recon_high:Q")
    effect = base.mark_bar().encode(
        y=alt.Y("delta:Q", title="loss change, patched - clean (nats)"),
        color=alt.Color("split:N", title="split"),
        tooltip=["feature_set:N", "split:N", alt.Tooltip("delta:Q", format=".5f"),
                 alt.Tooltip("clean:Q", format=".4f"), alt.Tooltip("patched:Q", format=".4f"),
                 alt.Tooltip("spliced_loss_delta:Q", format=".5f"),
                 alt.Tooltip("recon_rel_error:Q", format=".3f"),
                 alt.Tooltip("error_norm_share:Q", format=".3f"), "n_tokens:Q"])
    return (
        alt.layer(recon, effect, data=inline_data(rows))
        .properties(width=_clamp(len({r["feature_set"] for r in rows}) * 90, 200, 700),
                    height=HEIGHT)
        .facet(column=alt.Column("mode:N", title="mode"))
        .properties(title=alt.Title(
            f"{basis}: loss change when patching features into step {target} "
            f"(source step {source})",
            subtitle="grey: +-|loss change of splicing the reconstruction in|; effects inside "
                     "it are within the reconstruction error (recon_rel_error in the tooltip)"))
    )


def relative_norm_histogram(con: duckdb.DuckDBPyConnection, basis: str) -> alt.LayerChart:
    """The crosscoder plot: live latents by relative decoder norm ||d_B|| / (||d_A|| + ||d_B||),
    with model_diff's class bands behind (exclusive to A below 0.3, to B above 0.7, shared
    between) labelled with their latent counts."""
    info = _basis(con, basis)
    if info["n_sources"] != 2:
        raise NoPlotData(f"{basis} is a {info['kind']} basis with {info['n_sources']} source(s); "
                         "relative decoder norms need a two-source crosscoder (train-crosscoder)")
    rows = json_records(con, """
        SELECT bin_start, bin_start + 0.05 AS bin_end, n_features
        FROM relative_norm_histogram WHERE basis = ? ORDER BY bin_start""", [basis])
    _require(rows, f"{basis} has no live latents: every latent is dead")
    counts = dict(con.execute("SELECT class, count(*) FROM model_diff WHERE basis = ? "
                              "GROUP BY class", [basis]).fetchall())
    first, second = info["labels"]
    bands = [(0.0, EXCLUSIVE_LOW, f"{first}-exclusive"),
             (EXCLUSIVE_LOW, EXCLUSIVE_HIGH, "shared"),
             (EXCLUSIVE_HIGH, 1.0, f"{second}-exclusive")]
    band_rows = [{"start": lo, "end": hi, "class": f"{name} ({counts.get(name, 0)})"}
                 for lo, hi, name in bands]
    band = alt.Chart(inline_data(band_rows)).mark_rect(opacity=0.18).encode(
        x=alt.X("start:Q", title=f"relative decoder norm (0 = {first} only, 1 = {second} only)",
                scale=alt.Scale(domain=[0, 1])),
        x2="end:Q",
        color=alt.Color("class:N", title="class (latents)", sort=[r["class"] for r in band_rows],
                        scale=alt.Scale(range=["#e45756", "#bab0ac", "#4c78a8"])),
        tooltip=["class:N"])
    edges = alt.Chart(inline_data([{"x": EXCLUSIVE_LOW}, {"x": EXCLUSIVE_HIGH}])).mark_rule(
        strokeDash=[4, 3], color="black").encode(x="x:Q")
    bars = alt.Chart(inline_data(rows)).mark_bar(color="#333333", stroke="white").encode(
        x="bin_start:Q", x2="bin_end:Q",
        y=alt.Y("n_features:Q", title="live latents"), y2=alt.datum(0),
        tooltip=[alt.Tooltip("bin_start:Q", format=".2f"), alt.Tooltip("bin_end:Q", format=".2f"),
                 "n_features:Q"])
    dead = counts.get("dead", 0)
    return alt.layer(band, edges, bars).properties(
        title=alt.Title(f"{basis}: relative decoder norm of the live latents ({first} vs {second})",
                        subtitle=f"bands at {EXCLUSIVE_LOW} / {EXCLUSIVE_HIGH} (model_diff); "
                                 f"{dead} dead latent(s) left out"),
        width=WIDTH, height=HEIGHT)


def training_curves(con: duckdb.DuckDBPyConnection, basis: str) -> alt.VConcatChart:
    """The basis's training: loss, and explained variance (overall and per source), over
    optimiser steps."""
    _basis(con, basis)
    rows = json_records(con, """
        SELECT step, tokens, metric, value,
               CASE WHEN metric = 'loss' THEN 'loss' ELSE 'explained variance' END AS panel
        FROM training_metrics
        WHERE basis = ? AND (metric = 'loss' OR metric LIKE 'explained_variance%')
        ORDER BY panel, metric, step""", [basis])
    _require(rows, f"no training_metrics rows for {basis}: bases trained here log them "
                   "(train-crosscoder, shared-feature-fit); this one has none stored")

    def panel(name: str, title: str) -> alt.Chart:
        return alt.Chart().transform_filter(alt.datum.panel == name).mark_line(point=True).encode(
            x=alt.X("step:Q", title="optimiser step"),
            y=alt.Y("value:Q", title=title, scale=alt.Scale(zero=False)),
            color=alt.Color("metric:N", title="metric"),
            tooltip=["metric:N", "step:Q", "tokens:Q", alt.Tooltip("value:Q", format=".4f")],
        ).properties(width=WIDTH, height=HEIGHT // 2 + 40)

    return alt.vconcat(panel("loss", "loss (normalised units)"),
                       panel("explained variance", "explained variance"),
                       data=inline_data(rows)).resolve_scale(color="independent").properties(
        title=alt.Title(f"{basis}: training curves"))


def checkpoint_summary(con: duckdb.DuckDBPyConnection, basis: str) -> alt.HConcatChart:
    """How well the shared basis fits each checkpoint of its run: explained variance and L0
    (active features per token) over training."""
    info = _basis(con, basis)
    rows = json_records(con, """
        SELECT step, n_tokens, explained_variance, relative_reconstruction_error, l0,
               active_fraction, dead_fraction
        FROM checkpoint_summary WHERE basis = ? ORDER BY step""", [basis])
    _require(rows, _missing(info, "checkpoint_summary rows", "feature-trajectory-sweep"))
    tooltip = ["step:Q", alt.Tooltip("explained_variance:Q", format=".4f"),
               alt.Tooltip("relative_reconstruction_error:Q", format=".4f"),
               alt.Tooltip("l0:Q", format=".2f"), alt.Tooltip("dead_fraction:Q", format=".3f")]

    def panel(column: str, title: str) -> alt.Chart:
        return alt.Chart().transform_calculate(step_plus_1="datum.step + 1").mark_line(
            point=True).encode(
            x=_log_step_axis("step_plus_1"),
            y=alt.Y(f"{column}:Q", title=title, scale=alt.Scale(zero=False)),
            tooltip=tooltip,
        ).properties(width=WIDTH * 3 // 4, height=HEIGHT)

    return alt.hconcat(panel("explained_variance", "explained variance"),
                       panel("l0", "L0 (active features per token)"),
                       data=inline_data(rows)).properties(
        title=alt.Title(f"{basis}: fit of the basis at each checkpoint"))


# -- plots of one feature or run (the web app's pages), from the page queries of sql/pages ------


def feature_trajectory(con: duckdb.DuckDBPyConnection, basis: str, feature_id: int,
                       births_rule: dict | None = None) -> alt.HConcatChart:
    """One feature over training: activation rate, energy (share of the reconstruction) and
    drift (running sum of 1 - cosine with the previous direction), with its birth,
    stabilisation and death under `births_rule` (births columns) marked as vertical rules."""
    info = _basis(con, basis)
    params = {"basis": basis, "feature": feature_id}
    rows = page_query("feature_trajectory").run(con, params).records()
    _require(rows, _missing(info, "trajectories", "feature-trajectory-sweep"))
    birth = (page_query("feature_birth").run(con, {**params, **births_rule}).first()
             if births_rule else None)
    return alt.HConcatChart.from_dict(
        feature_trajectory_spec(basis, feature_id, rows, birth, births_rule))


def feature_trajectory_spec(basis: str, feature_id: int, rows: list[dict], birth: dict | None,
                            births_rule: dict | None) -> dict:
    """feature_trajectory's Vega-Lite spec from rows already read (sql/pages/
    feature_trajectory.sql's, and feature_birth.sql's row or None). The chart's structure is
    built by altair once per process and the rows go in as named datasets: building it anew
    costs more than every query of a feature page together."""
    events = [{"event": event, "step": birth[column], "x": birth[column] + 1}
              for event, column in (("birth", "birth_step"),
                                    ("stabilisation", "stabilization_step"),
                                    ("death", "death_step"))
              if birth and birth.get(column) is not None]
    title = {"text": f"{basis}: feature {feature_id} over training",
             "subtitle": (f"births: {_describe_parameters(births_rule)}" if births_rule
                          else "no births stored (feature-birth-analyze)")}
    return _filled(_feature_trajectory_template(), title,
                   {"trajectory": rows, "events": events})


@cache
def _feature_trajectory_template() -> str:
    events = alt.Chart(alt.NamedData("events")).mark_rule(strokeDash=[4, 3], strokeWidth=2
                                                          ).encode(
        x="x:Q", color=alt.Color("event:N", title="event",
                                 scale=alt.Scale(domain=["birth", "stabilisation", "death"],
                                                 range=["#54a24b", "#4c78a8", "#e45756"])),
        tooltip=["event:N", "step:Q"])

    def panel(column: str, title: str) -> alt.LayerChart:
        line = alt.Chart(alt.NamedData("trajectory")).transform_calculate(
            step_plus_1="datum.step + 1").mark_line(point=True, color="#333333").encode(
            x=_log_step_axis("step_plus_1"), y=alt.Y(f"{column}:Q", title=title),
            tooltip=["step:Q", alt.Tooltip(f"{column}:Q", format=".5f")])
        return alt.layer(line, events).properties(width=WIDTH * 5 // 8, height=HEIGHT * 2 // 3)

    return json.dumps(_spec(alt.hconcat(panel("activation_rate", "activation rate"),
                                        panel("energy", "energy (share of reconstruction)"),
                                        panel("drift", "drift (sum of 1 - cosine)"))))


def activation_histogram(con: duckdb.DuckDBPyConnection, basis: str, feature_id: int, step: int,
                         bins: int = 20) -> alt.Chart:
    """How strongly one feature fires at one checkpoint: its non-zero activations in `bins`
    equal bins (feature_activations)."""
    info = _basis(con, basis)
    rows = page_query("feature_activations").run(
        con, {"basis": basis, "feature": feature_id, "step": step, "bins": bins}).records()
    _require(rows, f"feature {feature_id} of {basis} never fires at step {step}" if info["run"]
             else _missing(info, "feature_activations", "feature-trajectory-sweep"))
    return alt.Chart.from_dict(activation_histogram_spec(feature_id, step, rows))


def activation_histogram_spec(feature_id: int, step: int, rows: list[dict]) -> dict:
    """activation_histogram's Vega-Lite spec from sql/pages/feature_activations.sql's rows."""
    return _filled(_activation_histogram_template(),
                   f"feature {feature_id} at step {step}: non-zero activations", {"bins": rows})


@cache
def _activation_histogram_template() -> str:
    return json.dumps(_spec(alt.Chart(alt.NamedData("bins")).mark_bar(
        color="#4c78a8", stroke="white").encode(
        x=alt.X("bin_start:Q", title="activation"), x2="bin_end:Q",
        y=alt.Y("n_tokens:Q", title="tokens"), y2=alt.datum(0),
        tooltip=["bin_start:Q", "bin_end:Q", "n_tokens:Q"],
    ).properties(width=WIDTH * 3 // 4, height=HEIGHT // 2)))


def _filled(template: str, title, datasets: dict[str, list[dict]]) -> dict:
    """A chart template (a spec whose data are named datasets, as JSON) with its title and the
    rows of each dataset."""
    spec = json.loads(template)
    spec["title"] = title
    spec["datasets"] = datasets
    return spec


def run_metrics(con: duckdb.DuckDBPyConnection, run: str) -> alt.HConcatChart:
    """A run's loss and accuracy on each data split at every checkpoint (checkpoint_metrics)."""
    rows = json_records(con, "SELECT step, split, loss, accuracy FROM checkpoint_metrics "
                             "WHERE run = ? ORDER BY split, step", [run])
    _require(rows, f"run {run} has no checkpoints with metrics (featurestore register or "
                   "evaluate-checkpoints writes them)")

    def panel(column: str, title: str) -> alt.Chart:
        return alt.Chart().transform_calculate(step_plus_1="datum.step + 1").mark_line(
            point=True).encode(
            x=_log_step_axis("step_plus_1"),
            y=alt.Y(f"{column}:Q", title=title, scale=alt.Scale(zero=False)),
            color=alt.Color("split:N", title="split"),
            tooltip=["split:N", "step:Q", alt.Tooltip(f"{column}:Q", format=".4f")],
        ).properties(width=WIDTH * 3 // 4, height=HEIGHT)

    return alt.hconcat(panel("loss", "loss"), panel("accuracy", "accuracy"),
                       data=inline_data(rows)).properties(
        title=alt.Title(f"{run}: loss and accuracy per split over training"))


# Plot name -> function. The name is the file stem of the exported files.
PLOTS = {
    "feature_trajectories": feature_trajectories,
    "activation_heatmap": activation_heatmap,
    "birth_timeline": birth_timeline,
    "compare_scatter": compare_scatter,
    "patch_effects": patch_effects,
    "relative_norm_histogram": relative_norm_histogram,
    "training_curves": training_curves,
    "checkpoint_summary": checkpoint_summary,
}


# -- writing ------------------------------------------------------------------------------------


def save_plot(chart: alt.TopLevelMixin, out_dir: str | os.PathLike, name: str,
              scale: float = PNG_SCALE) -> dict[str, Path]:
    """Write `chart` as <name>.json (the Vega-Lite spec with its data inline, and provenance),
    <name>.png (`scale` pixels per Vega pixel), <name>.svg and <name>.html (self-contained: every
    script inline, renders offline). Everything is rendered before anything is written, and each
    file is written to a temp name in `out_dir` and renamed into place, so a reader sees either
    the old file or the new one, never half of one. Returns {format: path}."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise FeaturestoreError(f"plot name {name!r}: use letters, digits, '.', '_' and '-'")
    spec = _spec(chart)
    title = _title_text(spec) or name
    version = _vegalite_version()
    document = {"name": name, "title": title, "spec": spec,
                "generator": f"featurestore {package_version()}", "schema": spec.get("$schema")}
    page = vlc.vegalite_to_html(spec, vl_version=version, bundle=True)
    # vl-convert titles every page "Chart"; the plot's own title is what a browser tab should say.
    page = page.replace("<title>Chart</title>", f"<title>{html.escape(title)}</title>", 1)
    payloads = {
        "json": json.dumps(document, separators=(",", ":"), allow_nan=False).encode(),
        "png": vlc.vegalite_to_png(spec, vl_version=version, scale=scale),
        "svg": vlc.vegalite_to_svg(spec, vl_version=version).encode(),
        "html": page.encode(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {fmt: write_atomic(out / f"{name}.{fmt}", _bytes_writer(payloads[fmt]))
            for fmt in FORMATS}


@dataclass
class PlotExport(Result):
    basis: str
    out: Path
    written: dict[str, dict[str, Path]] = field(default_factory=dict)  # plot -> format -> file
    skipped: dict[str, str] = field(default_factory=dict)  # plot -> why
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"basis": self.basis, "out": str(self.out),
                "written": {plot: {fmt: str(path) for fmt, path in files.items()}
                            for plot, files in self.written.items()},
                "skipped": dict(self.skipped), "seconds": self.seconds}

    def summary(self) -> str:
        lines = [f"{len(self.written)} plots of {self.basis!r} written to {self.out} in "
                 f"{self.seconds:.1f}s: {', '.join(self.written)}"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def export_plots(basis: str, out: str | os.PathLike | None = None,
                 warehouse: str | os.PathLike | None = None, plots: list[str] | None = None,
                 scale: float = PNG_SCALE) -> PlotExport:
    """Every plot of `PLOTS` (or the `plots` named) that `basis` has data for, saved with
    `save_plot` under `out` (default <warehouse root>/exports/<basis>/plots). Plots the basis
    lacks data for are skipped with the reason, not errors; an unknown basis is."""
    started = time.perf_counter()
    unknown = sorted(set(plots or ()) - set(PLOTS))
    if unknown:
        raise FeaturestoreError(f"unknown plot(s) {', '.join(unknown)}; plots: {', '.join(PLOTS)}")
    wh = Warehouse(warehouse)
    with wh.connect() as con:
        _basis(con, basis)  # an unknown basis fails here, before anything is created
        target = Path(out) if out is not None else wh.root / "exports" / basis / "plots"
        result = PlotExport(basis=basis, out=target)
        for name in plots or PLOTS:
            try:
                chart = PLOTS[name](con, basis)
            except NoPlotData as why:
                result.skipped[name] = str(why)
                continue
            result.written[name] = save_plot(chart, target, name, scale=scale)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


# -- helpers ------------------------------------------------------------------------------------


def _basis(con: duckdb.DuckDBPyConnection, basis: str) -> dict:
    """The basis's row with its sources' labels; NotFoundError naming the others."""
    info = get_basis(con, basis)
    return {**info, "labels": [s["label"] for s in info["sources"]]}


def _missing(info: dict, what: str, command: str, arguments: str = "") -> str:
    """Why a plot is skipped: which job writes its rows, or why that job does not apply."""
    name = info["name"]
    if info["run"] is None:  # train-crosscoder bases are not tied to a run's checkpoints
        return (f"{name} is a train-crosscoder basis: {what} come from {command} on a shared "
                "basis (shared-feature-fit)")
    return f"no {what} for {name}: run featurestore {command} --basis {name} {arguments}".strip()


def _with_top_context(chart: alt.Chart, con: duckdb.DuckDBPyConnection, basis: str
                      ) -> tuple[alt.Chart, list[alt.Tooltip]]:
    """A per-feature chart with each feature's strongest example at the last swept checkpoint
    looked up by feature_id (one row per feature, not per point), and the tooltips that show
    it: the activating token and its context, as text with the token marked ⟦token⟧ where the
    run has token strings, else as ids. Unchanged, with no tooltips, before a sweep."""
    rows = json_records(con, """
        SELECT feature_id,
               example_token(token_text, context_token_ids, position, context_start)
                   AS top_token,
               example_context(context_text, context_token_ids, position, context_start)
                   AS top_context
        FROM feature_examples
        WHERE basis = ? AND rank = 1
          AND step = (SELECT max(step) FROM feature_examples WHERE basis = ?)
        ORDER BY feature_id""", [basis, basis])
    if not rows:
        return chart, []
    lookup = alt.LookupData(data=inline_data(rows), key="feature_id",
                            fields=["top_token", "top_context"])
    return chart.transform_lookup(lookup="feature_id", from_=lookup), [
        alt.Tooltip("top_token:N", title="top token (last checkpoint)"),
        alt.Tooltip("top_context:N", title="top context (last checkpoint)")]


def _require(rows, reason: str) -> None:
    if not rows:
        raise NoPlotData(reason)


def _birth_parameters(con: duckdb.DuckDBPyConnection, table: str, basis: str) -> dict | None:
    """One birth-rule parameter set stored for the basis (births and birth_summary can hold
    several): the one the graphs use too, feature-birth-analyze's defaults when stored, else the
    closest (`featurestore.birth_rules.births_rule_sets`). Its keys are BIRTH_RULE_COLUMNS."""
    from featurestore.birth_rules import BIRTH_RULE_COLUMNS, shown_births_rule

    rule = shown_births_rule(con, basis, table)
    return None if rule is None else {k: rule[k] for k in BIRTH_RULE_COLUMNS}


def _parameter_filter(params: dict | None) -> tuple[str, list]:
    if params is None:
        return "", []
    return "".join(f" AND {p} = ?" for p in params), list(params.values())


def _describe_parameters(params: dict) -> str:
    bound = (f"{params['threshold']:g} x its peak" if params["presence"] == "relative"
             else f"{params['threshold']:g}")
    return f"{params['metric']} >= {bound} for K = {params['persistence']} checkpoints"


def _log_step_axis(column: str) -> alt.X:
    # A log axis cannot place step 0 (the initialisation), so the axis is step + 1.
    return alt.X(f"{column}:Q", scale=alt.Scale(type="log", nice=False),
                 title="training step + 1 (log scale; 1 = initialisation)")


def inline_data(rows: list[dict]) -> alt.InlineData:
    # altair's debug mode validates every row against the schema as the object is built, which
    # for a heatmap of thousands of cells is most of an export's time. The rows are plain JSON
    # values from json_records, and the whole spec is still validated once, in _spec's to_dict.
    with debug_mode(False):
        return alt.InlineData(values=rows)


def _clamp(value: float, low: int, high: int) -> int:
    return int(max(low, min(high, value)))


def _spec(chart: alt.TopLevelMixin) -> dict:
    # Charts built here carry InlineData, which skips the data transformers. A caller's chart may
    # carry a DataFrame: inline it through the default transformer with no row limit, for this
    # call only (altair restores its previous transformer state on leaving the block).
    with alt.data_transformers.enable("default", max_rows=None):
        return chart.to_dict()


def _title_text(spec: dict) -> str:
    title = spec.get("title")
    if isinstance(title, dict):
        title = title.get("text")
    if isinstance(title, list):
        title = " ".join(map(str, title))
    return title or ""


def _vegalite_version() -> str | None:
    """The Vega-Lite version altair writes specs for, in vl-convert's spelling, if it has it."""
    wanted = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return wanted if wanted in vlc.get_vegalite_versions() else None


def _bytes_writer(data: bytes):
    return lambda path: path.write_bytes(data)
