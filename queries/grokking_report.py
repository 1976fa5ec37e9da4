"""The grokking experiment's report: the paper's phases beside the store's births.

    from featurestore.queries.grokking_report import write_grokking_report
    write_grokking_report("grok")   # -> <warehouse>/exports/grok/report/report.{md,html}

Sections, each a question, its SQL and the answer (queries/report.py renders them):

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

from featurestore.birth_rules import births_rule_where
from featurestore.errors import NotFoundError
from featurestore.queries.exports import json_records, write_atomic
from featurestore.queries.plots import HEIGHT, WIDTH, _inline, save_plot
from featurestore.queries.report import (
    Section,
    html_document,
    markdown_document,
    run_section,
)
from featurestore.results import Result
from featurestore.warehouse import Warehouse

TOP_FEATURES = 12
# frequency_births.follows, and their colours in the births plot.
FOLLOWS = ["key frequency", "another frequency", "answer", "other", "not at ="]
FOLLOWS_COLOURS = ["#d62728", "#ff7f0e", "#1f77b4", "#7f7f7f", "#cccccc"]
RERUN = "featurestore experiment grokking --run {run}"


def _sections() -> tuple[Section, ...]:
    rule = births_rule_where()
    return (
        Section(
            "Phases", "When does the model memorise, when does test accuracy jump, and when "
            "has it grokked?",
            "SELECT p, key_frequencies, memorised_step, jump_step, grokked_step, last_step,\n"
            "       round(final_test_accuracy, 4) AS final_test_accuracy,\n"
            "       round(final_key_frequency_share, 3) AS final_key_frequency_share\n"
            "FROM grokking_phases WHERE run = $run", RERUN, plots=("phases",),
            note="memorised: train accuracy >= 0.99; jump: test accuracy >= 0.5; grokked: test "
                 "accuracy >= 0.99. Circuit formation lies between memorisation and the jump."),
        Section(
            "Progress measures", "How do the paper's progress measures move at each checkpoint?",
            "SELECT step, round(train_accuracy, 3) AS train_acc,\n"
            "       round(test_accuracy, 3) AS test_acc, round(train_loss, 4) AS train_loss,\n"
            "       round(test_loss, 3) AS test_loss,\n"
            "       round(restricted_loss, 3) AS restricted_loss,\n"
            "       round(excluded_loss, 3) AS excluded_loss,\n"
            "       round(key_frequency_share, 3) AS key_frequency_share\n"
            "FROM progress_measures WHERE run = $run ORDER BY step", RERUN, row_limit=80),
        Section(
            "Features and frequencies", "Which frequencies do the features of each basis follow "
            "at the last checkpoint (at least half of their answer profile's energy)?",
            "SELECT f.basis, f.dominant_frequency, f.key_frequency, count(*) AS features,\n"
            "       round(avg(f.dominant_share), 3) AS mean_dominant_share,\n"
            "       round(avg(f.answer_variance_share), 3) AS mean_answer_variance_share\n"
            "FROM feature_frequencies f JOIN bases b ON b.name = f.basis\n"
            "WHERE b.run = $run AND f.follows_frequency\n"
            "GROUP BY ALL ORDER BY f.basis, features DESC", RERUN, row_limit=30),
        Section(
            "Answer features and the key frequencies", "Do the features that look the answer "
            "up sit on the key frequencies' circles?",
            "SELECT a.basis, a.n_answer_features, a.answers_covered, a.key_frequencies,\n"
            "       round(a.key_frequency_share, 3) AS key_frequency_share,\n"
            "       round(len(a.key_frequencies) / ((g.p - 1) / 2), 3) AS uniform_share\n"
            "FROM answer_feature_frequencies a JOIN bases b ON b.name = a.basis\n"
            "JOIN grokking_phases g ON g.run = b.run\n"
            "WHERE b.run = $run ORDER BY a.basis", RERUN,
            note="Their unit decoder directions averaged per answer, split by frequency over "
                 "the answer: the share in the key frequencies, beside the share the key "
                 "frequencies would hold if every frequency held the same."),
        Section(
            "Births against the jump", "Were the features that follow the key frequencies, and "
            "those that look the answer up, born before test accuracy jumped?",
            "SELECT basis, follows, count(*) AS features, count(birth_step) AS born,\n"
            "       count(*) FILTER (WHERE born_before_jump) AS born_before_jump,\n"
            "       round(count(*) FILTER (WHERE born_before_jump) / count(birth_step), 3)\n"
            "           AS share_before_jump,\n"
            "       count(*) FILTER (WHERE present_at_init) AS present_at_init,\n"
            "       median(birth_step) AS median_birth_step, any_value(jump_step) AS jump_step\n"
            f"FROM frequency_births WHERE run = $run AND {rule}\n"
            "GROUP BY basis, follows ORDER BY basis, follows", RERUN,
            plots=("births_against_jump",),
            note="Births under the default rule (feature-birth-analyze's defaults); a feature "
                 "present at initialisation has no birth step. follows: a key frequency, another "
                 "frequency, the answer (the answer alone explains >= 90% of the feature's "
                 "variance at '=') or other (see the frequency_births view)."),
        Section(
            "The features over training", "How did the most energetic features that follow a "
            "frequency or look the answer up form?",
            "SELECT f.basis, f.feature_id, f.follows, f.dominant_frequency,\n"
            "       round(f.dominant_share, 3) AS dominant_share, f.birth_step,\n"
            "       round(max(t.energy), 4) AS peak_energy\n"
            "FROM frequency_births f JOIN trajectories t USING (basis, feature_id)\n"
            f"WHERE f.run = $run AND f.follows NOT IN ('other', 'not at =') AND {rule}\n"
            "GROUP BY ALL ORDER BY peak_energy DESC", RERUN, plots=("feature_trajectories",)),
        Section(
            "Causal checks", "Do the features that changed most matter to the answer, and what "
            "writes them?",
            "SELECT p.basis, p.feature_set, p.split, p.metric, round(p.clean, 4) AS clean,\n"
            "       round(p.delta, 4) AS delta\n"
            "FROM patches p JOIN bases s ON s.name = p.basis\n"
            "WHERE s.run = $run AND p.metric IN ('loss', 'accuracy')\n"
            "ORDER BY abs(p.delta) DESC", RERUN),
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
        params = {"run": run}
        answers = [(section, *run_section(con, section, params)) for section in _sections()]
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
    rows = json_records(con, """
        SELECT step + 1 AS step_plus_1, phase FROM (
            UNPIVOT (SELECT memorised_step, jump_step, grokked_step FROM grokking_phases
                     WHERE run = ?)
            ON memorised_step AS 'memorised', jump_step AS 'test-accuracy jump',
               grokked_step AS 'grokked'
            INTO NAME phase VALUE step)""", [run])
    return alt.Chart(_inline(rows)).mark_rule(strokeDash=[4, 3], color="#555").encode(
        x="step_plus_1:Q", tooltip=["phase:N", "step_plus_1:Q"])


def _step_axis() -> alt.X:
    return alt.X("step_plus_1:Q", title="step + 1", scale=alt.Scale(type="log"))


def phases_chart(con, run: str) -> alt.HConcatChart:
    """Accuracy, loss (train, test, restricted, excluded) and the key frequencies' share of the
    embedding over training, with the phase boundaries."""
    rows = json_records(con, """
        SELECT step + 1 AS step_plus_1, measure, value FROM (
            UNPIVOT (SELECT step, train_accuracy, test_accuracy, train_loss, test_loss,
                            restricted_loss, excluded_loss, key_frequency_share
                     FROM progress_measures WHERE run = ?)
            ON COLUMNS(* EXCLUDE step) INTO NAME measure VALUE value)
        ORDER BY measure, step""", [run])
    data = alt.Chart(_inline(rows))
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
    rows = json_records(con, f"""
        SELECT basis, birth_step + 1 AS step_plus_1, follows, count(*) AS features
        FROM frequency_births
        WHERE run = ? AND birth_step IS NOT NULL AND {births_rule_where()}
        GROUP BY ALL ORDER BY ALL""", [run])
    colour = alt.Color("follows:N", title="feature follows",
                       scale=alt.Scale(domain=FOLLOWS, range=FOLLOWS_COLOURS))
    rules = _phase_rules(con, run)
    panels = []
    for basis in sorted({r["basis"] for r in rows}):
        points = alt.Chart(_inline([r for r in rows if r["basis"] == basis])).mark_circle(
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
    rows = json_records(con, f"""
        WITH chosen AS (
            SELECT f.basis, f.feature_id, any_value(f.follows) AS follows
            FROM frequency_births f JOIN trajectories t USING (basis, feature_id)
            WHERE f.run = ? AND f.follows NOT IN ('other', 'not at =') AND {births_rule_where()}
            GROUP BY ALL ORDER BY max(t.energy) DESC LIMIT ?)
        SELECT c.basis || ' #' || c.feature_id || ' (' || c.follows || ')' AS feature,
               t.step + 1 AS step_plus_1, t.energy
        FROM chosen c JOIN trajectories t USING (basis, feature_id)
        ORDER BY feature, t.step""", [run, TOP_FEATURES])
    lines = alt.Chart(_inline(rows)).mark_line().encode(
        x=_step_axis(), y=alt.Y("energy:Q", title="energy (share of reconstructed variance)"),
        color=alt.Color("feature:N", scale=alt.Scale(scheme="tableau20")))
    return alt.layer(lines, _phase_rules(con, run)).properties(
        title=f"{run}: its most energetic features over training", width=WIDTH, height=HEIGHT)
