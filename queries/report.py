"""`featurestore report`: the feature-dynamics questions for one basis, in one document.

Each section is a question, the SQL that answers it (a file of sql/report/), the answer as a
table, and a plot where one helps:

    Fit quality           how well the basis explains each checkpoint (checkpoint_summary)
    Births                which features are born when, against the shuffled-order null;
                          censored births (in the last K-1 windows) counted apart
    Births across seeds   whether fits with other seeds find the same births (birth_summary)
    Stability             how many features a fit with another seed finds again (bases)
    Causal importance     which features matter at which checkpoints, with the reconstruction
                          error each effect must be judged against (patches)
    Lineage               which heads, neurons and upstream features build them (lineage_edges)
    Top examples          the top contexts of the highlighted features (those whose own patch
                          moved the loss most, then the most energetic) at the last checkpoint,
                          the activating token marked ⟦token⟧ (feature_examples)

A two-source train-crosscoder basis (a model diff, e.g. base vs fine-tuned) gets the model-diff
report instead:

    Latent classes        latents exclusive to either source or shared (model_diff_summary),
                          with the relative decoder norm histogram
    Most exclusive latents in each source
                          per-source statistics of the live latents leaning furthest toward
                          each source, exclusive or not (crosscoder_latent_stats)
    Contexts of the most exclusive latents
                          their top contexts with what they write into each source
                          (crosscoder_examples)
    Training              the last logged training metrics (training_metrics), with the curves

The report is written as Markdown (plots linked as PNG files next to it) and as one HTML file
with the plots inline, so it opens anywhere with no network. A section whose data is missing
says which command produces it.
"""

from __future__ import annotations

import base64
import html
import os
import time
from dataclasses import dataclass, field
from itertools import dropwhile
from pathlib import Path

from featurestore.errors import FeaturestoreError
from featurestore.queries.exports import write_atomic
from featurestore.registry import get_basis
from featurestore.results import Result
from featurestore.schema import load_query
from featurestore.warehouse import Warehouse

ROW_LIMIT = 15  # rows shown per table; the SQL above it gives them all
HIGHLIGHTED = 8  # features whose top contexts the report shows
CONTEXTS = 3  # contexts shown per highlighted feature


@dataclass(frozen=True)
class Section:
    title: str
    question: str
    query: str  # the query file answering it: sql/<query>.sql
    missing: str  # what to run when the query returns nothing
    plots: tuple[str, ...] = ()
    note: str = ""  # how to read the answer, shown under the question
    row_limit: int = ROW_LIMIT

    @property
    def sql(self) -> str:
        """The query the report runs and shows: its file without the leading comment, which
        says what the question above it already says."""
        lines = load_query(self.query).splitlines()
        return "\n".join(dropwhile(lambda line: line.startswith("--"), lines)).strip()


SECTIONS = (
    Section(
        "Fit quality", "How well does the basis explain each checkpoint?", "report/fit_quality",
        "featurestore feature-trajectory-sweep --basis {basis}",
        ("checkpoint_summary",)),
    Section(
        "Births", "Which features are born when, and how many would a shuffled order give?",
        "report/births",
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
        "report/births_across_seeds",
        "featurestore shared-feature-fit ... --seeds 3, then featurestore "
        "feature-birth-analyze --basis {basis} (births are compared across seeds only for a "
        "basis fitted with several)",
        note="seed_births_agreement: of the features matched across seeds, the share whose "
             "birth agrees within one checkpoint under the same rule; seed_matched_features: "
             "the matched pairs it is a share of, summed over the other seeds."),
    Section(
        "Stability", "How stable is the basis across seeds?", "report/stability",
        "featurestore shared-feature-fit ... --seeds 3 (stability is measured by refitting "
        "with other seeds)"),
    Section(
        "Causal importance",
        "Which features matter at which checkpoints, beyond the reconstruction error?",
        "report/causal_importance",
        "featurestore feature-patch --basis {basis} --source STEP --target STEP",
        ("patch_effects",)),
    Section(
        "Lineage", "Which components build the causally important features?", "report/lineage",
        "featurestore feature-lineage --basis {basis}"),
    Section(
        "Top examples", "On which tokens do the highlighted features fire at the last checkpoint?",
        "report/top_examples",
        "featurestore feature-trajectory-sweep --basis {basis}",
        note=f"The {HIGHLIGHTED} highlighted features: those whose own patch moved the loss "
             "most, then those with the largest energy at the last checkpoint. The activating "
             "token is marked ⟦token⟧; contexts are decoded text when the run has token "
             "strings, token ids otherwise. `featurestore feature ID --basis {basis}` shows one "
             "feature in full.",
        row_limit=HIGHLIGHTED * CONTEXTS),
)


