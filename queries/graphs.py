"""Graph exports: a shared basis's features, what builds them and what they do, as networkx graphs.

`build_graph(con, basis, step)` reads the warehouse with SQL and returns a `networkx.MultiDiGraph`
(several methods can join the same pair of nodes); `export_graphs(basis, step, out)` writes it in
three formats, each file atomically (a temporary file in the same folder, then `os.replace`):

    <basis>_graph.json               node-link JSON (`networkx.node_link_data(G, edges="links")`)
                                     with the graph attributes also at the top level
    <basis>_graph.graphml            GraphML for Gephi / Cytoscape: scalar attributes only
    <basis>_attribution_graph.json   the circuit-tracer / Neuronpedia attribution-graph layout,
                                     extended with checkpoint steps

With a step the names end in `_step<N>` (e.g. `tiny-l2_graph_step20.json`). The default folder is
`<warehouse root>/exports/<basis>/graphs`.

Nodes (id: attributes; every node has `node_type` and `label`)
------------------------------------------------------------------
    feature:<basis>:<id>     basis, stage, feature_id, birth_step, birth_censored,
                             stabilization_step, death_step, death_censored, present_at_init,
                             feature_threshold (from `births` under one rule, below: a censored
                             birth or death falls in the last persistence - 1 checkpoints, so its
                             persistence could not be observed in full), top_tokens (the
                             most frequent activating token ids of its top `feature_examples` at
                             `examples_step`), top_token_texts (those tokens as text, where the
                             run has token strings), top_context_tokens (the same over the whole
                             context windows), top_context (the strongest example's context,
                             decoded with the activating token marked ⟦token⟧, or its ids marked
                             so), examples_step, activation_rate, mean_active_activation,
                             energy (`trajectories` at examples_step). The label names the top
                             tokens as text when there is text, else by id. Every feature of the
                             basis is a node; upstream features appear where a flows_to edge
                             names them.
    head:L<b>H<h>            attention_head: layer, head
    neuron:L<b>N<n>          mlp_neuron: layer, neuron
    embedding                token + position embeddings
    logit:<token_id>         an output token: token_id
    checkpoint:<step>        one per checkpoint of the basis: run, step, train_loss,
                             heldout_loss, train_accuracy, heldout_accuracy
    recon_error:<basis>:<step>  reconstruction_error: basis, step, explained_variance,
                             relative_reconstruction_error, l0, dead_fraction
                             (`checkpoint_summary`), and where `patches` has rows at that target
                             step, patch_recon_rel_error / patch_error_norm_share /
                             patch_spliced_loss_delta per token split (dicts) and
                             patch_recon_rel_error_mean. One per step of the graph (every
                             checkpoint of the basis for the all-steps graph).

None values are left out of the attributes (no node says birth_step = None).

Edges (every edge has edge_type, weight, method and step; keys are unique strings)
-----------------------------------------------------------------------------------
    lineage       head / neuron / embedding -> feature: `lineage_edges` rows with a component
                  source, method dfa or grad_x_act; rank, src_type.
    flows_to      upstream feature -> feature: `lineage_edges` rows with src_type feature and
                  method decoder_cosine or activation_correlation; the source is a feature of the
                  basis named by that row's pruning JSON "upstream"; rank, upstream.
    dla           feature -> logit:<token>: method dla; rank.
    born_at       feature -> checkpoint:<birth_step>: weight 1.0, method "births:<metric>",
                  step = birth_step, censored (births.birth_censored: present from birth to the
                  last checkpoint, fewer than persistence checkpoints observed; left out on rows
                  written before births recorded it); for every `births` row of the chosen rule
                  with a birth_step.
    patch_effect  feature -> checkpoint:<target_step>: single-feature `patches` rows; weight =
                  delta, method = the patch mode, step = target_step; metric, split, mode,
                  source_step, scale, clean, patched, recon_rel_error, error_norm_share,
                  spliced_loss_delta, n_tokens.

lineage, flows_to, dla and patch_effect edges are per step: `step=None` takes every step with
`lineage_edges` or `patches` rows for the basis; an int takes that step only. born_at edges do
not depend on the step selection.

Births rule: `births` holds one row set per parameter set (metric, presence, threshold,
persistence, stable_eps, stable_cos). The graph uses the set of feature-birth-analyze's defaults
(`featurestore.birth_rules.default_births_rule()`) when it is there; otherwise the first set
ordered by: the default metric first, the default presence first, the default persistence
first, then threshold, persistence, stable_eps, stable_cos, metric, presence
(`featurestore.birth_rules.births_rule_sets`, which the plots use too). The chosen set is
recorded in the graph attribute `births_rule` (with `chosen_by`, the number of sets there were,
and its births and censored_births).

Graph attributes: schema_version (GRAPH_SCHEMA_VERSION, the layout of these exports),
warehouse_schema_version, generator ("featurestore <version>"), basis, stage, run, kind, steps
(the graph's steps), basis_steps, pruning (the distinct lineage_edges.pruning JSON values of those
steps, parsed), upstream (upstream bases with their stage and births rule), births_rule.

GraphML holds only str / int / float / bool values: lists and dicts are written as JSON strings
(sorted keys) and None values are dropped, graph attributes included (`graphml_safe`).

Attribution-graph JSON
----------------------
The layout read by circuit-tracer's frontend and Neuronpedia's graph viewer: top-level
`metadata`, `qParams`, `nodes`, `links`. Required (Neuronpedia's graph-schema.json, plus
circuit-tracer's `transcoder_list`), listed in ATTRIBUTION_GRAPH_REQUIRED:

    top level   metadata, qParams, nodes, links
    metadata    slug, scan, prompt_tokens, prompt, transcoder_list
    node        node_id, feature, layer, ctx_idx, feature_type, jsNodeId, clerp
    link        source, target, weight

How featurestore fills them. The attributions here are not of one prompt: dfa, grad_x_act,
decoder cosines, correlations and dla are averages over a token sample at one checkpoint. So the
"context" axis is used for checkpoints: `prompt_tokens` is ["step <s>", ...] for the graph's steps
in order, and `ctx_idx` of a node or link is the index of its step in that list (the position
axis of a viewer becomes the training axis). `prompt` says so in words.

    metadata  slug: the basis name (with -step<N>), lower-case, [a-z0-9-]; scan: the run;
              transcoder_list: the basis and its upstream bases; node_threshold: 1.0 (keep every
              node: lineage_edges are already pruned to top_k per feature); schema_version: 1
              (circuit-tracer's metadata schema version); generator: "featurestore <version>";
              info: title, description, creator_name, generator {name, version};
              pruning_settings: {"lineage_edges": the pruning JSON values}; featurestore: the
              graph attributes (basis, stage, run, steps, births rule, schema versions).
    nodes     one per (node, step) taking part in a lineage / flows_to / dla link at that step,
              plus the reconstruction-error node of each step. node_id: "<graph node id>@<step>";
              jsNodeId: "<graph node id>-<ctx_idx>"; feature: the feature id, head index, neuron
              index or token id (-1 for the embedding and reconstruction-error nodes); layer: the
              block index as a string (features: the block of their stage, final_norm = number of
              blocks; "E" for the embedding; logits: number of blocks + 1, as circuit-tracer
              does); feature_type: circuit-tracer's vocabulary where it has the kind ("cross layer
              transcoder" for features, "embedding", "logit", "mlp reconstruction error"), else
              "attention head" / "mlp neuron"; node_type: featurestore's type; clerp: the node's
              label; influence: cumulative share of attribution, as circuit-tracer's pruning reads
              it (per step, each link's |weight| as a share of its method's total, summed per
              node; nodes sorted by that mass, largest first; influence = the running sum / total,
              so the strongest node has the smallest value); activation: a feature's
              trajectories.mean_active_activation at that step (null otherwise); plus step,
              basis / feature_id / birth_step / birth_censored / present_at_init / top_tokens /
              top_token_texts / top_context where they apply.
    links     source, target (node_ids), weight, plus step, ctx_idx, edge_type, method, rank.

born_at and patch_effect edges, and checkpoint nodes, are not attributions and stay out of this
file (they are in the other two).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import networkx as nx

from featurestore.birth_rules import BIRTH_RULE_COLUMNS, births_rule_sets, default_births_rule
from featurestore.errors import FeaturestoreError
from featurestore.queries.exports import write_atomic
from featurestore.registry import SHARED, get_basis
from featurestore.results import Result
from featurestore.warehouse import records

GRAPH_SCHEMA_VERSION = 1
# circuit-tracer's frontend Metadata.schema_version.
ATTRIBUTION_SCHEMA_VERSION = 1

NODE_TYPES = ("feature", "attention_head", "mlp_neuron", "embedding", "logit", "checkpoint",
              "reconstruction_error")
EDGE_TYPES = ("lineage", "flows_to", "dla", "born_at", "patch_effect")
COMPONENT_TYPES = ("attention_head", "mlp_neuron", "embedding")
LINEAGE_METHODS = ("dfa", "grad_x_act")
FLOW_METHODS = ("decoder_cosine", "activation_correlation")
DLA_METHOD = "dla"
ATTRIBUTION_EDGE_TYPES = ("lineage", "flows_to", "dla")

# Required fields of the attribution-graph JSON: Neuronpedia's graph-schema.json ("required" of
# the top level, metadata, nodes and links) and circuit-tracer's Metadata.transcoder_list.
ATTRIBUTION_GRAPH_REQUIRED: dict[str, tuple[str, ...]] = {
    "graph": ("metadata", "qParams", "nodes", "links"),
    "metadata": ("slug", "scan", "prompt_tokens", "prompt", "transcoder_list"),
    "node": ("node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"),
    "link": ("source", "target", "weight"),
}

# circuit-tracer's feature_type names for the kinds it has; featurestore's other kinds in words.
ATTRIBUTION_FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "attention_head": "attention head",
    "mlp_neuron": "mlp neuron",
    "embedding": "embedding",
    "logit": "logit",
    "reconstruction_error": "mlp reconstruction error",
}

# Top examples read per feature for its top tokens, and how many token ids are kept.
TOP_EXAMPLES = 10
TOP_TOKENS = 5
NODE_THRESHOLD = 1.0

FORMATS = ("node_link", "graphml", "attribution_graph")


@dataclass
class GraphExport(Result):
    """What export_graphs wrote."""

    basis: str
    out: str
    steps: list[int]  # the graph's steps (lineage / patch edges)
    files: dict[str, dict[str, str]]  # step group ("all" or "step<N>") -> format -> path
    node_counts: dict[str, int]  # node_type -> count
    edge_counts: dict[str, int]  # edge_type -> count
    attribution_nodes: int
    attribution_links: int
    seconds: float
    births_rule: dict | None = None
    pruning: list[dict] = field(default_factory=list)


# -- node ids ----------------------------------------------------------------------------------


def feature_node(basis: str, feature_id: int | str) -> str:
    return f"feature:{basis}:{int(feature_id)}"


def checkpoint_node(step: int) -> str:
    return f"checkpoint:{int(step)}"


def recon_error_node(basis: str, step: int) -> str:
    return f"recon_error:{basis}:{int(step)}"


def logit_node(token_id: int | str) -> str:
    return f"logit:{int(token_id)}"


_HEAD = re.compile(r"^L(\d+)H(\d+)$")
_NEURON = re.compile(r"^L(\d+)N(\d+)$")
_STAGE_LAYER = re.compile(r"^layer_(\d+)_")


def component_node(src_type: str, src_id: str) -> tuple[str, dict]:
    """The node id and attributes of a lineage source component."""
    if src_type == "embedding":
        return "embedding", {"node_type": "embedding", "label": "token + position embeddings"}
    pattern, prefix = (_HEAD, "head") if src_type == "attention_head" else (_NEURON, "neuron")
    match = pattern.match(src_id)
    if src_type not in ("attention_head", "mlp_neuron") or match is None:
        raise FeaturestoreError(
            f"lineage_edges: a {src_type} source {src_id!r} that featurestore cannot name; "
            "re-run feature-lineage for this basis")
    layer, index = int(match.group(1)), int(match.group(2))
    attrs = {"node_type": src_type, "layer": layer,
             ("head" if prefix == "head" else "neuron"): index,
             "label": f"{'attention head' if prefix == 'head' else 'MLP neuron'} {src_id}"}
    return f"{prefix}:{src_id}", attrs


# -- reading the warehouse ---------------------------------------------------------------------


def _basis_info(con: duckdb.DuckDBPyConnection, basis: str) -> dict:
    info = get_basis(con, basis, SHARED, needed_for=(
        "it has no births, patches or lineage to draw; graphs are built for shared bases"))
    steps = {int(s["step"]) for s in info["sources"] or [] if s.get("step") is not None}
    steps |= {int(s) for (s,) in con.execute(
        "SELECT DISTINCT step FROM checkpoint_summary WHERE basis = ?", [basis]).fetchall()}
    n_layers = con.execute("SELECT n_layers FROM runs WHERE run = ?", [info["run"]]).fetchall()
    return {"name": basis, "kind": info["kind"], "run": info["run"], "stage": info["stage"],
            "steps": sorted(steps), "n_layers": n_layers[0][0] if n_layers else None}


def data_steps(con: duckdb.DuckDBPyConnection, basis: str) -> list[int]:
    """Steps with lineage_edges or patches rows (target_step) for the basis."""
    return [int(s) for (s,) in con.execute(
        "SELECT step FROM lineage_edges WHERE basis = ? "
        "UNION SELECT target_step FROM patches WHERE basis = ? ORDER BY 1",
        [basis, basis]).fetchall()]


def _resolve_step(con: duckdb.DuckDBPyConnection, info: dict, step) -> int | None:
    """None for all steps, or the one step asked for (an int, a digit string or LAST)."""
    if step is None or (isinstance(step, str) and step.strip().lower() == "all"):
        return None
    with_data = data_steps(con, info["name"])
    if isinstance(step, str) and step.strip().upper() == "LAST":
        if not info["steps"]:
            raise FeaturestoreError(f"--step LAST: basis {info['name']} has no checkpoints")
        return info["steps"][-1]
    try:
        if isinstance(step, bool):
            raise ValueError
        value = int(step) if not isinstance(step, str) else int(step.strip())
    except (TypeError, ValueError):
        raise FeaturestoreError(
            f"--step {step!r}: give a checkpoint step, LAST or all; steps of basis "
            f"{info['name']} with lineage or patches: {_listed(with_data)}") from None
    if value not in with_data and value not in info["steps"]:
        raise FeaturestoreError(
            f"--step {value}: basis {info['name']} has no lineage or patches at step {value} and "
            f"was not fitted on it; steps with lineage or patches: {_listed(with_data)}; "
            f"checkpoints of the basis: {_listed(info['steps'])}")
    return value


def _listed(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if steps else "none"


def _births_rule(con: duckdb.DuckDBPyConnection, basis: str) -> dict | None:
    """The births parameter set the graph uses (see the module docstring), or None."""
    sets = births_rule_sets(con, basis, "births")
    if not sets:
        return None
    chosen = sets[0]
    chosen_by = ("default parameters" if chosen["default"] else
                 "closest to the default ({metric}, presence {presence}, persistence "
                 "{persistence})".format(**default_births_rule()))
    (births, censored), = con.execute(
        f"SELECT count(birth_step), count_if(birth_censored) FROM births "
        f"WHERE basis = ? AND {' AND '.join(f'{c} = ?' for c in BIRTH_RULE_COLUMNS)}",
        [basis, *(chosen[c] for c in BIRTH_RULE_COLUMNS)]).fetchall()
    return {"basis": basis, "metric": chosen["metric"], "presence": chosen["presence"],
            "threshold": float(chosen["threshold"]), "persistence": int(chosen["persistence"]),
            "stable_eps": _float(chosen["stable_eps"]), "stable_cos": _float(chosen["stable_cos"]),
            "n_features": int(chosen["n_rows"]), "births": int(births),
            "censored_births": int(censored), "chosen_by": chosen_by,
            "parameter_sets": len(sets)}


def _float(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _births(con: duckdb.DuckDBPyConnection, rule: dict | None) -> dict[int, dict]:
    if rule is None:
        return {}
    rows = records(con, """
        SELECT feature_id, birth_step, birth_censored, stabilization_step, death_step,
               death_censored, present_at_init, feature_threshold, drift
        FROM births
        WHERE basis = ? AND metric = ? AND presence = ? AND threshold = ? AND persistence = ?
          AND stable_eps IS NOT DISTINCT FROM ? AND stable_cos IS NOT DISTINCT FROM ?
        ORDER BY feature_id""", [rule["basis"], rule["metric"], rule["presence"],
                                 rule["threshold"], rule["persistence"], rule["stable_eps"],
                                 rule["stable_cos"]])
    return {int(r.pop("feature_id")): r for r in rows}


def _top_tokens(con: duckdb.DuckDBPyConnection, basis: str, step: int | None,
                features: list[int] | None = None) -> dict[int, dict]:
    """feature -> top_tokens (activating token ids), top_token_texts (their text, or None when
    any lacks it), top_context_tokens and top_context (the rank-1 context for display)."""
    if step is None:
        return {}
    where = "" if features is None else "AND list_contains(?::INTEGER[], feature_id)"
    params = [basis, step, TOP_EXAMPLES] + ([] if features is None else [features])
    rows = con.execute(f"""
        SELECT feature_id, context_token_ids,
               context_token_ids[position - context_start + 1] AS token, token_text,
               example_context(context_text, context_token_ids, position, context_start)
        FROM feature_examples
        WHERE basis = ? AND step = ? AND rank <= ? {where}
        ORDER BY feature_id, rank""", params).fetchall()
    tokens: dict[int, Counter] = {}
    context: dict[int, Counter] = {}
    texts: dict[int, str] = {}  # token id -> text, where the run has token strings
    first_context: dict[int, str] = {}  # the rank-1 context of each feature
    for feature_id, window, token, token_text, shown in rows:
        if token is not None:
            tokens.setdefault(int(feature_id), Counter())[int(token)] += 1
            if token_text is not None:
                texts[int(token)] = token_text
        context.setdefault(int(feature_id), Counter()).update(int(t) for t in window or [])
        first_context.setdefault(int(feature_id), shown)
    result = {}
    for feature_id in sorted(set(tokens) | set(context)):
        top = _most_common(tokens.get(feature_id, Counter()))
        result[feature_id] = {
            "top_tokens": top,
            "top_token_texts": [texts[t] for t in top] if all(t in texts for t in top) else None,
            "top_context_tokens": _most_common(context.get(feature_id, Counter())),
            "top_context": first_context.get(feature_id),
        }
    return result


def _most_common(counts: Counter) -> list[int]:
    """The TOP_TOKENS most frequent ids, ties by id."""
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TOKENS]]


def _trajectory(con: duckdb.DuckDBPyConnection, basis: str, step: int | None) -> dict[int, dict]:
    if step is None:
        return {}
    rows = records(con, """
        SELECT feature_id, activation_rate, mean_active_activation, energy
        FROM trajectories WHERE basis = ? AND step = ? ORDER BY feature_id""", [basis, step])
    return {int(r.pop("feature_id")): r for r in rows}


def _stage_layer(stage: str | None, n_layers: int | None) -> int | None:
    if stage is None:
        return None
    match = _STAGE_LAYER.match(stage)
    if match:
        return int(match.group(1))
    if stage == "final_norm":
        return n_layers
    return None  # embed: before block 0


def _feature_attrs(basis: str, stage: str, feature_id: int, births: dict, tokens: dict,
                   trajectory: dict, examples_step: int | None) -> dict:
    born = births.get(feature_id, {})
    top = tokens.get(feature_id, {})
    attrs = {"node_type": "feature", "basis": basis, "stage": stage, "feature_id": feature_id,
             "birth_step": born.get("birth_step"),
             "birth_censored": born.get("birth_censored"),
             "stabilization_step": born.get("stabilization_step"),
             "death_step": born.get("death_step"),
             "death_censored": born.get("death_censored"),
             "present_at_init": born.get("present_at_init"),
             "feature_threshold": _float(born.get("feature_threshold")),
             "top_tokens": top.get("top_tokens", []),
             "top_context_tokens": top.get("top_context_tokens", []),
             "top_token_texts": top.get("top_token_texts"),
             "top_context": top.get("top_context"),
             "examples_step": examples_step}
    for key, value in trajectory.get(feature_id, {}).items():
        attrs[key] = _float(value)
    attrs["label"] = f"{basis} #{feature_id}" + _tokens_label(attrs)
    return attrs


def _tokens_label(attrs: dict) -> str:
    """': tokens "+", " 7"' from the decoded top tokens, or ': tokens 335, 12' from their ids
    when the run has no token strings; '' when the feature has no examples."""
    if attrs["top_token_texts"]:
        return ": tokens " + ", ".join(json.dumps(t, ensure_ascii=False)
                                       for t in attrs["top_token_texts"][:3])
    shown = ", ".join(map(str, attrs["top_tokens"][:3]))
    return f": tokens {shown}" if shown else ""


# -- the graph ---------------------------------------------------------------------------------


def build_graph(con: duckdb.DuckDBPyConnection, basis: str,
                step: int | None = None) -> nx.MultiDiGraph:
    """The graph of a shared basis from the warehouse behind `con` (a featurestore connection):
    at every step with lineage or patches (step None) or at one step. See the module docstring
    for the nodes, edges and attributes."""
    from featurestore.schema import package_version

    info = _basis_info(con, basis)
    chosen = _resolve_step(con, info, step)
    steps = data_steps(con, basis) if chosen is None else [chosen]
    stage, run = info["stage"], info["run"]
    n_layers = info["n_layers"]
    (warehouse_version,) = con.execute("SELECT max(version) FROM schema_version").fetchone()

    G = nx.MultiDiGraph()
    rule = _births_rule(con, basis)
    examples_step = steps[-1] if steps else (info["steps"][-1] if info["steps"] else None)

    # Checkpoints of the basis.
    checkpoint_rows = {int(r["step"]): r for r in records(con, """
        SELECT step, train_loss, heldout_loss, train_accuracy, heldout_accuracy
        FROM checkpoints WHERE run = ?""", [run])}
    for s in info["steps"]:
        row = checkpoint_rows.get(s, {})
        G.add_node(checkpoint_node(s), node_type="checkpoint", run=run, step=s,
                   label=f"{run} step {s}",
                   **{k: _float(row.get(k)) for k in (
                       "train_loss", "heldout_loss", "train_accuracy", "heldout_accuracy")})

    # Every feature of the basis.
    feature_ids = [int(f) for (f,) in con.execute("""
        SELECT feature_id FROM features WHERE basis = ?
        UNION SELECT feature_id FROM trajectories WHERE basis = ? ORDER BY 1""",
        [basis, basis]).fetchall()]
    births = _births(con, rule)
    feature_ids = sorted(set(feature_ids) | set(births))
    tokens = _top_tokens(con, basis, examples_step)
    trajectory = _trajectory(con, basis, examples_step)
    for f in feature_ids:
        G.add_node(feature_node(basis, f), **_feature_attrs(
            basis, stage, f, births, tokens, trajectory, examples_step))

    # Reconstruction error per step.
    recon_steps = info["steps"] if chosen is None else [chosen]
    _add_recon_nodes(con, G, basis, recon_steps)

    # born_at.
    for f in feature_ids:
        birth = births.get(f, {}).get("birth_step")
        if birth is None:
            continue
        censored = births[f].get("birth_censored")
        target = checkpoint_node(birth)
        if target not in G:
            G.add_node(target, node_type="checkpoint", run=run, step=int(birth),
                       label=f"{run} step {birth}")
        source = feature_node(basis, f)
        G.add_edge(source, target, key=f"born_at:{source}", edge_type="born_at", weight=1.0,
                   method=f"births:{rule['metric']}", step=int(birth),
                   censored=None if censored is None else bool(censored))

    # lineage, flows_to, dla.
    pruning_values, upstream_features = _add_lineage_edges(con, G, basis, steps)

    # patch_effect.
    _add_patch_edges(con, G, basis, run, steps)

    # Attributes of upstream features that flows_to edges name.
    upstream_info = []
    for up in sorted(upstream_features):
        up_stage = get_basis(con, up)["stage"]
        up_rule = _births_rule(con, up)
        ids = sorted(upstream_features[up])
        up_births = _births(con, up_rule)
        up_tokens = _top_tokens(con, up, examples_step, ids)
        up_trajectory = _trajectory(con, up, examples_step)
        for f in ids:
            G.nodes[feature_node(up, f)].update(_feature_attrs(
                up, up_stage, f, up_births, up_tokens, up_trajectory, examples_step))
        upstream_info.append({"basis": up, "stage": up_stage, "births_rule": up_rule})

    G.graph.update({
        "schema_version": GRAPH_SCHEMA_VERSION,
        "warehouse_schema_version": int(warehouse_version),
        "generator": f"featurestore {package_version()}",
        "basis": basis, "kind": info["kind"], "stage": stage, "run": run,
        "layer": _stage_layer(stage, n_layers), "n_layers": n_layers,
        "steps": steps, "step": chosen, "basis_steps": info["steps"],
        "pruning": [json.loads(p) for p in pruning_values],
        "upstream": upstream_info,
        "births_rule": rule,
    })
    _drop_none(G)
    return G


def _add_recon_nodes(con: duckdb.DuckDBPyConnection, G: nx.MultiDiGraph, basis: str,
                     steps: list[int]) -> None:
    summary = {int(r.pop("step")): r for r in records(con, """
        SELECT step, explained_variance, relative_reconstruction_error, l0, dead_fraction
        FROM checkpoint_summary WHERE basis = ? ORDER BY step""", [basis])}
    patch_errors: dict[int, dict[str, dict]] = {}
    for r in records(con, """
            SELECT target_step, split, avg(recon_rel_error) AS recon_rel_error,
                   avg(error_norm_share) AS error_norm_share,
                   avg(spliced_loss_delta) AS spliced_loss_delta
            FROM patches WHERE basis = ? GROUP BY ALL ORDER BY ALL""", [basis]):
        patch_errors.setdefault(int(r["target_step"]), {})[r["split"]] = r
    for s in steps:
        if s not in summary and s not in patch_errors:
            continue
        row = summary.get(s, {})
        attrs = {"node_type": "reconstruction_error", "basis": basis, "step": s}
        attrs.update({k: _float(v) for k, v in row.items()})
        splits = patch_errors.get(s)
        if splits:
            for name in ("recon_rel_error", "error_norm_share", "spliced_loss_delta"):
                attrs[f"patch_{name}"] = {split: _float(v[name]) for split, v in splits.items()}
            values = [v for v in attrs["patch_recon_rel_error"].values() if v is not None]
            attrs["patch_recon_rel_error_mean"] = sum(values) / len(values) if values else None
        ev = attrs.get("explained_variance")
        attrs["label"] = (f"reconstruction error of {basis} at step {s}"
                          + (f" (explained variance {ev:.3f})" if ev is not None else ""))
        G.add_node(recon_error_node(basis, s), **attrs)


def _add_lineage_edges(con: duckdb.DuckDBPyConnection, G: nx.MultiDiGraph, basis: str,
                       steps: list[int]) -> tuple[list[str], dict[str, set[int]]]:
    """lineage, flows_to and dla edges; the distinct pruning values and upstream features."""
    if not steps:
        return [], {}
    rows = records(con, """
        SELECT step, src_type, src_id, dst_type, dst_id, weight, method, rank, pruning
        FROM lineage_edges
        WHERE basis = ? AND list_contains(?::BIGINT[], step)
        ORDER BY step, method, src_type, dst_type, dst_id, rank, src_id""", [basis, steps])
    pruning_values: list[str] = []
    parsed: dict[str, dict] = {}
    upstream_features: dict[str, set[int]] = {}
    for r in rows:
        pruning = r["pruning"]
        if pruning not in parsed:
            parsed[pruning] = json.loads(pruning) if pruning else {}
            pruning_values.append(pruning)
        step, method = int(r["step"]), r["method"]
        common = {"weight": float(r["weight"]), "method": method, "step": step,
                  "rank": int(r["rank"])}
        if r["src_type"] in COMPONENT_TYPES and r["dst_type"] == "feature":
            source, attrs = component_node(r["src_type"], r["src_id"])
            if source not in G:
                G.add_node(source, **attrs)
            target = feature_node(basis, r["dst_id"])
            edge_type, extra = "lineage", {"src_type": r["src_type"]}
        elif r["src_type"] == "feature" and method in FLOW_METHODS:
            upstream = parsed[pruning].get("upstream")
            if not upstream:
                raise FeaturestoreError(
                    f"lineage_edges of {basis} at step {step}: {method} rows with no upstream "
                    "basis in their pruning JSON; re-run feature-lineage with --upstream")
            source = feature_node(upstream, r["src_id"])
            if source not in G:
                G.add_node(source, node_type="feature", basis=upstream,
                           feature_id=int(r["src_id"]))
            upstream_features.setdefault(upstream, set()).add(int(r["src_id"]))
            target = feature_node(basis, r["dst_id"])
            edge_type, extra = "flows_to", {"upstream": upstream}
        elif method == DLA_METHOD and r["dst_type"] == "token":
            source = feature_node(basis, r["src_id"])
            target = logit_node(r["dst_id"])
            if target not in G:
                G.add_node(target, node_type="logit", token_id=int(r["dst_id"]),
                           label=f"output token {int(r['dst_id'])}")
            edge_type, extra = "dla", {}
        else:
            continue  # a kind of edge this version does not draw
        if target not in G:  # a feature with lineage but no features/trajectories row
            G.add_node(target, node_type="feature", basis=basis,
                       feature_id=int(target.rsplit(":", 1)[1]))
        G.add_edge(source, target, key=f"{method}@{step}:{source}->{target}",
                   edge_type=edge_type, **common, **extra)
    return pruning_values, upstream_features


def _add_patch_edges(con: duckdb.DuckDBPyConnection, G: nx.MultiDiGraph, basis: str, run: str,
                     steps: list[int]) -> None:
    if not steps:
        return
    rows = records(con, """
        SELECT source_step, target_step, mode, scale, feature_ids[1] AS feature_id, split,
               metric, clean, patched, delta, recon_rel_error, error_norm_share,
               spliced_loss_delta, n_tokens
        FROM patches
        WHERE basis = ? AND len(feature_ids) = 1 AND list_contains(?::BIGINT[], target_step)
        ORDER BY target_step, feature_id, mode, source_step, split, metric""", [basis, steps])
    for r in rows:
        source = feature_node(basis, r["feature_id"])
        target_step = int(r["target_step"])
        target = checkpoint_node(target_step)
        if source not in G:
            G.add_node(source, node_type="feature", basis=basis, feature_id=int(r["feature_id"]))
        if target not in G:
            G.add_node(target, node_type="checkpoint", run=run, step=target_step,
                       label=f"{run} step {target_step}")
        key = (f"patch:{r['mode']}:{r['source_step']}:{r['split']}:{r['metric']}"
               f"@{target_step}:{source}->{target}")
        G.add_edge(source, target, key=key, edge_type="patch_effect", weight=_float(r["delta"]),
                   method=r["mode"], step=target_step, metric=r["metric"], split=r["split"],
                   mode=r["mode"], source_step=int(r["source_step"]), scale=_float(r["scale"]),
                   clean=_float(r["clean"]), patched=_float(r["patched"]),
                   recon_rel_error=_float(r["recon_rel_error"]),
                   error_norm_share=_float(r["error_norm_share"]),
                   spliced_loss_delta=_float(r["spliced_loss_delta"]),
                   n_tokens=None if r["n_tokens"] is None else int(r["n_tokens"]))


def _drop_none(G: nx.MultiDiGraph) -> None:
    for _, data in G.nodes(data=True):
        for k in [k for k, v in data.items() if v is None]:
            del data[k]
    for _, _, data in G.edges(data=True):
        for k in [k for k, v in data.items() if v is None]:
            del data[k]


def count_types(G: nx.MultiDiGraph) -> tuple[dict[str, int], dict[str, int]]:
    """Nodes by node_type and edges by edge_type."""
    nodes = Counter(d.get("node_type", "unknown") for _, d in G.nodes(data=True))
    edges = Counter(d.get("edge_type", "unknown") for _, _, d in G.edges(data=True))
    return dict(sorted(nodes.items())), dict(sorted(edges.items()))


# -- formats -----------------------------------------------------------------------------------


def _jsonable(value):
    """A value json.dumps takes without NaN: tuples as lists, non-finite floats as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    return value


