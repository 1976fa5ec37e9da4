"""`featurestore report`: the milestone questions for one shared basis, in one document.

Each section is a question, the SQL that answers it, the answer as a table, and a plot where one
helps:

    Fit quality           how well the basis explains each checkpoint (checkpoint_summary)
    Births                which features are born when, against the shuffled-order null;
                          censored births (in the last K-1 windows) counted apart
    Births across seeds   whether fits with other seeds find the same births (birth_summary)
    Stability             how many features a fit with another seed finds again (bases)
    Causal importance     which features matter at which checkpoints, with the reconstruction
                          error each effect must be judged against (patches)
    Lineage               which heads, neurons and upstream features build them (lineage_edges)

The report is written as Markdown (plots linked as PNG files next to it) and as one HTML file
with the plots inline, so it opens anywhere with no network. A section whose data is missing
says which command produces it.
"""

from __future__ import annotations

import base64
import html
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from featurestore.errors import NotFoundError
from featurestore.queries.exports import write_atomic
from featurestore.warehouse import Warehouse

ROW_LIMIT = 15  # rows shown per table; the SQL above it gives them all


@dataclass(frozen=True)
class Section:
    title: str
    question: str
    sql: str
    missing: str  # what to run when the query returns nothing
    plots: tuple[str, ...] = ()
    note: str = ""  # how to read the answer, shown under the question


SECTIONS = (
    Section(
        "Fit quality", "How well does the basis explain each checkpoint?",
        "SELECT step, round(explained_variance, 4) AS explained_variance,\n"
        "       round(relative_reconstruction_error, 4) AS relative_error,\n"
        "       round(l0, 1) AS l0, round(dead_fraction, 3) AS dead_fraction\n"
        "FROM checkpoint_summary WHERE basis = $basis ORDER BY step",
        "featurestore feature-trajectory-sweep --basis {basis}",
        ("checkpoint_summary",)),
    Section(
        "Births", "Which features are born when, and how many would a shuffled order give?",
        "SELECT s.window_start, s.window_end, s.births, s.censored_births,\n"
        "       round(s.null_births_mean, 2) AS null_births_mean,\n"
        "       round(s.null_births_sd, 2) AS null_births_sd,\n"
        "       round(s.null_censored_births_mean, 2) AS null_censored_births_mean,\n"
        "       list(b.feature_id ORDER BY b.feature_id)\n"
        "           FILTER (WHERE b.feature_id IS NOT NULL)[1:8] AS first_born_features,\n"
        "       s.metric, s.presence, s.threshold, s.persistence\n"
        "FROM birth_summary s LEFT JOIN births b\n"
        "  ON b.basis = s.basis AND b.metric = s.metric AND b.presence = s.presence\n"
        " AND b.threshold = s.threshold AND b.persistence = s.persistence\n"
        " AND b.stable_eps = s.stable_eps AND b.stable_cos = s.stable_cos\n"
        " AND b.birth_step = s.window_end\n"
        "WHERE s.basis = $basis GROUP BY ALL\n"
        "ORDER BY s.metric, s.presence, s.threshold, s.persistence, s.window_end",
        "featurestore feature-birth-analyze --basis {basis}",
        ("birth_timeline", "activation_heatmap", "feature_trajectories"),
        note="A birth needs the feature present at K = persistence checkpoints in a row. Births "
             "in the last K-1 windows are kept and flagged as censored (censored_births, "
             "births.birth_censored): the feature is present at every checkpoint from its birth "
             "to the last, but fewer than K were left, so its persistence could not be observed "
             "in full. births counts them; the shuffled-order null applies the same rule "
             "(null_censored_births_mean)."),
    Section(
        "Births across seeds",
        "Do fits of the basis with other seeds find the same births?",
        "SELECT metric, presence, threshold, persistence,\n"
        "       round(any_value(seed_births_agreement), 3) AS seed_births_agreement,\n"
        "       any_value(seed_matched_features) AS seed_matched_features\n"
        "FROM birth_summary\n"
        "WHERE basis = $basis AND seed_births_agreement IS NOT NULL\n"
        "GROUP BY ALL ORDER BY metric, presence, threshold, persistence",
        "featurestore shared-feature-fit ... --seeds 3, then featurestore "
        "feature-birth-analyze --basis {basis} (births are compared across seeds only for a "
        "basis fitted with several)",
        note="seed_births_agreement: of the features matched across seeds, the share whose "
             "birth agrees within one checkpoint under the same rule; seed_matched_features: "
             "the matched pairs it is a share of, summed over the other seeds."),
    Section(
        "Stability", "How stable is the basis across seeds?",
        "SELECT name, kind, arch, d_hidden, k,\n"
        "       stability AS share_matched_at_cosine_0_9\n"
        "FROM bases WHERE name = $basis AND stability IS NOT NULL",
        "featurestore shared-feature-fit ... --seeds 3 (stability is measured by refitting "
        "with other seeds)"),
    Section(
        "Causal importance",
        "Which features matter at which checkpoints, beyond the reconstruction error?",
        "SELECT target_step, source_step, mode, feature_set, split,\n"
        "       round(clean, 4) AS clean_loss, round(delta, 4) AS loss_delta,\n"
        "       round(spliced_loss_delta, 4) AS spliced_loss_delta,\n"
        "       round(recon_rel_error, 3) AS recon_rel_error,\n"
        "       abs(delta) > abs(spliced_loss_delta) AS beyond_reconstruction\n"
        "FROM patches WHERE basis = $basis AND metric = 'loss'\n"
        "ORDER BY abs(delta) DESC",
        "featurestore feature-patch --basis {basis} --source STEP --target STEP",
        ("patch_effects",)),
    Section(
        "Lineage", "Which components build the causally important features?",
        "SELECT step, dst_id AS feature, method, src_type, src_id, round(weight, 4) AS weight\n"
        "FROM lineage_edges\n"
        "WHERE basis = $basis AND rank = 1 AND dst_type = 'feature'\n"
        "ORDER BY step, feature, method, src_type",
        "featurestore feature-lineage --basis {basis}"),
)