# The model-diff report of a two-source train-crosscoder basis (base vs fine-tuned): which latents
# each model has alone, what they do in each model, and on which tokens they fire.
MOST_EXCLUSIVE = 5  # latents leaning furthest toward each source, shown with stats and contexts
MODEL_DIFF_SECTIONS = (
    Section(
        "Latent classes", "Which latents does each model have alone, and which do they share?",
        "report/latent_classes",
        "featurestore train-crosscoder --name {basis} ... (the basis has no features rows)",
        ("relative_norm_histogram",),
        note="Classes by relative decoder norm ||d_B|| / (||d_A|| + ||d_B||): exclusive to the "
             "first source below 0.3, to the second above 0.7, shared between; dead latents "
             "never fired on the evaluation tokens (the model_diff view)."),
    Section(
        "Most exclusive latents in each source",
        "What do the latents that lean furthest toward one model do in each model?",
        "report/most_exclusive_latents",
        "featurestore crosscoder-sweep --basis {basis}",
        note=f"The {MOST_EXCLUSIVE} live latents whose relative decoder norm lies furthest from "
             "0.5 on each side, exclusive or not (class says which). The code "
             "is joint, so a latent fires on the same tokens for every source; what differs is "
             "what it writes into each (mean_active_activation, energy: its share of that "
             "source's reconstruction) and how much each source's activations drive it "
             "(encoder_input: that source's term of the pre-activation where it fires).",
        row_limit=4 * MOST_EXCLUSIVE),
    Section(
        "Contexts of the most exclusive latents",
        "On which tokens do the latents that lean furthest toward one model fire?",
        "report/most_exclusive_contexts",
        "featurestore crosscoder-sweep --basis {basis}",
        note="source_values: what the latent writes into each source at that token (value x "
             "decoder norm); source_inputs: each source's term of its pre-activation. The "
             "activating token is marked ⟦token⟧; contexts are decoded text when the run has "
             "token strings, token ids otherwise.",
        row_limit=2 * MOST_EXCLUSIVE * CONTEXTS),
    Section(
        "Training", "How well does the crosscoder reconstruct each source?",
        "report/crosscoder_training",
        "featurestore train-crosscoder --name {basis} ...",
        ("training_curves",)),
)
# What the report's queries take besides $basis.
QUERY_PARAMETERS = {"highlighted": HIGHLIGHTED, "contexts": CONTEXTS,
                    "most_exclusive": MOST_EXCLUSIVE}


@dataclass
class ReportResult(Result):
    basis: str
    html: str
    markdown: str
    sections: dict[str, int]  # section title -> rows found (0: data missing)
    seconds: float
    skipped_plots: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"report of {self.basis!r}: {self.html} and {self.markdown} ({self.seconds:.1f}s)"]
        lines += [f"  {title}: {rows} rows" if rows else f"  {title}: no data yet"
                  for title, rows in self.sections.items()]
        return "\n".join(lines)


