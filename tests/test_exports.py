"""export-artifacts and report on the fully analysed tiny run: every file of the layout exists,
parses and matches the warehouse; the report answers every section; the CLI commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from featurestore.birth_rules import BIRTH_RULE_COLUMNS, births_rule_sets, default_births_rule
from featurestore.cli import cli
from featurestore.errors import NotFoundError
from featurestore.ingest.birth_analysis import analyze_births
from featurestore.queries.artifacts import export_artifacts
from featurestore.queries.report import SECTIONS, write_report
from featurestore.warehouse import Warehouse, connect

from .conftest import TINY_RUN, query
from .test_graphs import PLANTED, PLANTED_STEPS, write_censored_basis


@pytest.fixture(scope="module")
def exported(analysed_warehouse, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    return analysed_warehouse, out, export_artifacts("tiny-l2", out=out,
                                                     warehouse=analysed_warehouse)


def test_every_artifact_file_is_written_and_parses(exported):
    root, out, result = exported
    directory = out / "runs" / TINY_RUN / "analysis" / "shared_features" / "layer_2_post_mlp"
    assert result.directory == str(directory)
    (source, target), = query(root, "SELECT DISTINCT source_step, target_step FROM diffs "
                                    "WHERE basis = 'tiny-l2'")
    (patch_pair,) = query(root, "SELECT DISTINCT source_step, target_step FROM patches "
                                "WHERE basis = 'tiny-l2'")
    (lineage_step,), = query(root, "SELECT DISTINCT step FROM lineage_edges "
                                   "WHERE basis = 'tiny-l2'")
    expected = {
        "shared_feature_basis.pt", "shared_feature_basis.json",
        "shared_feature_basis_features.json", "feature_trajectories.jsonl",
        "feature_checkpoint_summary.json", "feature_split_profiles.json", "feature_births.json",
        "feature_birth_summary.json", f"feature_compare_{source}_vs_{target}.json",
        "feature_patch_{}_vs_{}.json".format(*patch_pair),
        f"feature_lineage_{lineage_step}.json"}
    assert expected <= set(result.files)
    assert any(f.startswith("graphs/") and f.endswith(".graphml") for f in result.files)
    assert any(f.startswith("plots/") and f.endswith(".png") for f in result.files)
    for name in result.files:
        path = directory / name
        if name.endswith(".json"):
            json.loads(path.read_text())  # strict: NaN would fail below too
            assert "NaN" not in path.read_text()
        elif name.endswith(".jsonl"):
            for line in path.read_text().splitlines():
                json.loads(line)
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]


def test_artifact_contents_match_the_warehouse(exported):
    root, out, result = exported
    directory = out / "runs" / TINY_RUN / "analysis" / "shared_features" / "layer_2_post_mlp"
    lines = (directory / "feature_trajectories.jsonl").read_text().splitlines()
    (count,), = query(root, "SELECT count(*) FROM trajectories WHERE basis = 'tiny-l2'")
    assert len(lines) == count
    row = json.loads(lines[5])
    (rate,), = query(root, "SELECT activation_rate FROM trajectories WHERE basis = 'tiny-l2' "
                           "AND feature_id = ? AND step = ?", [row["feature_id"], row["step"]])
    assert row["activation_rate"] == rate

    births = json.loads((directory / "feature_births.json").read_text())
    stored = query(root, "SELECT feature_id, birth_step FROM births WHERE basis = 'tiny-l2' "
                         "ORDER BY ALL")
    assert sorted((b["feature_id"], b["birth_step"]) for b in births) == sorted(stored)

    lineage_file = next(directory.glob("feature_lineage_*.json"))
    edges = json.loads(lineage_file.read_text())
    step = int(lineage_file.stem.rsplit("_", 1)[1])
    assert len(edges) == query(root, "SELECT count(*) FROM lineage_edges WHERE basis = "
                                     "'tiny-l2' AND step = ?", [step])[0][0]

    basis = json.loads((directory / "shared_feature_basis.json").read_text())
    assert basis["name"] == "tiny-l2" and basis["stage"] == "layer_2_post_mlp"
    weights = torch.load(directory / "shared_feature_basis.pt", weights_only=True)
    (path,), = query(root, "SELECT path FROM bases WHERE name = 'tiny-l2'")
    stored_weights = load_file(Warehouse(root).path(path) / "crosscoder.safetensors")
    np.testing.assert_array_equal(weights["W_enc"].numpy(), stored_weights["W_enc"])
    steps = [s["step"] for s in sorted(basis["sources"], key=lambda s: s["step"])]
    assert weights["steps"].tolist() == steps and len(weights["norm_scales"]) == len(steps)


def test_rerunning_replaces_the_layout_and_bad_bases_write_nothing(exported, tmp_path):
    root, _, first = exported
    again = export_artifacts("tiny-l2", out=tmp_path, warehouse=root)
    assert again.files == first.files
    stale = tmp_path.joinpath(again.directory, "stale.json")
    stale.write_text("{}")
    export_artifacts("tiny-l2", out=tmp_path, warehouse=root)
    assert not stale.exists()
    with pytest.raises(NotFoundError, match="--basis 'nope': no such basis"):
        export_artifacts("nope", out=tmp_path / "other", warehouse=root)
    assert not (tmp_path / "other").exists()


KILLED_EXPORT = """
import os, signal, sys
from featurestore.queries import artifacts

