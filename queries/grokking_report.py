"""The grokking experiment's report: the paper's phases beside the store's births.

    from featurestore.queries.grokking_report import write_grokking_report
    write_grokking_report("grok")   # -> <warehouse>/exports/grok/report/report.{md,html}

Sections, each a question, its SQL (sql/grokking_report/) and the answer (queries/report.py
renders them):

    Phases                 memorisation, the test-accuracy jump and grokking (grokking_phases),
                           with the accuracy, loss and key-frequency curves
    Progress measures      per checkpoint: accuracies, restricted and excluded loss, the key
                           frequencies' share of the embedding (progress_measures)
    Features and frequencies
                           how many features of each basis follow each frequency
                           (feature_frequencies)
    Answer features and the key frequencies
                           whether the features that look the answer up lie on the key
                           frequencies' circles (answer_feature_frequencies)
    Births against the jump
                           when the features following key frequencies (and those looking up
                           the answer) were born, against the jump (frequency_births), with
                           births per checkpoint window
    The features over training
                           the trajectories of those that follow a frequency or look the
                           answer up, the phases marked
    Causal checks          patch effects and the heads and neurons that write them

Plots are saved like every other plot (queries/plots.save_plot): JSON, PNG, SVG and HTML.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import altair as alt

from featurestore.birth_rules import default_births_rule
from featurestore.errors import NotFoundError
from featurestore.queries.exports import json_records, write_atomic
from featurestore.queries.plots import HEIGHT, WIDTH, inline_data, save_plot
from featurestore.queries.report import (
    Section,
    html_document,
    markdown_document,
    run_section,
)
from featurestore.results import Result
from featurestore.schema import load_query
from featurestore.warehouse import Warehouse

TOP_FEATURES = 12
# frequency_births.follows, and their colours in the births plot.
FOLLOWS = ["key frequency", "another frequency", "answer", "other", "not at ="]
FOLLOWS_COLOURS = ["#d62728", "#ff7f0e", "#1f77b4", "#7f7f7f", "#cccccc"]
RERUN = "featurestore experiment grokking --run {run}"


SECTIONS = (
    Section(
        "Phases", "When does the model memorise, when does test accuracy jump, and when "
        "has it grokked?", "grokking_report/phases", RERUN, plots=("phases",),
        note="memorised: train accuracy >= 0.99; jump: test accuracy >= 0.5; grokked: test "
             "accuracy >= 0.99. Circuit formation lies between memorisation and the jump."),
    Section(
        "Progress measures", "How do the paper's progress measures move at each checkpoint?",
        "grokking_report/progress_measures", RERUN, row_limit=80),
    Section(
        "Features and frequencies", "Which frequencies do the features of each basis follow "
        "at the last checkpoint (at least half of their answer profile's energy)?",
        "grokking_report/features_and_frequencies", RERUN, row_limit=30),
    Section(
        "Answer features and the key frequencies", "Do the features that look the answer "
        "up sit on the key frequencies' circles?", "grokking_report/answer_features", RERUN,
        note="Their unit decoder directions averaged per answer, split by frequency over "
             "the answer: the share in the key frequencies, beside the share the key "
             "frequencies would hold if every frequency held the same."),
    Section(
        "Births against the jump", "Were the features that follow the key frequencies, and "
        "those that look the answer up, born before test accuracy jumped?",
        "grokking_report/births_against_jump", RERUN, plots=("births_against_jump",),
        note="Births under the default rule (feature-birth-analyze's defaults); a feature "
             "present at initialisation has no birth step. follows: a key frequency, another "
             "frequency, the answer (the answer alone explains >= 90% of the feature's "
             "variance at '=') or other (see the frequency_births view)."),
    Section(
        "The features over training", "How did the most energetic features that follow a "
        "frequency or look the answer up form?", "grokking_report/features_over_training",
        RERUN, plots=("feature_trajectories",)),
    Section(
        "Causal checks", "Do the features that changed most matter to the answer, and what "
        "writes them?", "grokking_report/causal_checks", RERUN),
)


@dataclass
class GrokkingReportResult(Result):
    run: str
    html: str
    markdown: str
    plots: list[str]
    seconds: float


def write_grokking_report(run: str, out: str | os.PathLike | None = None,
                          warehouse: str | None = None) -> GrokkingReportResult:
    """Write report.md, report.html and the plots for the grokking run `run` (default folder
    <warehouse>/exports/<run>/report)."""
    started = time.perf_counter()
    wh = Warehouse(warehouse)
    directory = Path(out) if out else wh.root / "exports" / run / "report"
    with wh.connect() as con:
        if not con.execute("SELECT count(*) FROM progress_measures WHERE run = ?",
                           [run]).fetchone()[0]:
            runs = [r for (r,) in con.execute(
                "SELECT DISTINCT run FROM progress_measures ORDER BY run").fetchall()]
            raise NotFoundError(f"--run {run!r}: no progress measures; grokking runs: "
                                f"{', '.join(runs) or 'none (featurestore experiment grokking)'}")
        # The births sections and plots count births under the default rule.
        params = {"run": run, **default_births_rule()}
        answers = [(section, *run_section(con, section, params)) for section in SECTIONS]
        charts = {"phases": phases_chart(con, run),
                  "births_against_jump": births_chart(con, run),
                  "feature_trajectories": feature_trajectories(con, run)}
    plots = {name: save_plot(chart, directory / "plots", name) for name, chart in charts.items()}
    title = f"The phases of grokking in run {run}"
    paths = {name: write_atomic(directory / name, lambda path, text=text: path.write_text(text))
             for name, text in (("report.md", markdown_document(title, params, answers, plots)),
                                ("report.html", html_document(title, params, answers, plots)))}
    return GrokkingReportResult(run, str(paths["report.html"]), str(paths["report.md"]),
                                sorted(plots), time.perf_counter() - started)


# -- plots --------------------------------------------------------------------------------------


def _phase_rules(con, run: str) -> alt.Chart:
    """Vertical rules at the run's memorisation, jump and grokking steps."""
    rows = json_records(con, load_query("grokking_report/plot_phase_steps"), {"run": run})
    return alt.Chart(inline_data(rows)).mark_rule(strokeDash=[4, 3], color="#555").encode(
        x="step_plus_1:Q", tooltip=["phase:N", "step_plus_1:Q"])


