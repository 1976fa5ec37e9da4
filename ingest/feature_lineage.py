"""`featurestore feature-lineage`: which model components write each feature of a shared basis.

At one or more checkpoints of the basis's run, the model runs on sampled tokens through nnsight,
and every feature that passes the causal filter gets edges from what writes it:

    dfa                     an attention head, MLP neuron or the embeddings -> feature: the
                            source's direct contribution to the residual stream, projected on
                            the feature's encoder direction, averaged over the tokens where the
                            feature fires
    grad_x_act              head or neuron -> feature: the gradient of the feature's
                            pre-activation (summed over those tokens) with respect to the
                            source's output, times that output, divided by the same count;
                            unlike dfa it also counts the paths through later blocks
    decoder_cosine          upstream feature -> feature, for --upstream (a basis of the same run
    activation_correlation  at an earlier stage): how closely their decoder directions agree,
                            and how closely their activations move together on the same tokens
    dla                     feature -> output token, for a final_norm basis: the logits the
                            feature's decoder direction adds, most promoted and most suppressed

Everything is in the basis's normalised units: feature i's pre-activation is
norm_scale * (x . W_enc[:, i]) + b_enc[i], so a source writing c into the residual stream moves it
by norm_scale * (c . W_enc[:, i]). A final_norm basis reads the residual stream after the final
norm, which is linearised per token: a LayerNorm passes c on as gamma * (c - mean(c)) / std, an
RMSNorm as gamma * c / rms, std and rms being that token's denominator (eps included). Biases (the
output biases of attention and MLPs, the final LayerNorm's beta, b_enc) are constants and no
source; with them, a feature's dfa weights over all sources add up to its mean pre-activation
where it fires.

Where the sources are comes from the model family (featurestore.stages.Family): a block's heads
are the input of its attention output projection (family.attn_out; head h in columns
h*d_head:(h+1)*d_head, query heads for grouped-query attention), its neurons the mlp_hidden
stage, which the MLP output projection (family.mlp_out) reads. Their output weights are those
projections' weights. In parallel-residual blocks (GPT-NeoX) attention and MLP both read the
block's input and both write before layer_i_post_mlp.

Causal filter: a feature gets edges when a single-feature `patches` row of the basis at this step
(metric loss) moved the loss by at least --patch-threshold; without patch rows for the step, the
--top-features features of highest trajectories.energy at the step pass; --features picks them
instead. Per feature, method and source type the --top-k edges of largest |weight| at least
--min-weight are kept.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from featurestore import ranges
from featurestore.activations import check_finite
from featurestore.errors import FeaturestoreError, NotFoundError, UnknownStageError
from featurestore.feature_ids import parse_features
from featurestore.resources import TOKEN_BYTES, require_memory
from featurestore.results import Result
from featurestore.text_table import format_cell, format_table
from featurestore.unembedding import FinalNorm, output_logits, projection
from featurestore.warehouse import Warehouse
from featurestore.writer import utc_now

if TYPE_CHECKING:  # torch is imported when a job runs, not when the CLI starts
    import torch

    from featurestore.shared_basis import SharedBasis
    from featurestore.stages import StageReader

TOKEN_SEED = 0  # the seed collect uses by default: demo runs get the tokens their sets were read on


@dataclass
class StepLineage:
    step: int
    filter: str  # what chose the features: features (given), patches or energy
    features: list[int]  # the features that passed and got edges
    # Features that passed but never fired on the sampled tokens: they have no dfa, grad_x_act or
    # activation_correlation edges (there is nothing to average over).
    silent: list[int]
    edges: int


@dataclass
class LineageResult(Result):
    basis: str
    run: str
    stage: str
    upstream: str | None
    n_tokens: int  # tokens the model read at each step
    steps: list[StepLineage]
    edges: int  # rows written to lineage_edges, all steps
    seconds: float
    # The rank-1 edge of every (step, feature, method, source type): each feature's strongest
    # source by each line of evidence.
    top: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"basis {self.basis!r} at {self.stage}: {self.edges} edges in lineage_edges over "
                 f"{len(self.steps)} checkpoint(s), {self.n_tokens} tokens each, "
                 f"{self.seconds:.1f}s"]
        lines += [f"  step {step.step}: {len(step.features)} features ({step.filter} filter), "
                  f"{step.edges} edges" + (f", silent: {step.silent}" if step.silent else "")
                  for step in self.steps]
        strongest = [e for e in self.top if e["method"] in ("dfa", "grad_x_act")]
        lines.append("strongest source of each feature (rank 1):")
        lines.append(format_table(["step", "feature", "method", "source", "weight"],
                                  [[str(e["step"]), e["dst_id"], e["method"], e["src_id"],
                                    format_cell(e["weight"])] for e in strongest[:24]]))
        return "\n".join(lines)


@dataclass(frozen=True)
class Selection:
    """The features of one step that get edges, and the filter that chose them."""

    features: list[int]
    filter: str
    setting: dict  # the filter's parameter, stored in lineage_edges.pruning


def feature_lineage(basis: str, steps: str = "all", features: str | None = None, top_k: int = 8,
                    min_weight: float = 0.0, upstream: str | None = None, tokens: int = 2048,
                    patch_threshold: float = 0.01, top_features: int = 16,
                    warehouse: str | None = None, progress: bool = True) -> LineageResult:
    """Map the features of `basis` that pass the causal filter to the heads, neurons, embeddings,
    upstream features and output tokens they connect to, at each of `steps` ("all" or
    comma-separated steps, LAST for the last); store the edges in `lineage_edges`, replacing
    earlier rows of the same basis and step."""
    from tqdm import tqdm

    from featurestore.registry import get_checkpoints, get_run, parse_steps
    from featurestore.run_inputs import open_reader

    started = time.perf_counter()
    _check_options(top_k, min_weight, tokens, patch_threshold, top_features)
    wanted_steps = parse_steps(steps, flag="--steps")
    wh = Warehouse(warehouse)
    with wh.writer(f"feature-lineage {basis}") as writer:
        # Every check runs before the first model is traced; a failure commits nothing.
        with wh.connect() as con:
            shared, sets = _load_pooled_basis(wh, con, basis, "--basis")
            chosen = shared.resolve_steps(wanted_steps, "--steps")
            run = get_run(con, shared.run)
            if run.model_family is None:
                raise FeaturestoreError(
                    f"--basis {basis}: its run {run.run!r} is an {run.kind} run with no model (its "
                    "activations were registered), and lineage runs the model to see which heads "
                    "and neurons write each feature. Use a basis fitted on a run with a model: a "
                    "trained run or one made by `featurestore register-model`.")
            checkpoints = get_checkpoints(wh, con, shared.run, chosen)
            up = None
            if upstream is not None:
                up, _ = _load_pooled_basis(wh, con, upstream, "--upstream")
                _check_upstream(shared, up, chosen)
            reader = open_reader(run, checkpoints[0])
            _check_stages(reader, shared, up)
            _check_components(reader, run.run)
            selections = {step: _select_features(con, shared, step, features, patch_threshold,
                                                 top_features) for step in chosen}
        if run.task_config is None:
            token_ids = None  # read per step from that checkpoint's activation set
        else:
            from featurestore.run_inputs import token_set

            token_ids, _ = token_set(run.task_config, None, tokens, TOKEN_SEED)

        created_at = utc_now()
        bar = tqdm(total=len(chosen), unit="step", desc=f"feature-lineage {basis}",
                   file=sys.stderr, disable=None if progress else True)
        results, top, n_tokens = [], [], 0
        for checkpoint in checkpoints:
            if checkpoint is not checkpoints[0]:
                reader = open_reader(run, checkpoint)
            c = [b.step for b in shared.checkpoints].index(checkpoint.step)
            step_tokens = token_ids if token_ids is not None else _set_tokens(
                sets[c], tokens, reader)
            n_tokens = step_tokens.numel()
            selection = selections[checkpoint.step]
            edges, silent = _step_edges(reader, shared, checkpoint.step, up, selection.features,
                                        step_tokens, top_k, min_weight)
            pruning = json.dumps({"top_k": top_k, "min_weight": min_weight,
                                  "filter": selection.filter, **selection.setting,
                                  "upstream": upstream, "tokens": n_tokens})
            rows = [{"basis": basis, "step": checkpoint.step, **edge, "pruning": pruning,
                     "created_at": created_at} for edge in edges]
            writer.put("lineage_edges", rows,
                       replace_where={"basis": basis, "step": checkpoint.step})
            results.append(StepLineage(checkpoint.step, selection.filter, selection.features,
                                       silent, len(rows)))
            top += [{"step": checkpoint.step, **{k: edge[k] for k in (
                "method", "src_type", "src_id", "dst_type", "dst_id", "weight")}}
                for edge in edges if edge["rank"] == 1]
            bar.update(1)
        bar.close()
    return LineageResult(basis=basis, run=shared.run, stage=shared.stage, upstream=upstream,
                         n_tokens=n_tokens, steps=results, edges=sum(r.edges for r in results),
                         seconds=time.perf_counter() - started, top=top)


# -- checks and choices ------------------------------------------------------------------------


def _check_options(top_k: int, min_weight: float, tokens: int, patch_threshold: float,
                   top_features: int) -> None:
    if top_k < 1:
        raise FeaturestoreError(f"--top-k {top_k}: keep at least 1 edge per feature and method")
    if not np.isfinite(min_weight) or min_weight < 0:
        raise FeaturestoreError(
            f"--min-weight {min_weight}: give a number >= 0 (edges with |weight| below it are "
            "dropped; 0 keeps every edge up to --top-k)")
    ranges.COUNT.check(tokens, "--tokens")
    require_memory("--tokens", tokens, tokens * TOKEN_BYTES, "holding the token sequences")
    if not np.isfinite(patch_threshold) or patch_threshold < 0:
        raise FeaturestoreError(
            f"--patch-threshold {patch_threshold}: give a loss change >= 0, e.g. 0.01")
    if top_features < 1:
        raise FeaturestoreError(f"--top-features must be at least 1, got {top_features}")


def _load_pooled_basis(wh: Warehouse, con, name: str, flag: str) -> tuple[SharedBasis, list]:
    """A registered pooled shared basis and its activation sets, or an error naming `flag`."""
    from featurestore.shared_basis import load_shared_basis

    shared, sets = load_shared_basis(wh, con, name, flag)
    shared.require_pooled(flag)
    return shared, sets


def _check_upstream(shared: SharedBasis, up: SharedBasis, steps: list[int]) -> None:
    if up.name == shared.name:
        raise FeaturestoreError(
            f"--upstream {up.name} is --basis itself; give a basis of an earlier stage")
    if up.run != shared.run:
        raise FeaturestoreError(
            f"--upstream {up.name} was fitted on run {up.run!r}, --basis {shared.name} on run "
            f"{shared.run!r}; upstream features must come from the same model. Give a basis of "
            f"run {shared.run}.")
    up_steps = [c.step for c in up.checkpoints]
    missing = [s for s in steps if s not in up_steps]
    if missing:
        raise NotFoundError(
            f"--upstream {up.name} was not fitted on step {', '.join(map(str, missing))} (its "
            f"steps: {', '.join(map(str, up_steps))}); choose --steps both bases were fitted on")


def _check_stages(reader: StageReader, shared: SharedBasis, up: SharedBasis | None) -> None:
    """The basis's stage (and the upstream basis's) must be residual-stream stages of the model,
    the upstream one before the basis's."""
    for flag, basis in (("--basis", shared), ("--upstream", up)):
        if basis is None:
            continue
        try:
            reader.site(basis.stage)
        except UnknownStageError as error:
            raise FeaturestoreError(
                f"{flag} {basis.name} was fitted at stage {basis.stage!r}, which the model of run "
                f"{basis.run!r} lacks: {error}. Fit the basis at one of those stages.") from None
        if basis.stage.endswith("_mlp_hidden"):
            raise FeaturestoreError(
                f"{flag} {basis.name} was fitted at {basis.stage}, an MLP's hidden layer: heads "
                "and neurons write the residual stream, so lineage needs a basis of a "
                "residual-stream stage (embed, layer_i_post_attn, layer_i_post_mlp, final_norm)")
    if up is not None:
        order = reader.stage_names
        if order.index(up.stage) >= order.index(shared.stage):
            raise FeaturestoreError(
                f"--upstream {up.name} is at stage {up.stage}, not before --basis {shared.name}'s "
                f"stage {shared.stage}; give a basis of an earlier stage as --upstream")


