"""Feature dashboards in the format Neuronpedia imports: `featurestore export-dashboards`.

    from featurestore.queries.dashboards import export_dashboards
    export_dashboards("demo-l2", "dashboards")                      # the last swept step
    export_dashboards("demo-fn", "dashboards", step=400, features="3,17")

SAEDashboard's Neuronpedia runner writes a folder of `batch-<n>.json` files, each one batch of
feature dashboards (the classes of sae_dashboard.neuronpedia.neuronpedia_dashboard: a batch of
features, each with its activation examples), and Neuronpedia's importer reads every batch file
of such a folder. This export writes that format from the warehouse, one feature per batch file,
for one shared basis at one checkpoint step:

    <out>/<basis>_step<S>/batch-<feature>.json   one feature's dashboard
    <out>/<basis>_step<S>/skipped_indexes.json   the features that never fire at step S and were
                                                 not written (SAEDashboard's list of skipped
                                                 features)

The folder holds one export: batch files of features this export did not write are removed.

The step: `step` (a swept step, or LAST), by default the last swept checkpoint, the rule of
`featurestore feature`; the result says which step was taken and why.

A batch names the source as Neuronpedia does (<layer>-<sae_set>__<sae_id_suffix>): model_id the
run, layer the block of the basis's stage (final_norm: the number of blocks; embed: 0), sae_set
the basis, sae_id_suffix "step-<S>". A feature holds, from the rows at step S:

    activations           its feature_examples rows in rank order, each context as `tokens`
                          (the run's token_strings; token ids as strings where it has none)
                          and `values`, the feature's activation at every context token
                          (feature_activations; 0.0 where it does not fire), with
                          qualifying_token_index at the activating token, the example's own;
                          bin_min -1, bin_max its max activation and bin_contains -1 mark them
                          as the top-activations group, as SAEDashboard does
    frac_nonzero          its activation rate (trajectories)
    freq_hist_data_*      histogram of its non-zero activations (feature_activations): BINS
                          equal bins from the smallest to the largest, bar_values the bin
                          centres, bar_heights the counts; one bar when all are equal
    pos_* / neg_*         the TOP_LOGITS tokens whose logits one unit of the feature raises most
                          / lowers most, through the unembedding of checkpoint S
                          (featurestore.unembedding.output_logits: exact for a
                          final_norm basis; for an earlier residual-stream stage the direct path
                          through the final norm, without its per-token scale);
                          logits_hist_data_* the same histogram over the whole vocabulary.
                          Empty, with the reason in the result, where the run has no model or
                          the stage is an MLP's hidden layer
    n_prompts_total,      the sequences of step S's activation set and their length; dataset its
    n_tokens_in_prompt    token source (its name when it has none)

Neuron alignment, correlated neurons and features, the decoder weight distribution and the
steering vector are left empty: featurestore does not compute them.

Train-crosscoder bases are refused: their latents' values are stored at their top contexts only
(crosscoder_examples), not at every token, so a context's per-token values are unknown.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.feature_ids import parse_features
from featurestore.queries.exports import json_records, write_atomic
from featurestore.registry import SHARED, get_basis
from featurestore.results import Result
from featurestore.token_text import TokenStrings
from featurestore.warehouse import Warehouse

if TYPE_CHECKING:  # torch and the model code are imported when logits are computed
    from featurestore.shared_basis import SharedBasis
    from featurestore.stages import StageReader

BINS = 50  # histogram bars, SAEDashboard's default
TOP_LOGITS = 10  # promoted and suppressed tokens, SAEDashboard's default
CHUNK = 256  # features per round of queries and logits: bounds memory on large bases
SKIPPED_FILE = "skipped_indexes.json"
_STAGE_LAYER = re.compile(r"^layer_(\d+)_")


@dataclass
class DashboardExport(Result):
    basis: str
    step: int
    step_rule: str  # how the step was chosen
    directory: str
    features: list[int]  # the features written, one batch file each
    skipped: list[int]  # features that never fire at the step and were not written
    token_text: bool  # tokens are text (token_strings); False: token ids as strings
    logits: str  # how the logit effects were computed, or why they are empty
    seconds: float
    files: list[str] = field(default_factory=list)  # relative to `directory`

    def summary(self) -> str:
        count = len(self.features)
        lines = [f"{count} dashboard{'' if count == 1 else 's'} of {self.basis!r} at step "
                 f"{self.step} ({self.step_rule}) written to {self.directory} in "
                 f"{self.seconds:.1f}s",
                 "tokens: " + ("text (token_strings)" if self.token_text else
                               "token ids (the run has no token strings)"),
                 f"logit effects: {self.logits}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} features that never fire at step "
                         f"{self.step} (skipped_indexes.json)")
        return "\n".join(lines)


def export_dashboards(basis: str, out: str | Path, step: int | str | None = None,
                      features: str | None = None,
                      warehouse: str | None = None) -> DashboardExport:
    """Write one Neuronpedia dashboard per feature of `basis` at `step` (a swept step or LAST;
    default the last swept) into <out>/<basis>_step<S>/. `features`: "3,17,40", "top:N" (highest
    energy at the step) or None for every feature that fires there. Nothing is written when the
    basis, step or features are bad."""
    started = time.perf_counter()
    wh = Warehouse(warehouse)
    with wh.connect() as con:
        info = get_basis(con, basis, SHARED, needed_for=(
            "its latents' values are stored at their top contexts only (crosscoder_examples), "
            "not at every token, so a dashboard's per-token values are unknown (`featurestore "
            f"feature N --basis {basis}` shows a latent's contexts)"))
        chosen_step, rule = _resolve_step(con, basis, step)
        firing = [f for (f,) in con.execute(
            "SELECT feature_id FROM trajectories WHERE basis = ? AND step = ? "
            "AND activation_rate > 0 ORDER BY feature_id", [basis, chosen_step]).fetchall()]
        chosen = firing if features is None else _parse_features(con, info, chosen_step,
                                                                  features)
        strings = TokenStrings.load(con, info["run"])
        batch = {"model_id": info["run"], "layer": _stage_layer(con, info),
                 "sae_set": basis, "sae_id_suffix": f"step-{chosen_step}"}
        corpus = _corpus(wh, con, info, chosen_step)
        logits = _Logits.open(wh, con, info, chosen_step)
        folder = Path(out) / f"{basis}_step{chosen_step}"
        written = []
        for start in range(0, len(chosen), CHUNK):
            part = chosen[start:start + CHUNK]
            for feature in _features(con, basis, chosen_step, part, strings, logits, corpus):
                name = f"batch-{feature['feature_index']}.json"
                _write_json(folder / name, {**batch, "features": [feature]})
                written.append(name)
    silent = sorted(set(range(info["d_hidden"])) - set(firing) - set(chosen))
    _write_json(folder / SKIPPED_FILE, {**batch, "skipped_indexes": silent})
    for stale in folder.glob("batch-*.json"):
        if stale.name not in written:
            stale.unlink()
    return DashboardExport(
        basis=basis, step=chosen_step, step_rule=rule, directory=str(folder), features=chosen,
        skipped=silent, token_text=strings is not None, logits=logits.description,
        seconds=time.perf_counter() - started, files=sorted([*written, SKIPPED_FILE]))


# -- choices -------------------------------------------------------------------------------------


def _resolve_step(con, basis: str, step: int | str | None) -> tuple[int, str]:
    """(the step, how it was chosen): a swept step, LAST, or by default the last swept one."""
    swept = [s for (s,) in con.execute(
        "SELECT DISTINCT step FROM trajectories WHERE basis = ? ORDER BY step",
        [basis]).fetchall()]
    if not swept:
        raise FeaturestoreError(
            f"--basis {basis} has not been swept yet: dashboards read its trajectories, "
            "feature_examples and feature_activations. Run featurestore "
            f"feature-trajectory-sweep --basis {basis}")
    listed = ", ".join(map(str, swept))
    if step is None:
        return swept[-1], (f"the last of {len(swept)} swept checkpoints, the default; --step "
                           "to choose")
    if isinstance(step, str) and step.strip().upper() == "LAST":
        return swept[-1], "LAST: the last swept checkpoint"
    try:
        if isinstance(step, bool):
            raise ValueError
        value = int(step.strip()) if isinstance(step, str) else int(step)
    except (TypeError, ValueError):
        raise FeaturestoreError(f"--step {step!r}: give a checkpoint step or LAST; basis {basis} "
                                f"was swept at steps {listed}") from None
    if value not in swept:
        raise NotFoundError(f"--step {value}: basis {basis} was swept at steps {listed}; give "
                            "one of them or LAST (or sweep that checkpoint first)")
    return value, "given with --step"


def _parse_features(con, info: dict, step: int, features: str) -> list[int]:
    """Feature ids "3,17,40" or "top:N" (highest energy at the step), sorted."""
    choice = parse_features(features, info["name"], info["d_hidden"])
    if choice.ids is not None:
        return choice.ids
    return sorted(f for (f,) in con.execute(
        "SELECT feature_id FROM trajectories WHERE basis = ? AND step = ? "
        "ORDER BY energy DESC, feature_id LIMIT ?", [info["name"], step, choice.top]).fetchall())


def _stage_layer(con, info: dict) -> int:
    """Neuronpedia's layer number: the block of the stage; final_norm after the last block."""
    match = _STAGE_LAYER.match(info["stage"])
    if match:
        return int(match.group(1))
    if info["stage"] == "final_norm":
        (n_layers,), = con.execute("SELECT n_layers FROM runs WHERE run = ?",
                                   [info["run"]]).fetchall()
        return n_layers
    return 0  # embed: before block 0


