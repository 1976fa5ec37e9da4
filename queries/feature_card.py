"""One feature on one page: `featurestore feature FEATURE --basis B`.

    from featurestore.queries.feature_card import feature_card
    card = feature_card("demo-l2", 12)          # FeatureCard
    print(card.summary())                       # the terminal text
    card.to_dict()                              # what --json prints

A card gathers what the warehouse knows about one feature, each part from one table:

    shared bases (shared-feature-fit)
        trajectory   energy, activation rate and mean activation at every swept checkpoint
                     (trajectories), with a sparkline of energy over the steps
        birth        its births row under the rule the graphs and plots use: feature-birth-
                     analyze's default parameters when stored, else the closest stored set
                     (birth_rules.births_rule_sets); censored births are said so
        examples     its top contexts at one checkpoint (feature_examples; default the last)
    train-crosscoder bases (model diffs)
        model diff   its class, relative decoder norm and decoder cosine (model_diff)
        sources      per source: activation rate, mean activation, energy, encoder input
                     (crosscoder_latent_stats)
        examples     its top contexts with what it writes into each source (crosscoder_examples)

Contexts show the decoded text with the activating token marked ⟦token⟧ when the run has token
strings, else the token ids marked the same way (the example_context SQL macro).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.queries.exports import json_records
from featurestore.registry import get_basis
from featurestore.results import Result
from featurestore.warehouse import Warehouse

SPARK = "▁▂▃▄▅▆▇█"
EXAMPLES = 8


@dataclass
class FeatureCard(Result):
    basis: str
    feature_id: int
    kind: str  # pooled | crosscoder
    run: str | None  # shared bases: the run fitted on; None for train-crosscoder bases
    stage: str | None
    d_hidden: int
    # shared bases: one dict per swept checkpoint (step, activation_rate, mean_activation,
    # mean_active_activation, max_activation, energy), in step order
    trajectory: list[dict] = field(default_factory=list)
    energy_sparkline: str = ""
    peak_energy_step: int | None = None
    births_rule: dict | None = None  # the births parameter set read, with `default`
    birth: dict | None = None  # the births row of this feature under that rule
    birth_summary: str = ""  # the birth in words ("born at step 400 (censored: ...)")
    # train-crosscoder bases
    model_diff: dict | None = None  # class, relative_decoder_norm, decoder_cosine, frequency
    sources: list[dict] = field(default_factory=list)  # crosscoder_latent_stats rows
    examples_step: int | None = None  # the checkpoint of `examples` (shared bases)
    # rank, value, split, token, context (display text), and the stored columns
    examples: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # what is not stored yet, and the command

    def summary(self) -> str:
        """The card as terminal text."""
        head = (f"feature {self.feature_id} of {self.basis} ({self.kind} basis, "
                f"{self.d_hidden} features")
        head += (f", run {self.run} at {self.stage})" if self.run else
                 ", trained by train-crosscoder)")
        lines = [head]
        if self.trajectory:
            first, last = self.trajectory[0], self.trajectory[-1]
            lines += [
                f"energy over {len(self.trajectory)} checkpoints (steps {first['step']}.."
                f"{last['step']}): {self.energy_sparkline}  peak "
                f"{max(t['energy'] for t in self.trajectory):.4g} at step "
                f"{self.peak_energy_step}",
                f"{'step':>8}  {'energy':>9}  {'rate':>8}  {'mean act':>9}"]
            lines += [f"{t['step']:>8}  {t['energy']:>9.4g}  {t['activation_rate']:>8.4f}  "
                      f"{t['mean_activation']:>9.4g}" for t in self.trajectory]
        if self.run:
            lines.append(f"birth: {self.birth_summary}")
        if self.model_diff:
            d = self.model_diff
            lines.append(f"model diff: {d['class']} (relative decoder norm "
                         f"{_number(d['relative_decoder_norm'])}, decoder cosine "
                         f"{_number(d['decoder_cosine'])}, frequency {_number(d['frequency'])})")
        if self.sources:
            lines.append(f"{'source':>10}  {'rate':>8}  {'mean act':>9}  {'energy':>9}  "
                         f"{'dec norm':>8}  {'enc input':>9}")
            lines += [f"{s['source']:>10}  {s['activation_rate']:>8.4f}  "
                      f"{s['mean_activation']:>9.4g}  {s['energy']:>9.4g}  "
                      f"{s['decoder_norm']:>8.3f}  {_number(s['mean_encoder_input']):>9}"
                      for s in self.sources]
        if self.examples:
            where = f" at step {self.examples_step}" if self.examples_step is not None else ""
            lines.append(f"top {len(self.examples)} contexts{where}:")
            for e in self.examples:
                per_source = "".join(f" {label} {v:.3g}"
                                     for label, v in (e.get("source_values") or {}).items())
                lines.append(f"  {e['rank']:>2}. {e['value']:.3f}{per_source}  [{e['split']}]  "
                             f"{_one_line(e['context'])}")
        elif any(t["step"] == self.examples_step and t["activation_rate"] == 0
                 for t in self.trajectory):
            lines.append(f"no contexts at step {self.examples_step}: the feature does not fire "
                         "there")
        lines += [f"missing: {m}" for m in self.missing]
        return "\n".join(lines)


def feature_card(basis: str, feature: int, step: int | None = None, examples: int = EXAMPLES,
                 warehouse: str | None = None) -> FeatureCard:
    """The card of `feature` in `basis`; `step` picks the checkpoint of the examples (default:
    the last swept one; shared bases only), `examples` how many contexts to show."""
    if examples < 0:
        raise FeaturestoreError(f"--examples must be 0 or more, got {examples}")
    with Warehouse(warehouse).connect() as con:
        info = get_basis(con, basis)
        if not 0 <= feature < info["d_hidden"]:
            raise NotFoundError(f"FEATURE {feature}: basis {basis} has features 0.."
                                f"{info['d_hidden'] - 1}")
        card = FeatureCard(basis, feature, info["kind"], info["run"], info["stage"],
                           info["d_hidden"])
        if info["run"] is None:
            if step is not None:
                raise FeaturestoreError(
                    f"--step {step}: {basis} is a train-crosscoder basis, encoded once over its "
                    "sources' tokens; it has no checkpoints to choose from (leave --step out)")
            _crosscoder_parts(con, card, examples)
        else:
            _shared_parts(con, card, step, examples)
    return card


def _shared_parts(con, card: FeatureCard, step: int | None, examples: int) -> None:
    from featurestore.birth_rules import BIRTH_RULE_COLUMNS, shown_births_rule

    basis, feature = card.basis, card.feature_id
    card.trajectory = json_records(con, """
        SELECT step, activation_rate, mean_activation, mean_active_activation, max_activation,
               energy
        FROM trajectories WHERE basis = ? AND feature_id = ? ORDER BY step""", [basis, feature])
    steps = [t["step"] for t in card.trajectory]
    if not steps:
        if step is not None:
            raise FeaturestoreError(f"--step {step}: basis {basis} has not been swept yet; run "
                                    f"featurestore feature-trajectory-sweep --basis {basis}")
        card.missing.append(f"trajectories and examples: run featurestore "
                            f"feature-trajectory-sweep --basis {basis}")
    else:
        card.energy_sparkline = sparkline([t["energy"] for t in card.trajectory])
        card.peak_energy_step = max(card.trajectory, key=lambda t: t["energy"])["step"]
        if step is not None and step not in steps:
            raise NotFoundError(f"--step {step}: basis {basis} was swept at steps "
                                f"{', '.join(map(str, steps))}")
        card.examples_step = steps[-1] if step is None else step
        card.examples = json_records(con, f"""
            SELECT rank, value, split,
                   example_token(token_text, context_token_ids, position, context_start) AS token,
                   {_CONTEXT} AS context,
                   sequence_id, position, token_text, context_text, context_token_ids
            FROM feature_examples
            WHERE basis = ? AND feature_id = ? AND step = ? AND rank <= ?
            ORDER BY rank""", [basis, feature, card.examples_step, examples])

    card.births_rule = shown_births_rule(con, basis)
    if card.births_rule is None:
        card.birth_summary = (f"no birth row: run featurestore feature-birth-analyze "
                              f"--basis {basis}")
        card.missing.append(card.birth_summary.removeprefix("no birth row: "))
        return
    where = " AND ".join(f"{c} = ?" for c in BIRTH_RULE_COLUMNS)
    rows = json_records(con, f"""
        SELECT first_present_step, birth_step, birth_censored, stabilization_step, death_step,
               death_censored, present_at_init, feature_threshold, drift
        FROM births WHERE basis = ? AND feature_id = ? AND {where}""",
                        [basis, feature, *(card.births_rule[c] for c in BIRTH_RULE_COLUMNS)])
    card.birth = rows[0] if rows else None
    card.birth_summary = describe_birth(card.birth, card.births_rule)


# The display context of an example row (sql/macros/example_context.sql).
_CONTEXT = "example_context(context_text, context_token_ids, position, context_start)"


def _crosscoder_parts(con, card: FeatureCard, examples: int) -> None:
    basis, feature = card.basis, card.feature_id
    found = json_records(con, """
        SELECT class, relative_decoder_norm, decoder_cosine, frequency, nu_error
        FROM model_diff WHERE basis = ? AND feature_id = ?""", [basis, feature])
    card.model_diff = found[0] if found else None
    card.sources = json_records(con, """
        SELECT source, activation_rate, mean_activation, mean_active_activation, max_activation,
               energy, decoder_norm, mean_encoder_input
        FROM crosscoder_latent_stats WHERE basis = ? AND feature_id = ?
        ORDER BY source_index""", [basis, feature])
    card.examples = json_records(con, f"""
        SELECT rank, value, split,
               example_token(token_text, context_token_ids, position, context_start) AS token,
               {_CONTEXT} AS context, source_values, source_inputs,
               sequence_id, position, token_text, context_text, context_token_ids
        FROM crosscoder_examples WHERE basis = ? AND feature_id = ? AND rank <= ?
        ORDER BY rank""", [basis, feature, examples])
    if not card.sources:
        card.missing.append(f"per-source statistics and examples: run featurestore "
                            f"crosscoder-sweep --basis {basis}")


def sparkline(values: list[float]) -> str:
    """One block character per value, scaled from 0 to the largest value."""
    peak = max(values, default=0.0)
    if peak <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / peak * (len(SPARK) - 1) + 0.5))]
                   for v in values)


def describe_birth(birth: dict | None, rule: dict) -> str:
    """A births row in words, with the rule it was found under."""
    bound = (f"{rule['threshold']:g} x its peak" if rule["presence"] == "relative"
             else f"{rule['threshold']:g}")
    said = (f"{rule['metric']} >= {bound} for K = {rule['persistence']} checkpoints"
            + ("" if rule["default"] else ", not the default rule"))
    if birth is None:
        return f"no birth row for this feature under {said}"
    if birth["present_at_init"]:
        text = "present at init (not a birth)"
    elif birth["birth_step"] is not None:
        text = f"born at step {birth['birth_step']}"
        if birth["birth_censored"]:
            text += (f" (censored: present from there to the last checkpoint, fewer than "
                     f"K = {rule['persistence']} observed)")
    elif birth["first_present_step"] is not None:
        text = (f"no clean birth: first present at step {birth['first_present_step']}, never "
                f"for K = {rule['persistence']} checkpoints in a row after an absent start")
    else:
        text = "never present"
    if birth["death_step"] is not None:
        text += f"; dies at step {birth['death_step']}" + (
            " (censored)" if birth["death_censored"] else "")
    if birth["stabilization_step"] is not None:
        text += f"; stable from step {birth['stabilization_step']}"
    return f"{text} [{said}]"


def _number(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _one_line(text: str) -> str:
    # Token strings may hold newlines and tabs; a card line must stay one line.
    return text.replace("\n", "\\n").replace("\t", "\\t")