def _step_axis() -> alt.X:
    return alt.X("step_plus_1:Q", title="step + 1", scale=alt.Scale(type="log"))


def phases_chart(con, run: str) -> alt.HConcatChart:
    """Accuracy, loss (train, test, restricted, excluded) and the key frequencies' share of the
    embedding over training, with the phase boundaries."""
    rows = json_records(con, load_query("grokking_report/plot_progress_measures"), {"run": run})
    data = alt.Chart(inline_data(rows))
    rules = _phase_rules(con, run)
    size = {"width": WIDTH * 2 // 3, "height": HEIGHT * 2 // 3}

    def panel(measures: list[str], title: str, y: alt.Y) -> alt.LayerChart:
        line = data.transform_filter(alt.FieldOneOfPredicate("measure", measures)).mark_line(
            point=alt.OverlayMarkDef(size=12)).encode(x=_step_axis(), y=y,
                                                      color=alt.Color("measure:N", title=None))
        return alt.layer(line, rules).properties(title=title, **size)

    return alt.hconcat(
        panel(["train_accuracy", "test_accuracy"], "accuracy",
              alt.Y("value:Q", title="accuracy")),
        panel(["train_loss", "test_loss", "restricted_loss", "excluded_loss"], "loss",
              alt.Y("value:Q", title="cross-entropy (nats)", scale=alt.Scale(type="log"))),
        panel(["key_frequency_share"], "key frequencies' share of the embedding",
              alt.Y("value:Q", title="share", scale=alt.Scale(domain=[0, 1]))),
    ).resolve_scale(color="independent").properties(title=f"{run}: the phases of grokking")


def births_chart(con, run: str) -> alt.HConcatChart:
    """Features born per checkpoint window, per basis, coloured by what they follow."""
    rows = json_records(con, load_query("grokking_report/plot_births"),
                        {"run": run, **default_births_rule()})
    colour = alt.Color("follows:N", title="feature follows",
                       scale=alt.Scale(domain=FOLLOWS, range=FOLLOWS_COLOURS))
    rules = _phase_rules(con, run)
    panels = []
    for basis in sorted({r["basis"] for r in rows}):
        points = alt.Chart(inline_data([r for r in rows if r["basis"] == basis])).mark_circle(
            opacity=0.8).encode(x=_step_axis(), y=alt.Y("features:Q", title="features born"),
                                size=alt.Size("features:Q", legend=None), color=colour,
                                tooltip=["step_plus_1:Q", "follows:N", "features:Q"])
        panels.append(alt.layer(points, rules).properties(title=basis, width=WIDTH * 2 // 3,
                                                          height=HEIGHT * 2 // 3))
    return alt.hconcat(*panels).properties(
        title=f"{run}: births per checkpoint against the phases")


def feature_trajectories(con, run: str) -> alt.LayerChart:
    """Energy over training of the most energetic features that follow a frequency or look the
    answer up, the phases marked."""
    rows = json_records(con, load_query("grokking_report/plot_feature_trajectories"),
                        {"run": run, "top_features": TOP_FEATURES, **default_births_rule()})
    lines = alt.Chart(inline_data(rows)).mark_line().encode(
        x=_step_axis(), y=alt.Y("energy:Q", title="energy (share of reconstructed variance)"),
        color=alt.Color("feature:N", scale=alt.Scale(scheme="tableau20")))
    return alt.layer(lines, _phase_rules(con, run)).properties(
        title=f"{run}: its most energetic features over training", width=WIDTH, height=HEIGHT)