def _corpus(wh: Warehouse, con, info: dict, step: int) -> dict:
    """n_prompts_total, n_tokens_in_prompt and dataset of the step's activation set."""
    from featurestore.registry import get_activation_set_row, open_activation_set

    name = next(s["activation_set"] for s in info["sources"] if s["step"] == step)
    row = get_activation_set_row(con, name)
    sequences = open_activation_set(wh, row).token_columns().sequence_id
    _, lengths = np.unique(sequences, return_counts=True)
    return {"n_prompts_total": len(lengths), "n_tokens_in_prompt": int(lengths.max()),
            "dataset": row["token_source"] or row["name"]}


# -- logit effects -------------------------------------------------------------------------------


@dataclass
class _Logits:
    """The step's model and basis, for the logits a unit of each feature adds; `reader` is None
    where there are none to compute (`description` says why)."""

    description: str
    reader: StageReader | None = None
    basis: SharedBasis | None = None
    step: int = 0

    @classmethod
    def open(cls, wh: Warehouse, con, info: dict, step: int) -> _Logits:
        from featurestore.registry import get_checkpoints, get_run
        from featurestore.run_inputs import open_reader
        from featurestore.shared_basis import load_shared_basis

        run = get_run(con, info["run"])
        if run.model_family is None:
            return cls(f"none: run {run.run!r} is an {run.kind} run with no model (its "
                       "activations were registered), so there is no unembedding to read")
        if info["stage"].endswith("_mlp_hidden"):
            return cls(f"none: stage {info['stage']} is an MLP's hidden layer, not the residual "
                       "stream that the unembedding reads")
        (checkpoint,) = get_checkpoints(wh, con, run.run, [step])
        shared, _ = load_shared_basis(wh, con, info["name"])
        how = ("exact: the unembedding reads the final_norm stage" if info["stage"] ==
               "final_norm" else "direct path: through the final norm, linearised without its "
               "per-token scale, and the unembedding; later blocks not run")
        return cls(f"{how}; model {run.run}@{step}, per unit of activation",
                   open_reader(run, checkpoint), shared, step)

    def of(self, features: list[int]) -> np.ndarray | None:
        """[len(features), vocab] or None."""
        from featurestore.unembedding import output_logits

        if self.reader is None:
            return None
        c = self.basis.steps.index(self.step)
        decoder = self.basis.decoder_directions(c)[features]
        if self.basis.kind == "crosscoder":
            # A crosscoder-kind feature's value at a checkpoint is its latent times the norm of
            # that checkpoint's decoder slice, so one unit of it writes the unit direction.
            norms = np.linalg.norm(decoder, axis=1, keepdims=True)
            decoder = np.divide(decoder, norms, out=np.zeros_like(decoder), where=norms > 0)
        raw = decoder / self.basis.checkpoints[c].norm_scale  # normalised units -> the model's
        return output_logits(self.reader, raw, self.basis.stage)