def die(staging, target, job):  # the layout is built, about to be swapped in
    print(staging, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

artifacts.swap_in = die
artifacts.export_artifacts("tiny-l2", out=sys.argv[1], warehouse=sys.argv[2])
"""


def test_what_a_killed_export_leaves_goes_with_the_next_export(exported, tmp_path):
    root, _, first = exported
    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(tmp_path), str(root)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    staging = Path(killed.stdout.strip())
    assert staging.is_dir() and staging.name.startswith(".layer_2_post_mlp.tmp-")
    # Left by an export of an older featurestore (no lock file): a half-built layout an hour
    # old, and an old layout swapped out but not deleted.
    lockless = staging.with_name(".layer_2_post_mlp.tmp-0123456789abcdef")
    swapped_out = staging.with_name(".layer_2_post_mlp.old-0123456789abcdef")
    for folder in (lockless, swapped_out):
        shutil.copytree(staging, folder)
    hour_ago = time.time() - 3700
    os.utime(lockless, (hour_ago, hour_ago))

    again = export_artifacts("tiny-l2", out=tmp_path, warehouse=root)
    assert again.files == first.files
    assert sorted(p.name for p in staging.parent.iterdir()) == ["layer_2_post_mlp"]


def test_the_report_answers_every_section(analysed_warehouse, tmp_path):
    result = write_report("tiny-l2", out=tmp_path, warehouse=analysed_warehouse)
    page = (tmp_path / "report.html").read_text()
    markdown = (tmp_path / "report.md").read_text()
    for section in SECTIONS:
        assert f"<h2>{section.title}</h2>" in page and f"## {section.title}" in markdown
        assert section.sql.splitlines()[0] in markdown  # the SQL behind it is shown
    assert result.sections["Causal importance"] > 0 and result.sections["Lineage"] > 0
    assert result.sections["Births"] > 0 and result.sections["Fit quality"] > 0
    # tiny-l2 was fitted with one seed: the section says how to measure stability, and there is
    # no agreement of births across seeds.
    assert result.sections["Stability"] == 0 and "--seeds 3" in markdown
    assert result.sections["Births across seeds"] == 0
    assert page.count("data:image/png;base64,") >= 3 and "<script src=" not in page
    assert "(plots/birth_timeline.png)" in markdown
    assert (tmp_path / "plots" / "birth_timeline.png").exists()
    # The tables are the query's rows: the first fit-quality row is the first checkpoint's.
    (step, variance), = query(analysed_warehouse, "SELECT step, round(explained_variance, 4) "
                                                  "FROM checkpoint_summary WHERE basis = "
                                                  "'tiny-l2' ORDER BY step LIMIT 1")
    assert f"| {step} | {variance:.4g} |" in markdown


@pytest.fixture(scope="module")
def planted_root(tmp_path_factory):
    """The planted basis of test_graphs (censored births at the last two checkpoints under the
    default rule, a K = 1 rule beside it), a third rule that differs from the default only in its
    presence (the same births), and a seed agreement written onto the default rule's summary as
    feature-birth-analyze writes it for a basis fitted with several seeds."""
    root = tmp_path_factory.mktemp("planted") / "warehouse"
    write_censored_basis(root)
    default = default_births_rule()
    other = "relative" if default["presence"] == "absolute" else "absolute"
    analyze_births(PLANTED, presence=other, threshold=default["threshold"], permutations=3,
                   warehouse=root)
    con = connect(root)
    try:
        rows = con.execute(
            "SELECT * FROM birth_summary WHERE basis = ? AND "
            + " AND ".join(f"{c} = ?" for c in BIRTH_RULE_COLUMNS),
            [PLANTED, *(default[c] for c in BIRTH_RULE_COLUMNS)]).arrow().read_all().to_pylist()
    finally:
        con.close()
    assert len(rows) == len(PLANTED_STEPS) - 1
    with Warehouse(root).writer("test: seed agreement") as writer:
        writer.put("birth_summary", [{**r, "seed_births_agreement": 0.75,
                                      "seed_matched_features": 12} for r in rows])
    return root


def test_the_report_shows_censored_births_and_seed_agreement(planted_root, tmp_path):
    result = write_report(PLANTED, out=tmp_path, warehouse=planted_root)
    markdown = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    # Every rule's windows, one per pair of checkpoints: the default rule's (K = 4), the K = 1
    # rule's, and the default rule's under the other presence.
    assert result.sections["Births"] == 3 * (len(PLANTED_STEPS) - 1)
    births = markdown.split("## Births\n")[1].split("\n## ")[0]
    assert "censored" in births and "last K-1 windows are kept and flagged" in births
    assert "last K-1 windows are kept and flagged" in page
    header = next(line for line in births.splitlines() if line.startswith("| window_start"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:4] == ["window_start", "window_end", "births", "censored_births"]
    assert "presence" in columns
    table = [[c.strip() for c in line.strip("|").split("|")] for line in births.splitlines()
             if line.startswith("| ") and line != header]
    persistence, presence = columns.index("persistence"), columns.index("presence")
    default = [row for row in table if row[persistence] == "4"
               and row[presence] == default_births_rule()["presence"] and row[2] != "0"]
    assert [(r[1], r[2], r[3]) for r in default] == [
        ("10", "1", "0"), ("30", "1", "0"), ("100", "1", "1"), ("1000", "1", "1")]
    assert {r[presence] for r in default} == {default_births_rule()["presence"]}
    # The features born in a window are those of its own rule: the join keys on presence too.
    assert [r[columns.index("first_born_features")] for r in default] == [
        "[0]", "[1]", "[2]", "[3]"]
    assert all(r[3] == "0" for r in table if r[persistence] == "1")  # K = 1: never censored
    assert result.sections["Births across seeds"] == 1
    seeds = markdown.split("## Births across seeds\n")[1].split("\n## ")[0]
    assert "| 0.75 | 12 |" in seeds


def summary_table(text: str, title_start: str) -> list[dict]:
    """The rows of one table of the demo summary's text, as {column: cell text}."""
    (block,) = [b for b in text.split("\n\n") if b.startswith(title_start)]
    _, header, rule, *rows, _ = block.split("\n")  # title, header, dashes, rows, row count
    starts = [m.start() for m in re.finditer(r"-+", rule)]
    ends = [*starts[1:], None]
    return [{header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends)}
            for row in rows]


