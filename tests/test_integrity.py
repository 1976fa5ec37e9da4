"""Damage is contained and named: `featurestore check`, `check --repair`, `catalog restore`, and
what `tables`, `sql` and the jobs do when a table file or the catalog is damaged."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from featurestore.cli import cli
from featurestore.warehouse import Warehouse

from .conftest import TINY_D_MODEL, TINY_RUN, TINY_STEPS, basis_path, query, snapshot


@pytest.fixture
def root(analysed_warehouse, tmp_path) -> Path:
    copy = tmp_path / "warehouse"
    shutil.copytree(analysed_warehouse, copy)
    return copy


def run(root: Path, *args: str):
    result = CliRunner().invoke(cli, ["--warehouse", str(root), *args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def table_file(root: Path, table: str) -> Path:
    (path,) = Warehouse(root).data_files(table)[:1]
    return path


def data_folder(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(root).items() if k.startswith("data/")}


def test_an_intact_warehouse_checks_clean_against_the_checksums_recorded_at_commit(root):
    result = run(root, "check", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["problems"] == []
    # Every live table file had its SHA-256 recorded by the commit that wrote it: recompute
    # them independently from the catalog's checksum table and the files.
    db = sqlite3.connect(root / "catalog.sqlite")
    recorded = dict(db.execute("SELECT path, sha256 FROM featurestore_file_checksums"))
    db.close()
    live = {str(p.relative_to(root / "data")) for t in ("runs", "checkpoints", "bases",
                                                        "feature_activations", "trajectories")
            for p in Warehouse(root).data_files(t)}
    for relative in live:
        assert hashlib.sha256((root / "data" / relative).read_bytes()).hexdigest() == \
            recorded[relative]
    assert report["checksums_verified"] == report["table_files"] >= len(live)
    (artefacts,) = query(root, "SELECT (SELECT count(*) FROM checkpoints) + (SELECT count(*) "
                               "FROM activation_sets) + (SELECT count(*) FROM bases)")[0]
    assert report["artefacts"] == artefacts


def test_a_truncated_table_file_affects_only_what_reads_it_and_check_names_the_fix(
        root, fault_tally):
    damaged = table_file(root, "checkpoints")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    before = snapshot(root)

    tables = run(root, "tables", "--json")
    assert tables.exit_code == 0, tables.output
    status = {t["name"]: t["status"] for t in json.loads(tables.stdout)}
    assert status["checkpoints"].startswith("damaged") and damaged.name in status["checkpoints"]
    assert status["runs"] == status["bases"] == status["births"] == "ok"
    assert run(root, "sql", "SELECT name FROM bases ORDER BY name").exit_code == 0
    reading = run(root, "sql", "SELECT * FROM checkpoints")
    assert reading.exit_code == 1 and damaged.name in reading.output
    assert "featurestore check --repair" in reading.output
    fault_tally.record_cli("damaged table file", reading)

    check = run(root, "check")
    assert check.exit_code == 1
    (line,) = [line for line in check.output.splitlines() if damaged.name in line]
    assert "checkpoints" in line and "re-run" in line and "train-model" in line
    assert snapshot(root) == before  # check only reads

    repair = run(root, "check", "--repair")
    assert repair.exit_code == 0, repair.output
    assert query(root, "SELECT count(*) FROM checkpoints") == [(0,)]
    assert run(root, "check").exit_code == 0
    # The job that wrote the rows writes them again.
    rerun = run(root, "train-model", "--run", TINY_RUN, "--steps", str(TINY_STEPS),
                "--d-model", str(TINY_D_MODEL))
    assert rerun.exit_code == 0, rerun.output
    assert query(root, "SELECT count(*) FROM checkpoints")[0][0] > 0
    assert run(root, "check").exit_code == 0
    fault_tally.record("damaged table file", clear_error=True, next_run_succeeded=True)


def test_a_job_that_replaces_a_damaged_table_drops_the_damaged_file_and_says_so(
        root, fault_tally):
    damaged = table_file(root, "checkpoints")
    damaged.write_bytes(damaged.read_bytes()[:100])
    result = run(root, "train-model", "--run", TINY_RUN, "--steps", str(TINY_STEPS),
                 "--d-model", str(TINY_D_MODEL))
    assert result.exit_code == 0, result.output
    assert damaged.name in result.stderr and "damaged" in result.stderr
    assert run(root, "check").exit_code == 0
    jobs = [s["job"] for s in json.loads(run(root, "snapshots", "--json").stdout)[:2]]
    assert jobs == [f"train-model {TINY_RUN}", f"drop damaged files, for train-model {TINY_RUN}"]
    fault_tally.record("damaged table file", next_run_succeeded=True)


def test_changed_bytes_of_the_same_size_are_caught_by_the_checksum(root, fault_tally):
    damaged = max(Warehouse(root).data_files("feature_activations"),
                  key=lambda p: p.stat().st_size)
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
    damaged.write_bytes(bytes(data))
    report = json.loads(run(root, "check", "--json").stdout)
    (problem,) = report["problems"]
    assert problem["path"].endswith(damaged.name) and problem["table"] == "feature_activations"
    assert "SHA-256" in problem["reason"] and "feature-trajectory-sweep" in problem["rerun"]
    fault_tally.record("damaged table file", clear_error=True)


def test_missing_or_altered_artefacts_are_named(root, fault_tally):
    # A basis whose weights no longer match its decoder_directions rows.
    weights = basis_path(root, "tiny-l2") / "crosscoder.safetensors"
    state = load_file(weights)
    state["W_dec"] = state["W_dec"] + 0.01
    save_file(state, weights)
    # A checkpoint whose weights file lost its tail, and an activation set that is gone.
    (checkpoint,) = query(root, "SELECT path FROM checkpoints ORDER BY step LIMIT 1")[0]
    model = next((root / checkpoint).glob("*.safetensors"))
    model.write_bytes(model.read_bytes()[:-10])
    (activations,) = query(root, "SELECT path FROM activation_sets ORDER BY name LIMIT 1")[0]
    shutil.rmtree(root / activations)

    result = run(root, "check", "--json")
    assert result.exit_code == 1
    problems = {(p["kind"], p["path"]): p for p in json.loads(result.stdout)["problems"]}
    assert set(problems) == {("directions", str(basis_path(root, "tiny-l2").relative_to(root))),
                             ("artefact", checkpoint), ("artefact", activations)}
    assert "shared-feature-fit" in problems[("directions", str(
        basis_path(root, "tiny-l2").relative_to(root)))]["rerun"]
    assert "missing" in problems[("artefact", activations)]["reason"]
    assert "safetensors" in problems[("artefact", checkpoint)]["reason"]
    for _ in problems:
        fault_tally.record("damaged artefact", clear_error=True)


@pytest.mark.parametrize("damage", ["empty", "random bytes", "truncated", "deleted"])
def test_a_damaged_catalog_is_reported_as_damaged_and_restore_brings_it_back(
        root, damage, fault_tally):
    bases = query(root, "SELECT name, path FROM bases ORDER BY name")
    catalog = root / "catalog.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{catalog}{suffix}").unlink(missing_ok=True)
    if damage == "empty":
        catalog.write_bytes(b"")
    elif damage == "random bytes":
        catalog.write_bytes(bytes(range(256)) * 400)
    elif damage == "truncated":
        catalog.write_bytes(catalog.read_bytes()[:40_000])
    else:
        catalog.unlink()
    files = data_folder(root)

    for args in (["tables"], ["sql", "SELECT 1"],
                 ["train-model", "--run", "other", "--steps", "2", "--d-model", "16"]):
        result = run(root, *args)
        fault_tally.record_cli("damaged catalog", result)
        assert result.exit_code == 1
        assert "catalog restore" in result.output and "busy" not in result.output
        if damage != "deleted":
            assert "is damaged" in result.output
    assert data_folder(root) == files

    restore = run(root, "catalog", "restore")
    assert restore.exit_code == 0, restore.output
    assert query(root, "SELECT name, path FROM bases ORDER BY name") == bases
    assert run(root, "check", "--quick").exit_code == 0
    fault_tally.recovered()


def test_restore_refuses_a_healthy_catalog_unless_forced(root, tmp_path):
    assert run(root, "catalog", "backup", "--out", str(tmp_path / "copy.sqlite")).exit_code == 0
    result = run(root, "train-model", "--run", "late", "--steps", "2", "--d-model", "16")
    assert result.exit_code == 0, result.output
    refused = run(root, "catalog", "restore", "--from", str(tmp_path / "copy.sqlite"))
    assert refused.exit_code == 1 and "--force" in refused.output
    assert query(root, "SELECT count(*) FROM runs WHERE run = 'late'") == [(1,)]
    forced = run(root, "catalog", "restore", "--from", str(tmp_path / "copy.sqlite"), "--force")
    assert forced.exit_code == 0, forced.output
    assert query(root, "SELECT count(*) FROM runs WHERE run = 'late'") == [(0,)]
    assert "written after that snapshot" in forced.output
