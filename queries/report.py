"""`featurestore report`: the milestone questions for one basis, in one document.

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
from pathlib import Path

from featurestore.errors import FeaturestoreError
from featurestore.queries.exports import write_atomic
from featurestore.registry import get_basis
from featurestore.results import Result
from featurestore.warehouse import Warehouse

ROW_LIMIT = 15  # rows shown per table; the SQL above it gives them all
HIGHLIGHTED = 8  # features whose top contexts the report shows
CONTEXTS = 3  # contexts shown per highlighted feature


@dataclass(frozen=True)
class Section:
    title: str
    question: str
    sql: str
    missing: str  # what to run when the query returns nothing
    plots: tuple[str, ...] = ()
    note: str = ""  # how to read the answer, shown under the question
    row_limit: int = ROW_LIMIT


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
    Section(
        "Top examples", "On which tokens do the highlighted features fire at the last checkpoint?",
        "WITH last AS (\n"
        "    SELECT max(step) AS step FROM feature_examples WHERE basis = $basis),\n"
        "patched AS (\n"
        "    SELECT feature_ids[1] AS feature_id, max(abs(delta)) AS effect FROM patches\n"
        "    WHERE basis = $basis AND metric = 'loss' AND len(feature_ids) = 1 GROUP BY ALL),\n"
        "highlighted AS (\n"
        "    SELECT t.feature_id FROM trajectories t LEFT JOIN patched p USING (feature_id)\n"
        "    WHERE t.basis = $basis AND t.step = (SELECT step FROM last)\n"
        f"    ORDER BY p.effect DESC NULLS LAST, t.energy DESC, t.feature_id LIMIT {HIGHLIGHTED})\n"
        "SELECT e.feature_id, e.step, e.rank, round(e.value, 3) AS value, e.split,\n"
        "       example_context(e.context_text, e.context_token_ids, e.position,\n"
        "                       e.context_start) AS context\n"
        "FROM feature_examples e JOIN highlighted USING (feature_id)\n"
        f"WHERE e.basis = $basis AND e.step = (SELECT step FROM last) AND e.rank <= {CONTEXTS}\n"
        "ORDER BY e.feature_id, e.rank",
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
MOST_EXCLUSIVE_SQL = (
    "    SELECT d.feature_id, d.class, d.relative_decoder_norm,\n"
    "           CASE WHEN d.relative_decoder_norm < 0.5 THEN b.sources[1].label\n"
    "                ELSE b.sources[2].label END AS toward\n"
    "    FROM model_diff d JOIN bases b ON b.name = d.basis\n"
    "    WHERE d.basis = $basis AND d.class <> 'dead'\n"
    "    QUALIFY row_number() OVER (PARTITION BY toward ORDER BY\n"
    "        abs(d.relative_decoder_norm - 0.5) DESC, d.frequency DESC, d.feature_id)\n"
    f"        <= {MOST_EXCLUSIVE}")
MODEL_DIFF_SECTIONS = (
    Section(
        "Latent classes", "Which latents does each model have alone, and which do they share?",
        "SELECT class, n_features, round(mean_decoder_cosine, 3) AS mean_decoder_cosine,\n"
        "       round(mean_frequency, 4) AS mean_frequency\n"
        "FROM model_diff_summary WHERE basis = $basis ORDER BY class",
        "featurestore train-crosscoder --name {basis} ... (the basis has no features rows)",
        ("relative_norm_histogram",),
        note="Classes by relative decoder norm ||d_B|| / (||d_A|| + ||d_B||): exclusive to the "
             "first source below 0.3, to the second above 0.7, shared between; dead latents "
             "never fired on the evaluation tokens (the model_diff view)."),
    Section(
        "Most exclusive latents in each source",
        "What do the latents that lean furthest toward one model do in each model?",
        f"WITH most AS (\n{MOST_EXCLUSIVE_SQL})\n"
        "SELECT m.toward, m.class, m.feature_id,\n"
        "       round(m.relative_decoder_norm, 3) AS relative_norm,\n"
        "       s.source, round(s.activation_rate, 4) AS activation_rate,\n"
        "       round(s.mean_active_activation, 3) AS mean_active_activation,\n"
        "       round(s.energy, 4) AS energy, round(s.mean_encoder_input, 3) AS encoder_input\n"
        "FROM most m JOIN crosscoder_latent_stats s USING (feature_id)\n"
        "WHERE s.basis = $basis\n"
        "ORDER BY m.toward, abs(m.relative_decoder_norm - 0.5) DESC, m.feature_id, s.source_index",
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
        f"WITH most AS (\n{MOST_EXCLUSIVE_SQL})\n"
        "SELECT m.toward, m.class, e.feature_id, e.rank, round(e.value, 3) AS value,\n"
        "       e.source_values, e.source_inputs, e.split,\n"
        "       example_context(e.context_text, e.context_token_ids, e.position,\n"
        "                       e.context_start) AS context\n"
        "FROM most m JOIN crosscoder_examples e USING (feature_id)\n"
        f"WHERE e.basis = $basis AND e.rank <= {CONTEXTS}\n"
        "ORDER BY m.toward, abs(m.relative_decoder_norm - 0.5) DESC, e.feature_id, e.rank",
        "featurestore crosscoder-sweep --basis {basis}",
        note="source_values: what the latent writes into each source at that token (value x "
             "decoder norm); source_inputs: each source's term of its pre-activation. The "
             "activating token is marked ⟦token⟧; contexts are decoded text when the run has "
             "token strings, token ids otherwise.",
        row_limit=2 * MOST_EXCLUSIVE * CONTEXTS),
    Section(
        "Training", "How well does the crosscoder reconstruct each source?",
        "SELECT metric, round(value, 4) AS value, step, tokens FROM training_metrics\n"
        "WHERE basis = $basis\n"
        "QUALIFY step = max(step) OVER (PARTITION BY metric)\n"
        "ORDER BY metric",
        "featurestore train-crosscoder --name {basis} ...",
        ("training_curves",)),
)


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
        if run is not None:  # a shared basis: the milestone questions of its stage
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
        answers = [(section, *run_section(con, section, {"basis": basis})) for section in sections]

    directory = Path(out) if out else wh.root / "exports" / basis / "report"
    wanted = [name for section in sections for name in section.plots]
    plots = export_plots(basis, out=directory / "plots", warehouse=warehouse, plots=wanted)
    params = {"basis": basis}
    markdown = markdown_document(title, params, answers, plots.written)
    page = html_document(title, params, answers, plots.written)
    paths = {name: write_atomic(directory / name, _text_writer(text))
             for name, text in (("report.md", markdown), ("report.html", page))}
    return ReportResult(basis, str(paths["report.html"]), str(paths["report.md"]),
                        {s.title: len(rows) for s, _, rows in answers},
                        time.perf_counter() - started, dict(plots.skipped))


def _text_writer(text: str):
    return lambda path: path.write_text(text)


def run_section(con, section: Section, params: dict[str, str]) -> tuple[list[str], list[tuple]]:
    """A section's (header, rows), its $name parameters bound from `params`."""
    cursor = con.execute(section.sql, {k: v for k, v in params.items() if f"${k}" in section.sql})
    return [d[0] for d in cursor.description], cursor.fetchall()


def _filled(text: str, params: dict[str, str], quoted: bool) -> str:
    """`text` with each $name (SQL, `quoted`) or {name} (prose) of `params` written out."""
    for name, value in params.items():
        text = (text.replace(f"${name}", repr(value)) if quoted
                else text.replace(f"{{{name}}}", value))
    return text


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):  # a MAP column, e.g. crosscoder_examples.source_values
        return "{" + ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) + "}"
    return "" if value is None else str(value)


def markdown_document(title: str, params: dict[str, str], answers, plots: dict) -> str:
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


def html_document(title: str, params: dict[str, str], answers, plots: dict) -> str:
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
