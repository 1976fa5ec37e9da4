"""Graph exports: the feature graph of a shared basis written for other tools to read.

`export_graphs(basis, step, out)` builds the graph (`featurestore.queries.graphs.build_graph`)
and writes it in three formats, each file atomically (a temporary file in the same folder, then
`os.replace`), by default into `<warehouse root>/exports/<basis>/graphs`:

    <basis>_graph.json               node-link JSON, for networkx and any JSON reader
    <basis>_graph.graphml            GraphML for Gephi / Cytoscape: scalar attributes only
    <basis>_attribution_graph.json   the circuit-tracer / Neuronpedia attribution-graph layout,
                                     with checkpoints on the context axis

With a step the names end in `_step<N>`. docs/graph-format.md describes each file.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from featurestore.queries.exports import write_atomic
from featurestore.queries.graphs import build_graph, count_types, recon_error_node, stage_layer
from featurestore.results import Result
from featurestore.warehouse import Warehouse

# circuit-tracer's frontend Metadata.schema_version.
ATTRIBUTION_SCHEMA_VERSION = 1
# The edges that are attributions, and so go into the attribution-graph JSON.
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

# circuit-tracer's node_threshold: keep every node, since lineage_edges are already pruned to
# top_k per feature.
NODE_THRESHOLD = 1.0


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

    def summary(self) -> str:
        return "\n".join([
            f"graph of {self.basis!r} written to {self.out} in {self.seconds:.1f}s",
            "nodes: " + ", ".join(f"{k} {v}" for k, v in self.node_counts.items()),
            "edges: " + ", ".join(f"{k} {v}" for k, v in self.edge_counts.items())])


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
    """The circuit-tracer / Neuronpedia attribution-graph dict of G (see "Attribution-graph JSON"
    in docs/graph-format.md)."""
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
        layer = stage_layer(data.get("stage"), n_layers)
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


def export_graphs(basis: str, step: int | str | None = "all", out: str | Path | None = None,
                  warehouse: str | None = None) -> GraphExport:
    """Build the graph of `basis` (every step with lineage or patches, or one step) and write it
    as node-link JSON, GraphML and attribution-graph JSON into `out` (default
    <warehouse>/exports/<basis>/graphs). Nothing is written when the basis or step is bad."""
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