def write_report(basis: str, out: str | os.PathLike | None = None,
                 warehouse: str | None = None) -> ReportResult:
    """Write report.md and report.html for `basis` (default: <warehouse>/exports/<basis>/report)."""
    from featurestore.queries.plots import export_plots

    started = time.perf_counter()
    wh = Warehouse(warehouse)
    with wh.connect() as con:
        row = get_basis(con, basis)
        run, stage, n_sources, sources = (row[c] for c in ("run", "stage", "n_sources",
                                                           "sources"))
        if run is not None:  # a shared basis: the feature-dynamics questions of its stage
            sections = SECTIONS
            title = f"Feature dynamics of {run} at {stage} (basis {basis})"
        elif n_sources == 2:  # a train-crosscoder model diff
            sections = MODEL_DIFF_SECTIONS
            first, second = (s["label"] for s in sources)
            title = f"Model diff {first} vs {second} (crosscoder {basis})"
        else:
            raise FeaturestoreError(
                f"--basis {basis} is a train-crosscoder basis with {n_sources} source(s): the "
                "report covers shared bases (shared-feature-fit) and two-source crosscoders "
                "(model diffs)")
        params = {"basis": basis, **QUERY_PARAMETERS}
        answers = [(section, *run_section(con, section, params)) for section in sections]

    directory = Path(out) if out else wh.root / "exports" / basis / "report"
    wanted = [name for section in sections for name in section.plots]
    plots = export_plots(basis, out=directory / "plots", warehouse=warehouse, plots=wanted)
    markdown = markdown_document(title, params, answers, plots.written)
    page = html_document(title, params, answers, plots.written)
    paths = {name: write_atomic(directory / name, _text_writer(text))
             for name, text in (("report.md", markdown), ("report.html", page))}
    return ReportResult(basis, str(paths["report.html"]), str(paths["report.md"]),
                        {s.title: len(rows) for s, _, rows in answers},
                        time.perf_counter() - started, dict(plots.skipped))


def _text_writer(text: str):
    return lambda path: path.write_text(text)


def run_section(con, section: Section, params: dict) -> tuple[list[str], list[tuple]]:
    """A section's (header, rows), its $name parameters bound from `params`."""
    sql = section.sql
    cursor = con.execute(sql, used_parameters(sql, params))
    return [d[0] for d in cursor.description], cursor.fetchall()


def used_parameters(sql: str, params: dict) -> dict:
    """The entries of `params` that `sql` names as $name: DuckDB refuses a parameter the query
    does not use, and one dict serves several queries."""
    return {k: v for k, v in params.items() if f"${k}" in sql}


def _filled(text: str, params: dict, quoted: bool) -> str:
    """`text` with each $name (SQL, `quoted`) or {name} (prose) of `params` written out."""
    for name, value in params.items():
        text = (text.replace(f"${name}", repr(value)) if quoted
                else text.replace(f"{{{name}}}", str(value)))
    return text


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):  # a MAP column, e.g. crosscoder_examples.source_values
        return "{" + ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) + "}"
    return "" if value is None else str(value)


def markdown_document(title: str, params: dict, answers, plots: dict) -> str:
    """The report as Markdown: per section its question, SQL, answer table and plots (linked
    as plots/<name>.png)."""
    lines = [f"# {title}", ""]
    for section, header, rows in answers:
        lines += [f"## {section.title}", "", f"*{section.question}*", "", "```sql",
                  _filled(section.sql, params, quoted=True), "```", ""]
        if section.note:
            lines += [_filled(section.note, params, quoted=False), ""]
        if not rows:
            lines += [f"No data yet: run `{_filled(section.missing, params, quoted=False)}`.", ""]
        else:
            limit = section.row_limit
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            # A bare | or a newline (token strings hold them) would break the table row.
            lines += ["| " + " | ".join(_cell(v).replace("|", "\\|").replace("\n", "\\n")
                                         for v in row) + " |"
                      for row in rows[:limit]]
            if len(rows) > limit:
                lines.append(f"\n({len(rows) - limit} more rows: run the query above)")
            lines.append("")
        for name in section.plots:
            if name in plots:
                lines += [f"![{name}](plots/{name}.png)", ""]
    return "\n".join(lines)


def html_document(title: str, params: dict, answers, plots: dict) -> str:
    """The report as one HTML file, plots inline, so it opens anywhere with no network."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section, header, rows in answers:
        body += [f"<h2>{html.escape(section.title)}</h2>",
                 f"<p><em>{html.escape(section.question)}</em></p>",
                 f"<pre><code>{html.escape(_filled(section.sql, params, quoted=True))}"
                 "</code></pre>"]
        if section.note:
            body.append(f"<p>{html.escape(_filled(section.note, params, quoted=False))}</p>")
        if not rows:
            body.append(f"<p>No data yet: run <code>"
                        f"{html.escape(_filled(section.missing, params, quoted=False))}"
                        "</code>.</p>")
        else:
            limit = section.row_limit
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                        + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row)
                     + "</tr>" for row in rows[:limit]]
            body.append("</table>")
            if len(rows) > limit:
                body.append(f"<p>({len(rows) - limit} more rows: run the query above)</p>")
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