def _check_components(reader: StageReader, run: str) -> None:
    """Lineage splits each block's attention output projection into heads and reads the output
    weights of both projections and of the unembedding: the modules must be where the family
    says, Linear (or transformers' Conv1D) layers, and the head count known and a divisor of the
    attention projection's input width."""
    family = reader.family
    if reader.n_heads is None:
        raise FeaturestoreError(
            f"the {family.name} model of run {run!r} does not state its number of attention "
            "heads per block, which lineage needs to split the attention output projection "
            f"({family.attn_out}) into heads; give it: StageReader(..., n_heads=N), or n_heads "
            "in a custom model's adapter")
    projection(reader, "unembed")
    for i in range(reader.n_layers):
        projection(reader, "mlp_out", i)
        width = projection(reader, "attn_out", i).shape[1]
        if width % reader.n_heads:
            raise FeaturestoreError(
                f"{family.attn_out.format(i=i)} of the {family.name} model of run {run!r} reads "
                f"{width} values, which do not split into {reader.n_heads} heads of equal width")


def _select_features(con, shared: SharedBasis, step: int, features: str | None,
                     patch_threshold: float, top_features: int) -> Selection:
    """--features if given; else the features whose single-feature patch moved the loss by at
    least patch_threshold, if the step has patch rows; else the top features by energy."""
    if features is not None:
        choice = parse_features(features, shared.name, shared.d_hidden)
        chosen = (choice.ids if choice.ids is not None
                  else _top_by_energy(con, shared, step, choice.top, "--features"))
        return Selection(chosen, "features", {"features": features.strip()})

    (patch_rows,) = con.execute("SELECT count(*) FROM patches WHERE basis = ? AND target_step = ?",
                                [shared.name, step]).fetchone()
    if patch_rows:
        passed = [f for (f,) in con.execute(
            "SELECT DISTINCT feature_ids[1] FROM patches WHERE basis = ? AND target_step = ? "
            "AND len(feature_ids) = 1 AND metric = 'loss' AND abs(delta) >= ? ORDER BY 1",
            [shared.name, step, patch_threshold]).fetchall()]
        return Selection(passed, "patches", {"patch_threshold": patch_threshold})
    return Selection(_top_by_energy(con, shared, step, top_features, "--top-features"),
                     "energy", {"top_features": top_features})


