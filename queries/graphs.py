"""The feature graph of a shared basis, built from the warehouse as a networkx graph.

`build_graph(con, basis, step)` reads the warehouse with SQL and returns a `networkx.MultiDiGraph`
(several methods can join the same pair of nodes): the basis's features, the heads, neurons and
embedding that write them (lineage), the upstream features they read from (flows_to), the output
tokens they promote (dla), their births (born_at) and patch effects (patch_effect), with a node
per checkpoint and per reconstruction error. `featurestore.queries.graph_files` writes it out.
docs/graph-format.md describes every node, edge and attribute.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import duckdb
import networkx as nx

from featurestore.birth_rules import BIRTH_RULE_COLUMNS, births_rule_sets, default_births_rule
from featurestore.errors import FeaturestoreError
from featurestore.registry import SHARED, get_basis
from featurestore.schema import package_version
from featurestore.warehouse import records

# The layout of the graph exports, recorded as the graph attribute schema_version.
GRAPH_SCHEMA_VERSION = 1

NODE_TYPES = ("feature", "attention_head", "mlp_neuron", "embedding", "logit", "checkpoint",
              "reconstruction_error")
EDGE_TYPES = ("lineage", "flows_to", "dla", "born_at", "patch_effect")
COMPONENT_TYPES = ("attention_head", "mlp_neuron", "embedding")
FLOW_METHODS = ("decoder_cosine", "activation_correlation")
DLA_METHOD = "dla"

# Top examples read per feature for its top tokens, and how many token ids are kept.
TOP_EXAMPLES = 10
TOP_TOKENS = 5


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
    """The births parameter set the graph uses (see "Births rule" in docs/graph-format.md), or
    None."""
    sets = births_rule_sets(con, basis, "births")
    if not sets:
        return None
    chosen = sets[0]  # the set shown_births_rule gives the plots, cards and web app
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


def stage_layer(stage: str | None, n_layers: int | None) -> int | None:
    """The block index of a stage: b for layer_<b>_..., the number of blocks for final_norm."""
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
    at every step with lineage or patches (step None) or at one step. docs/graph-format.md
    describes the nodes, edges and attributes."""
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
        "layer": stage_layer(stage, n_layers), "n_layers": n_layers,
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