def test_demo_summary_counts_births_of_the_demo_rule_only(planted_root):
    from featurestore.demo import summary

    con = connect(planted_root)
    try:
        assert len(births_rule_sets(con, PLANTED, "birth_summary")) == 3
    finally:
        con.close()
    text = summary(planted_root)
    # The K = 1 rule and the other presence's rule stored beside it (4 more births each) are
    # not summed in.
    (row,) = summary_table(text, "births per basis")
    assert (row["basis"], row["births"], row["censored"], row["present_at_init"]) == (
        PLANTED, "4", "2", "2")
    assert row["rule"].startswith(f"{default_births_rule()['metric']} >= ")
    assert row["rule"].endswith("K = 4")
    assert "censored: born in the last K-1 checkpoints" in text
    born = summary_table(text, "top born features")  # one row per born feature
    assert len(born) == 4 and sum(r["censored"] == "True" for r in born) == 2


def test_cli_exports_report_json(analysed_warehouse, tmp_path):
    root = tmp_path / "warehouse"
    shutil.copytree(analysed_warehouse, root)
    runner = CliRunner()
    for args in (["export", "graphs", "--basis", "tiny-fn"],
                 ["export", "plots", "--basis", "tiny-fn"],
                 ["export-artifacts", "--basis", "tiny-fn", "--out", str(tmp_path / "art")],
                 ["report", "--basis", "tiny-fn"]):
        result = runner.invoke(cli, ["--warehouse", str(root), *args, "--json"])
        assert result.exit_code == 0, (args, result.output)
        json.loads(result.output)
    assert (root / "exports" / "tiny-fn" / "graphs").is_dir()
    assert (root / "exports" / "tiny-fn" / "report" / "report.html").exists()
    result = runner.invoke(cli, ["--warehouse", str(root), "report", "--basis", "nope"])
    assert result.exit_code == 1 and "no such basis" in result.output