def _top_by_energy(con, shared: SharedBasis, step: int, count: int, flag: str) -> list[int]:
    chosen = [f for (f,) in con.execute(
        "SELECT feature_id FROM trajectories WHERE basis = ? AND step = ? "
        "ORDER BY energy DESC, feature_id LIMIT ?", [shared.name, step, count]).fetchall()]
    if not chosen:
        raise NotFoundError(
            f"{flag}: basis {shared.name} has no trajectories at step {step} to rank features "
            "by energy. Run `featurestore feature-trajectory-sweep --basis "
            f"{shared.name}` first (or `featurestore feature-patch`, to filter by patching), or "
            "give feature ids with --features 3,17")
    return sorted(chosen)


def _set_tokens(acts, n_tokens: int, reader: StageReader) -> torch.Tensor:
    """Token sequences [n, length] rebuilt from an activation set's token columns: the first
    sequences covering n_tokens, for runs without a demo task to sample from."""
    import torch

    token_ids, _ = acts.token_columns().sequences(acts.name, "lineage")
    length = token_ids.shape[1]
    n_ctx = _context_length(reader.module)
    if n_ctx is not None and length > n_ctx:
        raise FeaturestoreError(
            f"activation set {acts.name} holds sequences of {length} tokens, longer than the "
            f"model's context of {n_ctx}")
    if token_ids.max() >= reader.vocab_size:
        raise FeaturestoreError(
            f"activation set {acts.name} holds token ids up to {token_ids.max()}, outside the "
            f"model's vocabulary of {reader.vocab_size}")
    return torch.from_numpy(token_ids[:-(-n_tokens // length)].copy())


def _context_length(module) -> int | None:
    """The longest sequence the model's config allows (the demo's n_ctx, GPT-2's n_positions,
    max_position_embeddings elsewhere); None for a model with no such config, which is then read
    at the length its activation set was collected at."""
    config = getattr(module, "config", None)
    for name in ("n_ctx", "n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# -- reading the model ------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Components that one read covers: a block's attention heads (the input of the family's
    attn_out projection, head h in columns h*d_head:(h+1)*d_head) or its MLP neurons (the
    mlp_hidden stage, which the family's mlp_out projection reads)."""

    kind: str  # attention_head | mlp_neuron
    block: int
    label: str  # the read's label in Plan.reads

    def ids(self, count: int) -> list[str]:
        letter = "H" if self.kind == "attention_head" else "N"
        return [f"L{self.block}{letter}{k}" for k in range(count)]


@dataclass(frozen=True)
class Plan:
    """What one step reads through nnsight, up to the basis's stage."""

    stage: str
    sources: list[Source]  # every head and neuron group writing before the stage, forward order
    reads: list[tuple[str, str]]  # (label, nnsight path) of every value read, forward order

    @classmethod
    def for_stage(cls, reader: StageReader, stage: str, upstream_stage: str | None) -> Plan:
        sites = _sites(reader)
        labels = [label for label, _ in sites]
        groups = {}
        for i in range(reader.n_layers):
            groups[f"heads_{i}"] = Source("attention_head", i, f"heads_{i}")
            groups[f"layer_{i}_mlp_hidden"] = Source("mlp_neuron", i, f"layer_{i}_mlp_hidden")
        sources = [groups[label] for label in labels[:labels.index(stage)] if label in groups]
        wanted = {"embed", stage, *(source.label for source in sources)}
        if stage == "final_norm":
            wanted.add("final_residual")  # its per-token spread is what the final norm divides by
        if upstream_stage is not None:
            wanted.add(upstream_stage)
        return cls(stage, sources, [(label, path) for label, path in sites if label in wanted])


def _sites(reader: StageReader) -> list[tuple[str, str]]:
    """(label, nnsight path) of every value lineage can read in the model, in the order the
    forward pass reaches them; stages are labelled by their names. A block's heads come before
    its post_attn stage (where the family has one) and its MLP: in parallel-residual blocks the
    MLP reads the block input, not attention's output, yet attention still runs first."""

    def stage(name: str) -> tuple[str, str]:
        site = reader.site(name)
        return name, f"{site.module}.{site.port}"

    family = reader.family
    sites = [stage("embed")]
    for i in range(reader.n_layers):
        sites.append((f"heads_{i}", f"{family.attn_out.format(i=i)}.input"))
        if f"layer_{i}_post_attn" in reader.stage_names:
            sites.append(stage(f"layer_{i}_post_attn"))
        sites += [stage(f"layer_{i}_mlp_hidden"), stage(f"layer_{i}_post_mlp")]
    return sites + [("final_residual", f"{family.final_norm.module}.input"),
                    stage("final_norm")]


@dataclass
class Encoder:
    """The selected features of a pooled basis at one checkpoint, in normalised units."""

    basis: SharedBasis
    features: list[int]
    scale: float  # the checkpoint's norm scale

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """[n, F]: the basis's own encode, which decides where a feature fires (a BatchTopK
        basis applies its threshold)."""
        values = self.basis.model.encode((x * self.scale)[:, None, :], normalized=True)
        return values[:, self.features]

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[n, F], differentiable in x."""
        bias = self.basis.model.b_enc.detach()[self.features]
        return x * self.scale @ self.directions().to(x.dtype) + bias

    def directions(self) -> torch.Tensor:
        """[d, F]: each feature's encoder direction."""
        return self.basis.model.W_enc.detach()[0][:, self.features].double()


@dataclass
class BatchReads:
    """One batch's values, detached and flattened to [tokens, width], with the gradient x
    activation sums that needed the live graph."""

    values: dict[str, torch.Tensor]  # label -> [n, width]
    activations: torch.Tensor  # [n, F]: the selected features' values
    grad_x_act: dict[str, torch.Tensor]  # source label -> [F, heads or neurons], token sums


def _read_batch(reader: StageReader, plan: Plan, encoder: Encoder,
                tokens: torch.Tensor) -> BatchReads:
    """Trace the model on one batch through nnsight (see _trace_body)."""
    import nnsight

    with reader.model.trace(tokens) as tracer:
        reads = nnsight.save(_trace_body(reader, plan, encoder))
        tracer.stop()  # nothing after the stage is needed
    return reads


def _trace_body(reader: StageReader, plan: Plan, encoder: Encoder) -> BatchReads:
    """Runs inside the trace, where nnsight hands over each value as the forward pass reaches
    it: read the plan's values, encode the stage, then one backward pass per feature, reading
    each source's gradient with nnsight's `.grad`."""
    import torch

    live = {}
    for label, path in plan.reads:
        value = reader.model.get(path)
        # Some blocks return (hidden_states, extras...); the stage is the hidden states.
        live[label] = value[0] if isinstance(value, tuple) else value
        if label == "embed":
            # The weights are frozen (_step_edges), so the graph starts here, before block 0.
            live[label].requires_grad_(True)
    x = live[plan.stage].reshape(-1, live[plan.stage].shape[-1])
    activations = encoder.activations(x.detach())
    firing = activations > 0
    pre = encoder.pre_activations(x)

    n_heads = reader.n_heads
    grad_x_act = {source.label: torch.zeros(
        len(encoder.features),
        n_heads if source.kind == "attention_head" else live[source.label].shape[-1],
        dtype=torch.float64) for source in plan.sources}
    for j in range(len(encoder.features)):
        if not plan.sources or not firing[:, j].any():
            continue
        objective = pre[firing[:, j], j].sum()
        with objective.backward(retain_graph=True):
            # nnsight serves gradients in reverse forward order: the last source first.
            for source in reversed(plan.sources):
                value = live[source.label]
                product = (value.grad * value).detach().double()
                product = product.reshape(-1, value.shape[-1]).sum(dim=0)
                grad_x_act[source.label][j] = (product.reshape(n_heads, -1).sum(dim=1)
                                               if source.kind == "attention_head" else product)
    return BatchReads({label: value.detach().reshape(-1, value.shape[-1])
                       for label, value in live.items()}, activations, grad_x_act)


# -- attribution ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadOuts:
    """What a unit written by each source adds to each selected feature's pre-activation, before
    the per-token factor (norm_scale, and for a final_norm basis 1 / the norm's denominator):
    fixed per step, so formed once."""

    embed: torch.Tensor  # [d, F]: the residual-stream directions the features read
    sources: dict[str, torch.Tensor]  # source label -> [width of its read, F]
    norm: FinalNorm | None  # the final norm, for a final_norm basis

    @classmethod
    def build(cls, reader: StageReader, plan: Plan, encoder: Encoder) -> ReadOuts:
        directions = encoder.directions()  # [d, F]
        norm = FinalNorm.of(reader) if plan.stage == "final_norm" else None
        if norm is not None:
            directions = norm.read_directions(directions)
        field_names = {"attention_head": "attn_out", "mlp_neuron": "mlp_out"}
        # Head h writes through columns h*d_head:(h+1)*d_head of attn_out, neuron k through
        # column k of mlp_out: the projection's transpose maps each read value to the features.
        sources = {source.label: projection(reader, field_names[source.kind], source.block)
                   .double().T @ directions for source in plan.sources}
        return cls(directions, sources, norm)


def _direct_sums(reads: BatchReads, plan: Plan, read_outs: ReadOuts, encoder: Encoder,
                 n_heads: int) -> dict[str, np.ndarray]:
    """Per source, the sum over the tokens where each feature fires of the source's direct
    contribution to its pre-activation: label -> [F, heads or neurons]; "embed" -> [F, 1]."""
    import torch

    firing = (reads.activations > 0).double()
    weights = firing * encoder.scale  # [n, F]
    if read_outs.norm is not None:
        weights = weights / read_outs.norm.denominator(
            reads.values["final_residual"].double())[:, None]
    embed = reads.values["embed"].double()
    sums = {"embed": ((embed @ read_outs.embed) * weights).sum(dim=0)[:, None].numpy()}
    for source in plan.sources:
        value = reads.values[source.label].double()
        read_out = read_outs.sources[source.label]
        if source.kind == "attention_head":
            sums[source.label] = torch.einsum(
                "nhk,hkf,nf->fh", value.reshape(len(value), n_heads, -1),
                read_out.reshape(n_heads, -1, read_out.shape[1]), weights).numpy()
        else:
            sums[source.label] = ((weights.T @ value) * read_out.T).numpy()
    return sums


class CorrelationSums:
    """Running moments of the upstream features' activations u and the selected features'
    activations v over the tokens, for their Pearson correlations."""

    def __init__(self, n_up: int, n_features: int):
        self.n = 0
        self.u, self.uu = np.zeros(n_up), np.zeros(n_up)
        self.v, self.vv = np.zeros(n_features), np.zeros(n_features)
        self.uv = np.zeros((n_up, n_features))

    def add(self, u: np.ndarray, v: np.ndarray) -> None:
        self.n += len(u)
        self.u += u.sum(axis=0)
        self.uu += (u ** 2).sum(axis=0)
        self.v += v.sum(axis=0)
        self.vv += (v ** 2).sum(axis=0)
        self.uv += u.T @ v

    def correlation(self) -> np.ndarray:
        """[n_features, n_up]; NaN where either feature is constant on the tokens."""
        mean_u, mean_v = self.u / self.n, self.v / self.n
        covariance = self.uv / self.n - np.outer(mean_u, mean_v)
        spread = np.sqrt(np.outer(self.uu / self.n - mean_u ** 2, self.vv / self.n - mean_v ** 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(spread > 0, covariance / spread, np.nan).T


def _step_edges(reader: StageReader, shared: SharedBasis, step: int, up: SharedBasis | None,
                features: list[int], tokens: torch.Tensor, top_k: int,
                min_weight: float) -> tuple[list[dict], list[int]]:
    """The lineage_edges rows of one step (less basis, step, pruning, created_at) and the
    selected features that never fired."""
    from featurestore.run_inputs import batch_sequences

    if not features:
        return [], []
    reader.module.requires_grad_(False)  # gradients are wanted for activations only
    encoder = Encoder(shared, features, _norm_scale(shared, step))
    plan = Plan.for_stage(reader, shared.stage, None if up is None else up.stage)
    read_outs = ReadOuts.build(reader, plan, encoder)
    up_encoder = correlations = None
    if up is not None:
        up_encoder = Encoder(up, list(range(up.d_hidden)), _norm_scale(up, step))
        correlations = CorrelationSums(up.d_hidden, len(features))

    firing = np.zeros(len(features), dtype=np.int64)
    direct: dict[str, np.ndarray] = {}
    grad_x_act: dict[str, np.ndarray] = {}
    per_batch = batch_sequences(tokens.shape[1])
    for start in range(0, len(tokens), per_batch):
        reads = _read_batch(reader, plan, encoder, tokens[start:start + per_batch])
        for label, value in reads.values.items():  # NaN/Inf weights: every edge would be NaN
            check_finite(value, f"checkpoint {shared.run}@{step} at {label}")
        firing += (reads.activations > 0).sum(dim=0).numpy()
        for label, value in _direct_sums(reads, plan, read_outs, encoder,
                                         reader.n_heads).items():
            direct[label] = direct.get(label, 0.0) + value
        for label, value in reads.grad_x_act.items():
            grad_x_act[label] = grad_x_act.get(label, 0.0) + value.numpy()
        if up is not None:
            upstream = up_encoder.activations(reads.values[up.stage])
            correlations.add(upstream.double().numpy(), reads.activations.double().numpy())

    fired = firing > 0
    count = np.maximum(firing, 1)[:, None]  # silent features' sums are 0 and get no edges
    edges = []
    for j, feature in enumerate(features):
        if not fired[j]:
            continue
        target = ("feature", str(feature))
        edges += _ranked("dfa", [("embedding", "embed", *target)], direct["embed"][j] / count[j],
                         top_k, min_weight)
        for method, sums in (("dfa", direct), ("grad_x_act", grad_x_act)):
            for kind in ("attention_head", "mlp_neuron"):
                group = [source for source in plan.sources if source.kind == kind]
                if not group:
                    continue
                ids = [i for source in group for i in source.ids(sums[source.label].shape[1])]
                weights = np.concatenate([sums[source.label][j] for source in group]) / count[j]
                edges += _ranked(method, [(kind, i, *target) for i in ids], weights, top_k,
                                 min_weight)
    if up is not None:
        edges += _upstream_edges(shared, up, features, fired, correlations.correlation(),
                                 read_outs.norm, top_k, min_weight)
    if shared.stage == "final_norm":
        edges += _logit_edges(reader, shared, step, features, top_k, min_weight)
    return edges, [f for j, f in enumerate(features) if not fired[j]]


def _norm_scale(basis: SharedBasis, step: int) -> float:
    return next(c.norm_scale for c in basis.checkpoints if c.step == step)


def _upstream_edges(shared: SharedBasis, up: SharedBasis, features: list[int], fired: np.ndarray,
                    correlation: np.ndarray, norm: FinalNorm | None, top_k: int,
                    min_weight: float) -> list[dict]:
    """decoder_cosine and activation_correlation edges from the upstream basis's features; for a
    final_norm basis `norm` is the final norm."""
    import torch

    up_decoder = up.decoder_directions(0)  # [h_up, d]; pooled: one decoder for all checkpoints
    if norm is not None:
        # An upstream direction as the final norm passes it on (the per-token denominator leaves
        # a cosine unchanged).
        up_decoder = norm.passes_on(torch.from_numpy(up_decoder).double()).numpy()
    decoder = shared.decoder_directions(0)[features]  # [F, d]
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (decoder @ up_decoder.T) / np.outer(np.linalg.norm(decoder, axis=1),
                                                     np.linalg.norm(up_decoder, axis=1))
    edges = []
    for j, feature in enumerate(features):
        candidates = [("feature", str(i), "feature", str(feature)) for i in range(up.d_hidden)]
        edges += _ranked("decoder_cosine", candidates, cosine[j], top_k, min_weight)
        if fired[j]:
            edges += _ranked("activation_correlation", candidates, correlation[j], top_k,
                             min_weight)
    return edges


def _logit_edges(reader: StageReader, shared: SharedBasis, step: int, features: list[int],
                 top_k: int, min_weight: float) -> list[dict]:
    """dla edges: the logits each feature's decoder direction, in raw units, adds to every token
    (output_logits); half of top_k for the most promoted tokens, the rest for the most
    suppressed."""
    decoder = shared.decoder_directions(0)[features] / _norm_scale(shared, step)
    logits = output_logits(reader, decoder, shared.stage)  # [F, vocab]
    edges = []
    for j, feature in enumerate(features):
        row = logits[j]
        promoted = _strongest(np.where(row > 0, row, np.nan), -(-top_k // 2), min_weight)
        suppressed = _strongest(np.where(row < 0, row, np.nan), top_k // 2, min_weight)
        tokens = np.concatenate([promoted, suppressed])
        edges += _ranked("dla", [("feature", str(feature), "token", str(t)) for t in tokens],
                         row[tokens], top_k, min_weight)
    return edges


def _strongest(weights: np.ndarray, limit: int, min_weight: float) -> np.ndarray:
    """Indices of the `limit` finite weights of largest |weight| >= min_weight, largest first
    (ties in index order)."""
    candidates = np.flatnonzero(np.isfinite(weights) & (np.abs(weights) >= min_weight))
    return candidates[np.argsort(-np.abs(weights[candidates]), kind="stable")][:limit]


def _ranked(method: str, candidates: list[tuple[str, str, str, str]], weights: np.ndarray,
            top_k: int, min_weight: float) -> list[dict]:
    """Rows for the top_k candidates (src_type, src_id, dst_type, dst_id) by |weight|."""
    rows = []
    for rank, i in enumerate(_strongest(weights, top_k, min_weight), start=1):
        src_type, src_id, dst_type, dst_id = candidates[i]
        rows.append({"src_type": src_type, "src_id": src_id, "dst_type": dst_type,
                     "dst_id": dst_id, "weight": float(weights[i]), "method": method,
                     "rank": rank})
    return rows