# -- one feature ---------------------------------------------------------------------------------


def _features(con, basis: str, step: int, features: list[int], strings: TokenStrings | None,
              logits: _Logits, corpus: dict) -> list[dict]:
    """The dashboards of `features` (sorted ids)."""
    where = ("basis = ? AND step = ? AND feature_id BETWEEN ? AND ? "
             "AND list_contains(?, feature_id)")
    params = [basis, step, features[0], features[-1], features]
    stats = {r["feature_id"]: r for r in json_records(
        con, f"SELECT feature_id, activation_rate, max_activation FROM trajectories WHERE {where}",
        params)}
    examples: dict[int, list[dict]] = {}
    for e in json_records(con, f"""
            SELECT feature_id, rank, value, sequence_id, position, context_start,
                   context_token_ids
            FROM feature_examples WHERE {where} ORDER BY feature_id, rank""", params):
        examples.setdefault(e["feature_id"], []).append(e)
    # Every activation in the examples' context windows, to give each context token its value.
    around = {(f, s, p): v for f, s, p, v in con.execute(f"""
        SELECT a.feature_id, a.sequence_id, a.position, a.value
        FROM (SELECT * FROM feature_activations WHERE {where}) a
        JOIN (SELECT DISTINCT feature_id, sequence_id, context_start AS lo,
                     context_start + len(context_token_ids) - 1 AS hi
              FROM feature_examples WHERE {where}) w
          ON a.feature_id = w.feature_id AND a.sequence_id = w.sequence_id
         AND a.position BETWEEN w.lo AND w.hi""", params + params).fetchall()}
    table = con.execute(f"SELECT feature_id, value FROM feature_activations WHERE {where} "
                        "ORDER BY feature_id", params).fetchnumpy()
    ids, values = table["feature_id"], table["value"].astype(np.float64)
    effects = logits.of(features)

    def text(token_id: int) -> str:
        return strings.text(token_id) if strings is not None else str(int(token_id))

    def activation(e: dict, max_activation: float) -> dict:
        at = e["position"] - e["context_start"]
        context = [float(around.get((e["feature_id"], e["sequence_id"], e["context_start"] + i),
                                    0.0)) for i in range(len(e["context_token_ids"]))]
        context[at] = float(e["value"])
        return {"bin_min": -1.0, "bin_max": max_activation, "bin_contains": -1.0,
                "tokens": [text(t) for t in e["context_token_ids"]], "values": context,
                "qualifying_token_index": at}

    dashboards = []
    for j, feature in enumerate(features):
        row = stats.get(feature, {"activation_rate": 0.0, "max_activation": 0.0})
        lo, hi = np.searchsorted(ids, [feature, feature + 1])
        bar_values, bar_heights = histogram(values[lo:hi])
        logit_values, logit_heights = [], []
        if effects is not None:
            logit_values, logit_heights = histogram(effects[j])
        dashboards.append({
            "feature_index": feature,
            **_empty_tables(),
            **_logit_tables(None if effects is None else effects[j], text),
            "frac_nonzero": float(row["activation_rate"]),
            "freq_hist_data_bar_values": bar_values,
            "freq_hist_data_bar_heights": bar_heights,
            "logits_hist_data_bar_heights": logit_heights,
            "logits_hist_data_bar_values": logit_values,
            **corpus,
            "decoder_weights_dist": [],
            "activations": [activation(e, float(row["max_activation"]))
                            for e in examples.get(feature, [])],
            "vector": []})
    return dashboards