@dataclass
class ReportResult:
    basis: str
    html: str
    markdown: str
    sections: dict[str, int]  # section title -> rows found (0: data missing)
    seconds: float
    skipped_plots: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def write_report(basis: str, out: str | os.PathLike | None = None,
                 warehouse: str | None = None) -> ReportResult:
    """Write report.md and report.html for `basis` (default: <warehouse>/exports/<basis>/report)."""
    from featurestore.queries.plots import export_plots

    started = time.perf_counter()
    wh = Warehouse(warehouse)
    con = wh.connect()
    try:
        (found,), = con.execute("SELECT count(*) FROM bases WHERE name = ? AND run IS NOT NULL",
                                [basis]).fetchall()
        if not found:
            shared = [n for (n,) in con.execute(
                "SELECT name FROM bases WHERE run IS NOT NULL ORDER BY name").fetchall()]
            raise NotFoundError(f"--basis {basis!r}: no shared basis of that name; shared "
                                f"bases: {', '.join(shared) or 'none'}")
        (run, stage), = con.execute("SELECT run, stage FROM bases WHERE name = ?",
                                    [basis]).fetchall()
        answers = [(section, *_query(con, section.sql, basis)) for section in SECTIONS]
    finally:
        con.close()

    directory = Path(out) if out else wh.root / "exports" / basis / "report"
    wanted = [name for section in SECTIONS for name in section.plots]
    plots = export_plots(basis, out=directory / "plots", warehouse=warehouse, plots=wanted)
    title = f"Feature dynamics of {run} at {stage} (basis {basis})"
    markdown = _markdown(title, basis, answers, plots.written)
    page = _html(title, basis, answers, plots.written)
    paths = {name: write_atomic(directory / name, _text_writer(text))
             for name, text in (("report.md", markdown), ("report.html", page))}
    return ReportResult(basis, str(paths["report.html"]), str(paths["report.md"]),
                        {s.title: len(rows) for s, _, rows in answers},
                        time.perf_counter() - started, dict(plots.skipped))


def _text_writer(text: str):
    return lambda path: path.write_text(text)


def _query(con, sql: str, basis: str) -> tuple[list[str], list[tuple]]:
    cursor = con.execute(sql, {"basis": basis})
    return [d[0] for d in cursor.description], cursor.fetchall()


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown(title: str, basis: str, answers, plots: dict) -> str:
    lines = [f"# {title}", ""]
    for section, header, rows in answers:
        lines += [f"## {section.title}", "", f"*{section.question}*", "", "```sql",
                  section.sql.replace("$basis", f"'{basis}'"), "```", ""]
        if section.note:
            lines += [section.note, ""]
        if not rows:
            lines += [f"No data yet: run `{section.missing.format(basis=basis)}`.", ""]
        else:
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |"
                      for row in rows[:ROW_LIMIT]]
            if len(rows) > ROW_LIMIT:
                lines.append(f"\n({len(rows) - ROW_LIMIT} more rows: run the query above)")
            lines.append("")
        for name in section.plots:
            if name in plots:
                lines += [f"![{name}](plots/{name}.png)", ""]
    return "\n".join(lines)


def _html(title: str, basis: str, answers, plots: dict) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section, header, rows in answers:
        body += [f"<h2>{html.escape(section.title)}</h2>",
                 f"<p><em>{html.escape(section.question)}</em></p>",
                 f"<pre><code>{html.escape(section.sql.replace('$basis', repr(basis)))}"
                 "</code></pre>"]
        if section.note:
            body.append(f"<p>{html.escape(section.note)}</p>")
        if not rows:
            body.append(f"<p>No data yet: run <code>"
                        f"{html.escape(section.missing.format(basis=basis))}</code>.</p>")
        else:
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                        + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
                     + "</tr>" for row in rows[:ROW_LIMIT]]
            body.append("</table>")
            if len(rows) > ROW_LIMIT:
                body.append(f"<p>({len(rows) - ROW_LIMIT} more rows: run the query above)</p>")
        for name in section.plots:
            if name in plots:
                # Inline, so the page is one file that needs nothing else to display.
                data = base64.b64encode(Path(plots[name]["png"]).read_bytes()).decode()
                body.append(f'<p><img alt="{name}" src="data:image/png;base64,{data}" '
                            'style="max-width:100%"></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;"
             "padding:2px 6px;text-align:right}pre{background:#f6f6f6;padding:8px}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