def node_link(G: nx.MultiDiGraph) -> dict:
    """node-link data (edges under "links") with the graph attributes also at the top level."""
    data = nx.node_link_data(G, edges="links")
    top = {k: G.graph.get(k) for k in ("schema_version", "generator", "basis", "stage", "run",
                                        "steps", "pruning", "births_rule")}
    return _jsonable({**top, **data})


def _scalar(value):
    """A GraphML value: str / int / float / bool kept, lists and dicts as JSON, None dropped."""
    if value is None:
        return None
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return json.dumps(_jsonable(value), sort_keys=True)


def graphml_safe(G: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """A copy of G that GraphML (and Gephi / Cytoscape) can hold: only str / int / float / bool
    attributes; lists and dicts as JSON strings; None dropped."""
    H = nx.MultiDiGraph()

    def clean(data: dict) -> dict:
        out = {}
        for k, v in data.items():
            v = _scalar(v)
            if v is not None:
                out[k] = v
        return out

    H.graph.update(clean(G.graph))
    for n, data in G.nodes(data=True):
        H.add_node(n, **clean(data))
    for u, v, k, data in G.edges(keys=True, data=True):
        H.add_edge(u, v, key=k, **clean(data))
    return H


def attribution_graph(G: nx.MultiDiGraph) -> dict:
    """The circuit-tracer / Neuronpedia attribution-graph dict of G (see the module docstring)."""
    meta = G.graph
    steps = list(meta.get("steps") or [])
    ctx = {s: i for i, s in enumerate(steps)}
    n_layers = meta.get("n_layers")
    basis = meta["basis"]

    # The attribution links of each step, and each node's share of its step's attribution.
    links_by_step: dict[int, list[tuple]] = {s: [] for s in steps}
    for u, v, data in G.edges(data=True):
        if data.get("edge_type") in ATTRIBUTION_EDGE_TYPES and data.get("step") in ctx:
            links_by_step[data["step"]].append((u, v, data))

    nodes, links = [], []
    for s in steps:
        totals: Counter = Counter()
        for _, _, data in links_by_step[s]:
            totals[data["method"]] += abs(data["weight"])
        mass: Counter = Counter()
        order: list[str] = []
        for u, v, data in links_by_step[s]:
            share = abs(data["weight"]) / totals[data["method"]] if totals[data["method"]] else 0
            for n in (u, v):
                if n not in mass:
                    order.append(n)
                mass[n] += share
        recon = recon_error_node(basis, s)
        if recon in G and recon not in mass:
            order.append(recon)
        ranked = sorted(order, key=lambda n: -mass.get(n, 0.0))  # stable: ties keep first-seen
        total = sum(mass.values())
        running, influence = 0.0, {}
        for n in ranked:
            running += mass.get(n, 0.0)
            influence[n] = min(1.0, running / total) if total else None
        for n in order:
            nodes.append(_attribution_node(G, n, s, ctx[s], n_layers, influence[n]))
        for u, v, data in links_by_step[s]:
            link = {"source": f"{u}@{s}", "target": f"{v}@{s}", "weight": data["weight"],
                    "step": s, "ctx_idx": ctx[s], "edge_type": data["edge_type"],
                    "method": data["method"]}
            if "rank" in data:
                link["rank"] = data["rank"]
            links.append(link)

    slug = re.sub(r"[^a-z0-9-]+", "-", basis.lower()).strip("-") or "graph"
    if meta.get("step") is not None:
        slug += f"-step{meta['step']}"
    transcoders = [basis] + [u["basis"] for u in meta.get("upstream") or []]
    generator = meta["generator"]
    name, _, version = generator.partition(" ")
    described = (f"{basis}, a feature basis of {meta['run']} at {meta['stage']}: heads, neurons "
                 "and embeddings that write each feature (dfa, grad_x_act), upstream features "
                 "(decoder_cosine, activation_correlation) and the output tokens it promotes "
                 "(dla), averaged over a token sample at each checkpoint; one context position "
                 "per checkpoint")
    metadata = {
        "slug": slug,
        "scan": meta["run"],
        "transcoder_list": transcoders,
        "prompt_tokens": [f"step {s}" for s in steps],
        "prompt": described + (": " + ", ".join(f"step {s}" for s in steps) if steps else ""),
        "node_threshold": NODE_THRESHOLD,
        "schema_version": ATTRIBUTION_SCHEMA_VERSION,
        "generator": generator,
        "info": {"title": f"{basis} feature lineage" + (
                     f" at step {meta['step']}" if meta.get("step") is not None else ""),
                 "description": described,
                 "creator_name": "featurestore",
                 "generator": {"name": name, "version": version}},
        "pruning_settings": {"node_threshold": NODE_THRESHOLD,
                             "lineage_edges": meta.get("pruning") or []},
        "featurestore": {k: meta.get(k) for k in (
            "schema_version", "warehouse_schema_version", "generator", "basis", "kind", "stage",
            "run", "steps", "step", "basis_steps", "births_rule", "upstream")},
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
               "sg_pos": ""}
    return _jsonable({"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links})


def _attribution_node(G: nx.MultiDiGraph, n: str, step: int, ctx_idx: int, n_layers: int | None,
                      influence: float | None) -> dict:
    data = G.nodes[n]
    kind = data.get("node_type")
    feature, layer = -1, None
    extra: dict = {}
    if kind == "feature":
        feature = data.get("feature_id", -1)
        layer = _stage_layer(data.get("stage"), n_layers)
        for k in ("basis", "feature_id", "birth_step", "birth_censored", "present_at_init",
                  "top_tokens", "top_token_texts", "top_context"):
            if k in data:
                extra[k] = data[k]
        activation = None
        if data.get("examples_step") == step:
            activation = data.get("mean_active_activation")
    elif kind in ("attention_head", "mlp_neuron"):
        feature = data["head"] if kind == "attention_head" else data["neuron"]
        layer = data["layer"]
        activation = None
    elif kind == "embedding":
        layer, activation = "E", None
    elif kind == "logit":
        feature = data["token_id"]
        layer = None if n_layers is None else n_layers + 1
        activation = None
        extra["is_target_logit"] = False
    else:  # reconstruction_error
        layer = G.graph.get("layer")
        activation = None
        for k in ("explained_variance", "relative_reconstruction_error",
                  "patch_recon_rel_error_mean"):
            if k in data:
                extra[k] = data[k]
    return {"node_id": f"{n}@{step}", "feature": feature,
            "layer": "" if layer is None else str(layer), "ctx_idx": ctx_idx,
            "feature_type": ATTRIBUTION_FEATURE_TYPES.get(kind, kind or ""),
            "jsNodeId": f"{n}-{ctx_idx}", "clerp": data.get("label", n),
            "influence": influence, "activation": activation, "node_type": kind, "step": step,
            **extra}


# -- writing -----------------------------------------------------------------------------------


def _write_json(data: dict, path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.write("\n")

    write_atomic(path, write)


def write_node_link(G: nx.MultiDiGraph, path: str | Path) -> Path:
    path = Path(path)
    _write_json(node_link(G), path)
    return path


def write_graphml(G: nx.MultiDiGraph, path: str | Path) -> Path:
    path = Path(path)
    safe = graphml_safe(G)
    write_atomic(path, lambda tmp: nx.write_graphml(safe, tmp, infer_numeric_types=True))
    return path


def write_attribution_graph(G: nx.MultiDiGraph, path: str | Path) -> Path:
    path = Path(path)
    _write_json(attribution_graph(G), path)
    return path


def read_graphml(path: str | Path) -> nx.MultiDiGraph:
    """A GraphML file written here, as a MultiDiGraph with its string edge keys."""
    return nx.read_graphml(path, edge_key_type=str, force_multigraph=True)


def export_graphs(basis: str, step: int | str | None = None, out: str | Path | None = None,
                  warehouse: str | None = None) -> GraphExport:
    """Build the graph of `basis` (every step with lineage or patches, or one step) and write it
    as node-link JSON, GraphML and attribution-graph JSON into `out` (default
    <warehouse>/exports/<basis>/graphs). Nothing is written when the basis or step is bad."""
    from featurestore.warehouse import Warehouse

    started = time.perf_counter()
    wh = Warehouse(warehouse)
    with wh.connect() as con:
        G = build_graph(con, basis, step)
    folder = Path(out) if out is not None else wh.root / "exports" / basis / "graphs"
    chosen = G.graph.get("step")
    suffix = "" if chosen is None else f"_step{chosen}"
    group = "all" if chosen is None else f"step{chosen}"
    paths = {
        "node_link": folder / f"{basis}_graph{suffix}.json",
        "graphml": folder / f"{basis}_graph{suffix}.graphml",
        "attribution_graph": folder / f"{basis}_attribution_graph{suffix}.json",
    }
    write_node_link(G, paths["node_link"])
    write_graphml(G, paths["graphml"])
    attribution = attribution_graph(G)
    _write_json(attribution, paths["attribution_graph"])
    nodes, edges = count_types(G)
    return GraphExport(basis=basis, out=str(folder), steps=list(G.graph["steps"]),
                       files={group: {k: str(v) for k, v in paths.items()}},
                       node_counts=nodes, edge_counts=edges,
                       attribution_nodes=len(attribution["nodes"]),
                       attribution_links=len(attribution["links"]),
                       seconds=time.perf_counter() - started,
                       births_rule=G.graph.get("births_rule"),
                       pruning=list(G.graph.get("pruning") or []))