def _empty_tables() -> dict:
    """The alignment and correlation tables, which featurestore does not compute."""
    return {f"{table}_{column}": [] for table, columns in (
        ("neuron_alignment", ("indices", "values", "l1")),
        ("correlated_neurons", ("indices", "l1", "pearson")),
        ("correlated_features", ("indices", "l1", "pearson"))) for column in columns}


def _logit_tables(row: np.ndarray | None, text) -> dict:
    """neg_str, neg_values (most lowered first), pos_str, pos_values (most raised first)."""
    if row is None:
        return {"neg_str": [], "neg_values": [], "pos_str": [], "pos_values": []}
    lowered = np.argsort(row, kind="stable")[:TOP_LOGITS]
    raised = np.argsort(-row, kind="stable")[:TOP_LOGITS]
    return {"neg_str": [text(t) for t in lowered], "neg_values": row[lowered].tolist(),
            "pos_str": [text(t) for t in raised], "pos_values": row[raised].tolist()}


def histogram(values: np.ndarray) -> tuple[list[float], list[int]]:
    """(bar centres, counts): BINS equal bins from the smallest value to the largest (the
    largest in the last bin); one bar when all values are equal, none when there are none."""
    if len(values) == 0:
        return [], []
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return [lo], [len(values)]
    counts, edges = np.histogram(values, bins=BINS, range=(lo, hi))
    return ((edges[:-1] + edges[1:]) / 2).tolist(), counts.tolist()


def _write_json(path: Path, data: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, allow_nan=False)
            f.write("\n")

    write_atomic(path, write)
