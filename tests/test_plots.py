"""Plot exports of the analysed tiny run: every spec is valid Vega-Lite, PNGs have the size asked
for and are not blank, HTML renders offline, the plotted rows are the warehouse's rows, large
plots export, and bases without the data for a plot are skipped with a reason.

The warehouse is the session's `analysed_warehouse` (tiny-l2 and tiny-fn: shared bases fitted,
swept, births, compared, tiny-l2 patched; tiny-diff: a two-source crosscoder), copied before
anything is written.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import altair as alt
import jsonschema
import pandas as pd
import pytest

from featurestore.birth_rules import default_births_rule
from featurestore.errors import NotFoundError
from featurestore.queries.plots import (
    CENSORED_BIRTHS,
    CONFIRMED_BIRTHS,
    FORMATS,
    PLOTS,
    NoPlotData,
    activation_heatmap,
    birth_timeline,
    export_plots,
    relative_norm_histogram,
    save_plot,
)
from featurestore.warehouse import Warehouse, connect

from .test_graphs import PLANTED, PLANTED_BIRTHS, write_censored_basis


@pytest.fixture(scope="module")
def root(analysed_warehouse, tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("plots") / "warehouse"
    shutil.copytree(analysed_warehouse, copy)
    return copy


@pytest.fixture(scope="module")
def exports(root) -> dict:
    """tiny-l2 (pooled, patched) into the default folder; tiny-diff (crosscoder) elsewhere."""
    return {"tiny-l2": export_plots("tiny-l2", warehouse=str(root)),
            "tiny-diff": export_plots("tiny-diff", out=root.parent / "diff-plots",
                                      warehouse=str(root))}


@pytest.fixture(scope="module")
def vega_lite_schema() -> dict:
    """The Vega-Lite JSON schema altair ships, for the major version it writes specs for."""
    major = alt.SCHEMA_VERSION.split(".")[0]  # e.g. "v6"
    path = Path(alt.__file__).parent / "vegalite" / major / "schema" / "vega-lite-schema.json"
    return json.loads(path.read_text())


def written_files(exports: dict) -> list[tuple[str, str, dict[str, Path]]]:
    return [(basis, plot, files) for basis, export in exports.items()
            for plot, files in export.written.items()]


def document(files: dict[str, Path]) -> dict:
    return json.loads(files["json"].read_text())


def datasets(spec: dict) -> list[list[dict]]:
    """Every inline dataset of a spec (altair gathers them in the top-level `datasets`)."""
    return list(spec.get("datasets", {}).values())


def dataset_with(spec: dict, column: str) -> list[dict]:
    (rows,) = [d for d in datasets(spec) if d and column in d[0]]
    return rows


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def png_pixels(data: bytes) -> bytes:
    """The decompressed image bytes (filtered scanlines) of all IDAT chunks."""
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind = data[at + 4:at + 8]
        if kind == b"IDAT":
            chunks.append(data[at + 8:at + 8 + length])
        at += 12 + length
    return zlib.decompress(b"".join(chunks))


def query(root: Path, sql: str, params: list) -> list[tuple]:
    con = connect(root)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def test_writes_every_format_of_every_plot_with_data(root, exports):
    l2, diff = exports["tiny-l2"], exports["tiny-diff"]
    assert l2.out == root / "exports" / "tiny-l2" / "plots"  # the default folder
    assert set(l2.written) == set(PLOTS) - {"relative_norm_histogram"}
    assert set(diff.written) == {"relative_norm_histogram", "training_curves"}
    for export in exports.values():
        assert set(export.written) | set(export.skipped) == set(PLOTS)
        for plot, files in export.written.items():
            assert set(files) == set(FORMATS)
            for fmt, path in files.items():
                assert path == export.out / f"{plot}.{fmt}" and path.stat().st_size > 0
        # Atomic writes leave no temp files behind.
        assert sorted(p.name for p in export.out.iterdir()) == sorted(
            f"{plot}.{fmt}" for plot in export.written for fmt in FORMATS)
        as_json = json.loads(json.dumps(export.to_dict()))
        assert as_json["out"] == str(export.out) and as_json["seconds"] > 0
        assert set(as_json["written"]) == set(export.written)


def test_every_spec_validates_against_the_vega_lite_schema(exports, vega_lite_schema):
    validator = jsonschema.Draft7Validator(vega_lite_schema)
    for basis, plot, files in written_files(exports):
        doc = document(files)
        assert doc["name"] == plot
        assert doc["generator"].startswith("featurestore ")
        assert doc["schema"] == doc["spec"]["$schema"] == alt.SCHEMA_URL
        assert basis in doc["title"]
        errors = [e.message for e in validator.iter_errors(doc["spec"])]
        assert not errors, (plot, errors[:3])


def test_pngs_have_the_size_asked_for_and_are_not_blank(exports, root):
    for _, plot, files in written_files(exports):
        data = files["png"].read_bytes()
        width, height = png_size(data)
        assert width > 100 and height > 100, plot
        assert len(set(png_pixels(data))) > 16, f"{plot}.png looks blank"
        assert files["svg"].read_text().lstrip().startswith("<svg")
    # A single view: the plot area asked for, at scale 2, plus axes, title and legend.
    files = exports["tiny-l2"].written["feature_trajectories"]
    spec = document(files)["spec"]
    width, height = png_size(files["png"].read_bytes())
    assert 2 * spec["width"] < width <= 2 * (spec["width"] + 300)
    assert 2 * spec["height"] < height <= 2 * (spec["height"] + 200)
    # The scale is the writer's: half the pixels at scale 1.
    small = save_plot(alt.Chart.from_dict(spec), root.parent / "scale-1", "trajectories",
                      scale=1.0)
    assert png_size(small["png"].read_bytes()) == (width // 2, height // 2)


def test_html_is_self_contained(exports):
    for _, plot, files in written_files(exports):
        page = files["html"].read_text()
        assert '<script src="http' not in page
        assert not re.search(r"<script[^>]*\bsrc=", page), plot  # no external script at all
        assert "vegaEmbed" in page and len(page) > 200_000  # vega, vega-lite, embed inline
        assert f"<title>{document(files)['title']}</title>" in page


def test_trajectory_rows_are_the_warehouses_rows(root, exports):
    spec = document(exports["tiny-l2"].written["feature_trajectories"])["spec"]
    rows = dataset_with(spec, "activation_rate")
    # The 12 features of highest peak energy, with every checkpoint each.
    top = [f for (f,) in query(root, """
        SELECT feature_id FROM trajectories WHERE basis = 'tiny-l2' GROUP BY feature_id
        ORDER BY max(energy) DESC, feature_id LIMIT 12""", [])]
    assert {r["feature_id"] for r in rows} == set(top)
    feature = top[0]
    expected = query(root, "SELECT step, activation_rate, energy FROM trajectories "
                           "WHERE basis = 'tiny-l2' AND feature_id = ? ORDER BY step", [feature])
    plotted = [(r["step"], r["activation_rate"], r["energy"])
               for r in rows if r["feature_id"] == feature]
    assert plotted == expected
    assert spec["encoding"]["x"]["scale"]["type"] == "log"  # step + 1 on a log axis
    assert min(r["step"] for r in rows) == 0


def test_heatmap_has_every_feature_at_every_checkpoint_in_birth_order(root, exports):
    spec = document(exports["tiny-l2"].written["activation_heatmap"])["spec"]
    rows = dataset_with(spec, "birth_order")
    ((n_features, n_steps),) = query(root, "SELECT count(DISTINCT feature_id), "
                                           "count(DISTINCT step) FROM trajectories "
                                           "WHERE basis = 'tiny-l2'", [])
    assert len(rows) == n_features * n_steps
    assert len({(r["feature_id"], r["step"]) for r in rows}) == len(rows)
    births = dict(((f, (p, b)) for f, p, b in query(root, """
        SELECT feature_id, present_at_init, birth_step FROM births
        WHERE basis = 'tiny-l2' AND metric = 'activation_rate'""", [])))
    order = sorted({(r["birth_order"], r["feature_id"]) for r in rows})
    keys = [(not births[f][0], births[f][1] is None, births[f][1] or 0) for _, f in order]
    assert keys == sorted(keys)  # present at init, then by birth step, then never born
    assert keys[0][0] is False and keys[-1][1] is True


def test_other_plots_say_what_the_warehouse_says(root, exports):
    spec = document(exports["tiny-l2"].written["compare_scatter"])["spec"]
    plotted = {r["feature_id"]: (r["source_activation_rate"], r["target_activation_rate"])
               for r in dataset_with(spec, "log_rate_ratio")}
    stored = {f: (s, t) for f, s, t in query(root, """
        SELECT feature_id, source_activation_rate, target_activation_rate FROM diffs
        WHERE basis = 'tiny-l2'""", [])}
    assert plotted == stored
    tooltip = spec["layer"][1]["encoding"]["tooltip"]
    assert any(t["field"] == "feature_id" for t in tooltip)

    spec = document(exports["tiny-l2"].written["patch_effects"])["spec"]
    plotted = {(r["feature_set"], r["split"]): (r["delta"], r["recon_high"], r["recon_rel_error"])
               for r in dataset_with(spec, "delta")}
    stored = {(s, p): (d, abs(sl), r) for s, p, d, sl, r in query(root, """
        SELECT feature_set, split, delta, spliced_loss_delta, recon_rel_error FROM patches
        WHERE basis = 'tiny-l2' AND metric = 'loss'""", [])}
    assert plotted == stored

    spec = document(exports["tiny-l2"].written["birth_timeline"])["spec"]
    plotted = [(r["window_end"], r["births"], r["censored_births"])
               for r in dataset_with(spec, "births")]
    assert plotted == query(root, "SELECT window_end, births, censored_births FROM "
                                  "birth_summary WHERE basis = 'tiny-l2' ORDER BY window_end", [])

    spec = document(exports["tiny-diff"].written["relative_norm_histogram"])["spec"]
    bars = dataset_with(spec, "n_features")
    ((live,),) = query(root, "SELECT count(*) FROM model_diff WHERE basis = 'tiny-diff' "
                             "AND class <> 'dead'", [])
    assert sum(r["n_features"] for r in bars) == live
    bands = dataset_with(spec, "class")
    assert [(b["start"], b["end"]) for b in bands] == [(0, 0.3), (0.3, 0.7), (0.7, 1)]
    assert [b["class"].split(" ")[0] for b in bands] == ["first-exclusive", "shared",
                                                         "last-exclusive"]

    spec = document(exports["tiny-diff"].written["training_curves"])["spec"]
    plotted = {(r["metric"], r["step"]): r["value"] for r in dataset_with(spec, "value")}
    assert plotted[("loss", 30)] == query(root, "SELECT value FROM training_metrics WHERE "
                                                "basis = 'tiny-diff' AND metric = 'loss' "
                                                "AND step = 30", [])[0][0]
    assert {m for m, _ in plotted} >= {"loss", "explained_variance"}

    spec = document(exports["tiny-l2"].written["checkpoint_summary"])["spec"]
    plotted = [(r["step"], r["explained_variance"], r["l0"]) for r in dataset_with(spec, "l0")]
    assert plotted == query(root, "SELECT step, explained_variance, l0 FROM checkpoint_summary "
                                  "WHERE basis = 'tiny-l2' ORDER BY step", [])


def test_bases_without_the_data_skip_with_a_reason(root, exports):
    l2, diff = exports["tiny-l2"], exports["tiny-diff"]
    assert set(l2.skipped) == {"relative_norm_histogram"}
    assert "pooled" in l2.skipped["relative_norm_histogram"]
    assert set(diff.skipped) == set(PLOTS) - {"relative_norm_histogram", "training_curves"}
    assert all("train-crosscoder" in why for why in diff.skipped.values())
    # tiny-fn was never patched: the reason names the job that would write the rows.
    fn = export_plots("tiny-fn", out=root.parent / "fn-plots", warehouse=str(root),
                      plots=["patch_effects", "relative_norm_histogram"])
    assert fn.written == {}
    assert "feature-patch --basis tiny-fn" in fn.skipped["patch_effects"]
    con = connect(root)
    try:
        with pytest.raises(NoPlotData, match="pooled"):
            relative_norm_histogram(con, "tiny-fn")
    finally:
        con.close()


def test_unknown_basis_is_not_found_and_writes_nothing(root, tmp_path):
    with pytest.raises(NotFoundError, match=r"--basis.*'nope'.*tiny-diff, tiny-fn, tiny-l2"):
        export_plots("nope", out=tmp_path / "plots", warehouse=str(root))
    assert not (tmp_path / "plots").exists()
    assert not (root / "exports" / "nope").exists()


def test_a_heatmap_of_more_than_5000_cells_exports(root, tmp_path):
    """2,000 more features of tiny-l2 (synthetic trajectories) make 6,192 cells."""
    copy = tmp_path / "warehouse"
    shutil.copytree(root, copy)
    steps = [s for (s,) in query(copy, "SELECT DISTINCT step FROM trajectories "
                                       "WHERE basis = 'tiny-l2' ORDER BY step", [])]
    extra = [{"basis": "tiny-l2", "feature_id": f, "step": s, "n_tokens": 1024,
              "activation_rate": ((f * 7 + i * 13) % 100) / 1000, "mean_activation": 0.1,
              "max_activation": 1.0, "energy": 0.0, "split_activation_rates": []}
             for f in range(64, 2064) for i, s in enumerate(steps)]
    with Warehouse(copy).writer("test: wide trajectories") as writer:
        writer.put("trajectories", extra)
    con = connect(copy)
    try:
        chart = activation_heatmap(con, "tiny-l2")
    finally:
        con.close()
    files = save_plot(chart, tmp_path / "out", "heatmap")
    spec = document(files)["spec"]
    assert len(dataset_with(spec, "birth_order")) == 2064 * len(steps) > 5000
    width, height = png_size(files["png"].read_bytes())
    assert width > 100 and height > 100
    assert len(set(png_pixels(files["png"].read_bytes()))) > 16


def test_save_plot_takes_a_large_dataframe_without_touching_altairs_settings(tmp_path):
    frame = pd.DataFrame({"x": range(6000), "y": [i % 97 for i in range(6000)]})
    chart = alt.Chart(frame).mark_point().encode(x="x:Q", y="y:Q").properties(title="6,000")
    before = (alt.data_transformers.active, dict(alt.data_transformers.options))
    files = save_plot(chart, tmp_path, "many")
    assert (alt.data_transformers.active, dict(alt.data_transformers.options)) == before
    assert len(dataset_with(document(files)["spec"], "x")) == 6000
    with pytest.raises(alt.MaxRowsError):  # the limit still holds for everyone else
        chart.to_dict()


def test_censored_births_are_drawn_apart(tmp_path):
    """A planted basis with two censored births (features 2 and 3, in the last K-1 = 2 windows)
    under the default rule, and a second rule (K = 1) stored beside it."""
    root = tmp_path / "warehouse"
    write_censored_basis(root)
    con = connect(root)
    try:
        timeline, heatmap = birth_timeline(con, PLANTED), activation_heatmap(con, PLANTED)
    finally:
        con.close()
    files = save_plot(timeline, tmp_path / "out", "birth_timeline")
    spec = document(files)["spec"]
    rows = dataset_with(spec, "censored_births")
    # The default rule's windows only (not the K = 1 rule's), censored births counted apart.
    assert [(r["window_end"], r["births"], r["censored_births"], r["confirmed_births"])
            for r in rows] == [(10, 1, 0, 1), (30, 1, 0, 1), (100, 1, 1, 0), (300, 0, 0, 0),
                               (1000, 1, 1, 0)]
    # The bars are coloured by kind: confirmed and censored, in the legend's order.
    bars = spec["layer"][0]
    assert bars["encoding"]["color"]["scale"]["domain"] == [CONFIRMED_BIRTHS, CENSORED_BIRTHS]
    colours = bars["encoding"]["color"]["scale"]["range"]
    assert "censored" in CENSORED_BIRTHS and len(set(colours)) == 2
    assert any(t.get("fold") == ["confirmed_births", "censored_births"]
               for t in bars["transform"])
    assert {t["field"] for t in bars["encoding"]["tooltip"]} >= {"births", "censored_births",
                                                                 "confirmed_births"}
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "4 born (2 censored)" in subtitle and "K = 4" in subtitle
    if default_births_rule()["presence"] == "relative":
        assert "x its peak" in subtitle
    # Drawn: the censored colour is in the image.
    assert b"#f58518" in files["svg"].read_bytes()

    spec = heatmap.to_dict()
    rows = dataset_with(spec, "birth_order")
    labels = {r["feature_id"]: r["birth"] for r in rows}
    assert {f: labels[f] for f in PLANTED_BIRTHS} == {
        0: "born at step 10", 1: "born at step 30", 2: "born at step 100 (censored)",
        3: "born at step 1000 (censored)"}
    assert labels[4] == labels[6] == "present at init" and labels[5] == "not born"
    assert "2 censored (present from birth to the last checkpoint" in spec["title"]["subtitle"]
