"""Graph exports of the analysed tiny run: node-link JSON, GraphML and the attribution-graph JSON
load back, carry the fields their readers need, and say what the warehouse says.

The warehouse is the session's `analysed_warehouse` (tiny-l2 with patches and lineage at the last
checkpoint, tiny-fn with lineage from upstream tiny-l2 there), copied before anything is written.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import networkx as nx
import pytest

from featurestore.birth_rules import default_births_rule
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.ingest.birth_analysis import analyze_births
from featurestore.queries.graph_files import ATTRIBUTION_GRAPH_REQUIRED, export_graphs, read_graphml
from featurestore.queries.graphs import EDGE_TYPES, NODE_TYPES, build_graph
from featurestore.warehouse import Warehouse, connect

BASES = ("tiny-l2", "tiny-fn")
COMPONENTS = "('attention_head', 'mlp_neuron', 'embedding')"

# A planted shared basis with censored births, for the graph, plot and report tests: six
# checkpoints, so the default persistence K = 4 leaves the last K-1 = 3 to censored births.
# activation_rate per feature, in step order. The same births under either presence: every
# feature that fires fires at 0.3, far above 0.01 and above 0.2 x its peak.
PLANTED = "planted"
PLANTED_STEPS = [0, 10, 30, 100, 300, 1000]
PLANTED_FEATURES = {
    0: [0, .3, .3, .3, .3, .3],  # born at 10, present at more than K = 4 checkpoints: confirmed
    1: [0, 0, .3, .3, .3, .3],  # born at 30: exactly K checkpoints to the end, confirmed
    2: [0, 0, 0, .3, .3, .3],  # born at 100, three checkpoints left: censored
    3: [0, 0, 0, 0, 0, .3],  # present at the last checkpoint only: born there, censored
    4: [.3, .3, .3, 0, 0, 0],  # present at init; absent at the last three: censored death at 100
    5: [0, 0, 0, 0, 0, 0],  # never present
    6: [.3, .3, .3, .3, .3, .3],  # present at init throughout
}
PLANTED_BIRTHS = {0: (10, False), 1: (30, False), 2: (100, True), 3: (1000, True)}


def write_censored_basis(root: Path) -> None:
    """Add basis PLANTED (a shared basis of run planted-run at layer_2_post_mlp) to the warehouse
    at `root` with the trajectories of PLANTED_FEATURES, and analyse its births twice: under
    feature-birth-analyze's defaults (persistence 4: features 2 and 3 are censored births) and
    with persistence 1 (no censoring possible), so two rules are stored."""
    from datetime import datetime, timezone

    run, stage = "planted-run", "layer_2_post_mlp"
    rows = []
    for f, values in PLANTED_FEATURES.items():
        for j, (step, value) in enumerate(zip(PLANTED_STEPS, values)):
            live = value > 0 and values[-1] > 0
            rows.append({
                "basis": PLANTED, "feature_id": f, "step": step, "n_tokens": 1000,
                "activation_rate": value, "mean_activation": value / 2,
                "mean_active_activation": None, "max_activation": value, "energy": value / 10,
                "split_activation_rates": {},
                "direction_cosine_previous": (0.95 if j and value > 0 and values[j - 1] > 0
                                              else None),
                "direction_cosine_final": ((1.0 if j == len(values) - 1 else 0.95) if live
                                           else None),
                "decoder_norm": None})
    with Warehouse(root).writer("test: planted censored births") as writer:
        writer.put("bases", [{
            "name": PLANTED, "kind": "pooled", "arch": "batchtopk",
            "n_sources": len(PLANTED_STEPS), "d_model": 8, "d_hidden": len(PLANTED_FEATURES),
            "k": 2, "sources": [{"label": f"step_{s}", "activation_set": f"{run}@{s}:{stage}",
                                 "run": run, "step": s, "stage": stage, "norm_scale": 1.0}
                                for s in PLANTED_STEPS],
            "config": "{}", "trainer_config": "{}", "path": f"bases/{PLANTED}", "steps": 10,
            "tokens": 1000, "run": run, "stage": stage,
            "created_at": datetime(2026, 1, 2, tzinfo=timezone.utc)}])
        writer.put("trajectories", rows)
    analyze_births(PLANTED, permutations=3, warehouse=root)
    analyze_births(PLANTED, persistence=1, permutations=3, warehouse=root)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(("-shm", "-wal"))}


@pytest.fixture(scope="module")
def root(analysed_warehouse, tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("graphs") / "warehouse"
    shutil.copytree(analysed_warehouse, copy)
    return copy


@pytest.fixture(scope="module")
def last_step(root) -> int:
    con = connect(root)
    try:
        (step,) = con.execute(
            "SELECT max(step) FROM lineage_edges WHERE basis = 'tiny-l2'").fetchone()
    finally:
        con.close()
    return int(step)


@pytest.fixture(scope="module")
def exports(root) -> dict:
    """Both bases over all steps, into the default folder."""
    return {basis: export_graphs(basis, warehouse=str(root)) for basis in BASES}


@pytest.fixture(scope="module")
def graphs(root) -> dict[str, nx.MultiDiGraph]:
    con = connect(root)
    try:
        return {basis: build_graph(con, basis) for basis in BASES}
    finally:
        con.close()


@pytest.fixture
def con(root):
    con = connect(root)
    yield con
    con.close()


def edges_of(G: nx.MultiDiGraph, edge_type: str) -> list[tuple]:
    return [(u, v, k, d) for u, v, k, d in G.edges(keys=True, data=True)
            if d["edge_type"] == edge_type]


# -- files load back ----------------------------------------------------------------------------


@pytest.mark.parametrize("basis", BASES)
def test_files_land_in_the_default_folder_with_counts(root, exports, graphs, basis):
    result = exports[basis]
    folder = root / "exports" / basis / "graphs"
    assert result.out == str(folder)
    assert result.files == {"all": {
        "node_link": str(folder / f"{basis}_graph.json"),
        "graphml": str(folder / f"{basis}_graph.graphml"),
        "attribution_graph": str(folder / f"{basis}_attribution_graph.json")}}
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        Path(p).name for p in result.files["all"].values())  # no temporary files left
    G = graphs[basis]
    assert sum(result.node_counts.values()) == G.number_of_nodes()
    assert sum(result.edge_counts.values()) == G.number_of_edges()
    assert set(result.node_counts) <= set(NODE_TYPES)
    assert set(result.edge_counts) <= set(EDGE_TYPES)
    assert result.seconds > 0
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


@pytest.mark.parametrize("basis", BASES)
def test_node_link_json_loads_back_equal(exports, graphs, basis):
    G = graphs[basis]
    data = json.loads(Path(exports[basis].files["all"]["node_link"]).read_text())
    for key in ("schema_version", "generator", "pruning", "births_rule", "steps"):
        assert data[key] == G.graph[key]
    assert data["generator"].startswith("featurestore ")
    H = nx.node_link_graph(data, edges="links")
    assert isinstance(H, nx.MultiDiGraph)
    assert H.graph == G.graph
    assert dict(H.nodes(data=True)) == dict(G.nodes(data=True))
    assert sorted(H.edges(keys=True, data=True)) == sorted(G.edges(keys=True, data=True))


def _graphml_value(value):
    """An attribute value as the GraphML file holds it (lists and dicts as JSON)."""
    return value if isinstance(value, bool | int | float | str) else json.loads(
        json.dumps(value))


def _decoded(read: dict, original: dict) -> dict:
    """The read attributes, JSON strings decoded where the original value was a list or dict."""
    return {k: json.loads(v) if isinstance(original.get(k), list | dict) else v
            for k, v in read.items()}


@pytest.mark.parametrize("basis", BASES)
def test_graphml_loads_back_with_scalar_attributes(exports, graphs, basis):
    G = graphs[basis]
    path = exports[basis].files["all"]["graphml"]
    H = read_graphml(path)
    assert H.number_of_nodes() == G.number_of_nodes()
    assert H.number_of_edges() == G.number_of_edges()
    for n, data in G.nodes(data=True):
        assert _decoded(H.nodes[n], data) == {k: _graphml_value(v) for k, v in data.items()}
    for u, v, k, data in G.edges(keys=True, data=True):
        assert _decoded(H.edges[u, v, k], data) == data
    graph = {k: v for k, v in H.graph.items() if k not in ("node_default", "edge_default")}
    assert _decoded(graph, G.graph) == {k: v for k, v in G.graph.items() if v is not None}
    # Only the plain types Gephi and Cytoscape read, and no value is None.
    types = {key.get("attr.type") for key in ET.parse(path).getroot()
             if key.tag.endswith("key")}
    assert types <= {"string", "int", "long", "float", "double", "boolean"}
    for _, data in H.nodes(data=True):
        assert all(isinstance(v, bool | int | float | str) for v in data.values())
    for _, _, data in H.edges(data=True):
        assert all(isinstance(v, bool | int | float | str) for v in data.values())


@pytest.mark.parametrize("basis", BASES)
def test_attribution_graph_has_every_required_field(exports, graphs, last_step, basis):
    data = json.loads(Path(exports[basis].files["all"]["attribution_graph"]).read_text())
    for key in ATTRIBUTION_GRAPH_REQUIRED["graph"]:
        assert key in data
    metadata = data["metadata"]
    for key in ATTRIBUTION_GRAPH_REQUIRED["metadata"]:
        assert key in metadata, key
    assert metadata["prompt_tokens"] == [f"step {last_step}"]
    assert metadata["scan"] == "tiny"
    assert metadata["transcoder_list"][0] == basis
    assert metadata["generator"] == graphs[basis].graph["generator"]
    assert metadata["info"]["generator"]["name"] == "featurestore"
    assert metadata["pruning_settings"]["lineage_edges"] == graphs[basis].graph["pruning"]
    assert data["nodes"] and data["links"]
    for node in data["nodes"]:
        for key in ATTRIBUTION_GRAPH_REQUIRED["node"]:
            assert key in node, (key, node)
        assert isinstance(node["node_id"], str) and isinstance(node["feature"], int)
        assert isinstance(node["layer"], str) and isinstance(node["clerp"], str)
        assert node["ctx_idx"] == 0 and node["step"] == last_step
        assert node["influence"] is None or 0 < node["influence"] <= 1
    ids = [node["node_id"] for node in data["nodes"]]
    assert len(ids) == len(set(ids))
    assert len({node["jsNodeId"] for node in data["nodes"]}) == len(ids)
    for link in data["links"]:
        for key in ATTRIBUTION_GRAPH_REQUIRED["link"]:
            assert key in link, (key, link)
        assert link["source"] in ids and link["target"] in ids
        assert link["step"] == last_step
    # Every lineage, flows_to and dla edge is a link; born_at and patches are not.
    G = graphs[basis]
    assert len(data["links"]) == sum(len(edges_of(G, t)) for t in ("lineage", "flows_to", "dla"))
    types = {node["feature_type"] for node in data["nodes"]}
    assert {"cross layer transcoder", "attention head", "mlp neuron",
            "mlp reconstruction error"} <= types


# -- content against the warehouse ---------------------------------------------------------------


@pytest.mark.parametrize("basis", BASES)
def test_lineage_edges_match_sql(con, graphs, basis):
    G = graphs[basis]
    (count,) = con.execute(
        f"SELECT count(*) FROM lineage_edges WHERE basis = ? AND src_type IN {COMPONENTS}",
        [basis]).fetchone()
    lineage = edges_of(G, "lineage")
    assert count > 0 and len(lineage) == count
    assert {d["method"] for *_, d in lineage} == {"dfa", "grad_x_act"}
    for u, v, _, _ in lineage:
        assert G.nodes[u]["node_type"] in ("attention_head", "mlp_neuron", "embedding")
        assert v.startswith(f"feature:{basis}:")
    # The rank-1 dfa head of a feature is an edge with the same weight.
    dst, src, weight = con.execute("""
        SELECT dst_id, src_id, weight FROM lineage_edges
        WHERE basis = ? AND method = 'dfa' AND src_type = 'attention_head' AND rank = 1
        ORDER BY dst_id LIMIT 1""", [basis]).fetchone()
    found = [d for d in G.get_edge_data(f"head:{src}", f"feature:{basis}:{dst}").values()
             if d["method"] == "dfa"]
    assert len(found) == 1 and found[0]["weight"] == weight and found[0]["rank"] == 1
    assert G.nodes[f"head:{src}"]["layer"] == int(src[1:].split("H")[0])
    # The pruning settings are the stored JSON values.
    stored = [json.loads(p) for (p,) in con.execute(
        "SELECT DISTINCT pruning FROM lineage_edges WHERE basis = ?", [basis]).fetchall()]
    assert sorted(map(json.dumps, G.graph["pruning"])) == sorted(map(json.dumps, stored))


def test_flows_to_and_dla_edges_of_tiny_fn(con, graphs):
    G = graphs["tiny-fn"]
    flows = edges_of(G, "flows_to")
    (count,) = con.execute("""
        SELECT count(*) FROM lineage_edges WHERE basis = 'tiny-fn' AND src_type = 'feature'
          AND method IN ('decoder_cosine', 'activation_correlation')""").fetchone()
    assert count > 0 and len(flows) == count
    for u, v, _, d in flows:
        assert u.startswith("feature:tiny-l2:") and v.startswith("feature:tiny-fn:")
        assert G.nodes[u]["basis"] == "tiny-l2" and G.nodes[u]["stage"] == "layer_2_post_mlp"
        assert d["upstream"] == "tiny-l2"
    step, src, dst, weight = con.execute("""
        SELECT step, src_id, dst_id, weight FROM lineage_edges
        WHERE basis = 'tiny-fn' AND method = 'decoder_cosine' AND rank = 1
        ORDER BY dst_id LIMIT 1""").fetchone()
    edge = G.edges[f"feature:tiny-l2:{src}", f"feature:tiny-fn:{dst}",
                   f"decoder_cosine@{step}:feature:tiny-l2:{src}->feature:tiny-fn:{dst}"]
    assert edge["weight"] == weight and edge["step"] == step
    dla = edges_of(G, "dla")
    (count,) = con.execute(
        "SELECT count(*) FROM lineage_edges WHERE basis = 'tiny-fn' AND method = 'dla'"
    ).fetchone()
    assert count > 0 and len(dla) == count
    assert all(v.startswith("logit:") and G.nodes[v]["node_type"] == "logit"
               for _, v, _, _ in dla)
    assert G.graph["upstream"][0]["basis"] == "tiny-l2"
    assert not edges_of(graphs["tiny-l2"], "flows_to")


@pytest.mark.parametrize("basis", BASES)
def test_born_at_edges_match_births(con, graphs, basis):
    G = graphs[basis]
    rule = G.graph["births_rule"]
    # The fixture stored one parameter set: it is the one used, not the defaults.
    assert (rule["metric"], rule["threshold"], rule["persistence"]) == (
        "activation_rate", 0.05, 1)
    assert rule["presence"] == "absolute"
    assert rule["parameter_sets"] == 1 and rule["chosen_by"].startswith("closest")
    births = con.execute("""
        SELECT feature_id, birth_step, birth_censored FROM births
        WHERE basis = ? AND metric = ? AND presence = ? AND threshold = ? AND persistence = ?
          AND birth_step IS NOT NULL""",
        [basis, rule["metric"], rule["presence"], rule["threshold"],
         rule["persistence"]]).fetchall()
    assert births and rule["births"] == len(births)
    edges = {(u, v, d["step"], d["censored"]) for u, v, _, d in edges_of(G, "born_at")}
    # K = 1: a birth is confirmed at its own checkpoint, so none is censored.
    assert edges == {(f"feature:{basis}:{f}", f"checkpoint:{s}", s, c) for f, s, c in births}
    assert rule["censored_births"] == 0 and not any(c for *_, c in edges)
    present = {f for (f,) in con.execute(
        "SELECT feature_id FROM births WHERE basis = ? AND present_at_init", [basis]).fetchall()}
    for f in present:
        node = G.nodes[f"feature:{basis}:{f}"]
        assert node["present_at_init"] is True and "birth_step" not in node
    (n_features,) = con.execute(
        "SELECT count(DISTINCT feature_id) FROM trajectories WHERE basis = ?", [basis]).fetchone()
    own = [n for n, d in G.nodes(data=True)
           if d["node_type"] == "feature" and d["basis"] == basis]
    assert len(own) == n_features


def test_patch_effect_edges_match_single_feature_patches(con, graphs):
    G = graphs["tiny-l2"]
    rows = con.execute("""
        SELECT feature_ids[1], target_step, split, metric, mode, delta, recon_rel_error,
               spliced_loss_delta
        FROM patches WHERE basis = 'tiny-l2' AND len(feature_ids) = 1""").fetchall()
    (combined,) = con.execute(
        "SELECT count(*) FROM patches WHERE basis = 'tiny-l2' AND len(feature_ids) > 1"
    ).fetchone()
    assert rows and combined > 0  # the selection patched together is not an edge
    edges = {(u, v, d["split"], d["metric"], d["mode"], d["weight"], d["recon_rel_error"],
              d["spliced_loss_delta"]) for u, v, _, d in edges_of(G, "patch_effect")}
    assert edges == {(f"feature:tiny-l2:{f}", f"checkpoint:{t}", split, metric, mode, delta,
                      recon, spliced)
                     for f, t, split, metric, mode, delta, recon, spliced in rows}
    assert not edges_of(graphs["tiny-fn"], "patch_effect")


def test_reconstruction_error_and_feature_labels(con, graphs, last_step):
    G = graphs["tiny-l2"]
    ev, rel = con.execute("""
        SELECT explained_variance, relative_reconstruction_error FROM checkpoint_summary
        WHERE basis = 'tiny-l2' AND step = ?""", [last_step]).fetchone()
    node = G.nodes[f"recon_error:tiny-l2:{last_step}"]
    assert node["explained_variance"] == ev and node["relative_reconstruction_error"] == rel
    splits = dict(con.execute("""
        SELECT split, avg(recon_rel_error) FROM patches
        WHERE basis = 'tiny-l2' AND target_step = ? GROUP BY split""", [last_step]).fetchall())
    assert node["patch_recon_rel_error"] == pytest.approx(splits)
    assert len([n for n, d in G.nodes(data=True)
                if d["node_type"] == "reconstruction_error"]) == len(G.graph["basis_steps"])
    assert [n for n, d in G.nodes(data=True) if d["node_type"] == "checkpoint"] == [
        f"checkpoint:{s}" for s in G.graph["basis_steps"]]
    # A feature's top token is the most frequent activating token of its top examples.
    feature, token, count = con.execute("""
        SELECT feature_id, context_token_ids[position - context_start + 1] AS token, count(*) AS n
        FROM feature_examples WHERE basis = 'tiny-l2' AND step = ? AND rank <= 10
        GROUP BY ALL ORDER BY n DESC, feature_id, token LIMIT 1""", [last_step]).fetchone()
    node = G.nodes[f"feature:tiny-l2:{feature}"]
    assert node["top_tokens"][0] == token and node["examples_step"] == last_step
    # Named by text where the run has token strings, else by id.
    texts = node.get("top_token_texts")
    assert (json.dumps(texts[0], ensure_ascii=False) if texts else str(token)) in node["label"]


def test_censored_births_are_flagged_on_nodes_and_edges(tmp_path):
    root = tmp_path / "warehouse"
    write_censored_basis(root)
    con = connect(root)
    try:
        G = build_graph(con, PLANTED)
    finally:
        con.close()
    rule = G.graph["births_rule"]
    default = default_births_rule()
    # Two rules stored (K = 4 and K = 1): the defaults are chosen, presence included.
    assert rule["parameter_sets"] == 2 and rule["chosen_by"] == "default parameters"
    assert {k: rule[k] for k in default} == pytest.approx(default)
    assert (rule["births"], rule["censored_births"]) == (4, 2)
    features = {d["feature_id"]: d for n, d in G.nodes(data=True)
                if d["node_type"] == "feature"}
    assert {f: (d["birth_step"], d["birth_censored"]) for f, d in features.items()
            if "birth_step" in d} == PLANTED_BIRTHS
    # No birth, no censoring flag; a death in the last K-1 checkpoints is censored.
    assert "birth_censored" not in features[5] and "birth_censored" not in features[4]
    assert (features[4]["death_step"], features[4]["death_censored"]) == (100, True)
    assert features[4]["present_at_init"] is True and features[2]["feature_threshold"] > 0
    born = {u: (v, d["step"], d["censored"]) for u, v, _, d in edges_of(G, "born_at")}
    assert born == {f"feature:{PLANTED}:{f}": (f"checkpoint:{s}", s, c)
                    for f, (s, c) in PLANTED_BIRTHS.items()}
    # The flags survive GraphML (scalar booleans) and node-link JSON.
    result = export_graphs(PLANTED, out=tmp_path / "graphs", warehouse=str(root))
    H = read_graphml(result.files["all"]["graphml"])
    assert H.nodes[f"feature:{PLANTED}:3"]["birth_censored"] is True
    assert H.nodes[f"feature:{PLANTED}:0"]["birth_censored"] is False
    assert {d["censored"] for *_, d in H.edges(data=True) if d["edge_type"] == "born_at"} == {
        True, False}
    linked = json.loads(Path(result.files["all"]["node_link"]).read_text())
    assert linked["births_rule"]["censored_births"] == 2
    assert [n["id"] for n in linked["nodes"] if n.get("birth_censored")] == [
        f"feature:{PLANTED}:2", f"feature:{PLANTED}:3"]


# -- step selection and bad input ---------------------------------------------------------------


def test_one_step(root, tmp_path, graphs, last_step):
    out = tmp_path / "one"
    result = export_graphs("tiny-l2", step=last_step, out=out, warehouse=str(root))
    group = f"step{last_step}"
    assert list(result.files) == [group]
    assert {Path(p).name for p in result.files[group].values()} == {
        f"tiny-l2_graph_step{last_step}.json", f"tiny-l2_graph_step{last_step}.graphml",
        f"tiny-l2_attribution_graph_step{last_step}.json"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        Path(p).name for p in result.files[group].values())
    H = nx.node_link_graph(json.loads(Path(result.files[group]["node_link"]).read_text()),
                           edges="links")
    assert H.graph["steps"] == [last_step] and H.graph["step"] == last_step
    for edge_type in ("lineage", "patch_effect"):
        assert edges_of(H, edge_type)
        assert all(d["step"] == last_step for *_, d in edges_of(H, edge_type))
    assert result.edge_counts == {t: len(edges_of(graphs["tiny-l2"], t))
                                  for t in ("born_at", "lineage", "patch_effect")}
    assert [n for n, d in H.nodes(data=True) if d["node_type"] == "reconstruction_error"] == [
        f"recon_error:tiny-l2:{last_step}"]
    attribution = json.loads(Path(result.files[group]["attribution_graph"]).read_text())
    assert attribution["metadata"]["slug"] == f"tiny-l2-step{last_step}"
    # "all" is the same as no step; a checkpoint without lineage or patches gives a graph
    # without those edges.
    assert export_graphs("tiny-l2", step="all", out=tmp_path / "all",
                         warehouse=str(root)).edge_counts == result.edge_counts
    first = min(H.graph["basis_steps"])
    early = export_graphs("tiny-l2", step=first, out=tmp_path / "early", warehouse=str(root))
    assert early.steps == [first]
    assert early.edge_counts == {"born_at": result.edge_counts["born_at"]}


def test_bad_step_and_unknown_basis_write_nothing(root, tmp_path, last_step):
    before = files_under(root)
    out = tmp_path / "never"
    bad = last_step + 1000
    with pytest.raises(FeaturestoreError, match="--step") as error:
        export_graphs("tiny-l2", step=bad, out=out, warehouse=str(root))
    assert str(bad) in str(error.value) and f"lineage or patches: {last_step}" in str(error.value)
    with pytest.raises(FeaturestoreError, match="--step"):
        export_graphs("tiny-l2", step="soon", warehouse=str(root))
    with pytest.raises(NotFoundError, match="--basis") as error:
        export_graphs("no-such-basis", out=out, warehouse=str(root))
    assert "shared bases: tiny-fn, tiny-l2" in str(error.value)  # those a graph can be built for
    with pytest.raises(FeaturestoreError, match="--basis tiny-diff"):
        export_graphs("tiny-diff", warehouse=str(root))
    assert not out.exists()
    assert files_under(root) == before
