"""Several processes sweeping different checkpoints of one basis into one warehouse at once
give the same tables as one process sweeping them all."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.schema import table_specs
from featurestore.warehouse import Warehouse, connect

from .conftest import TINY_RUN, query

SWEPT = ("trajectories", "feature_activations", "feature_examples", "checkpoint_summary",
         "split_profiles", "feature_directions", "seed_trajectories")


@pytest.fixture(scope="module")
def fitted_warehouse(trained_warehouse, tmp_path_factory):
    """The tiny run with layer_2_post_mlp collected at every checkpoint and a pooled basis."""
    from featurestore.ingest.collect import collect
    from featurestore.ingest.shared_feature_fit import shared_feature_fit

    root = tmp_path_factory.mktemp("concurrent") / "warehouse"
    shutil.copytree(trained_warehouse, root)
    collect(TINY_RUN, ["layer_2_post_mlp"], checkpoints="all", tokens=1024, warehouse=root,
            progress=False)
    shared_feature_fit(TINY_RUN, "layer_2_post_mlp", "pool", checkpoints="all", dict_size=64,
                       k=4, steps=60, batch_size=256, min_explained_variance=-1.0,
                       max_active_fraction=1.0, max_dead_fraction=1.0, warehouse=root,
                       progress=False)
    return root


# A checkpoint's direction cosines compare its refitted directions with those of the previous
# and the last checkpoint *in the same sweep*: a process sweeping part of the checkpoints has
# other neighbours than a serial sweep, so these two columns are compared separately.
NEIGHBOUR_COLUMNS = ("direction_cosine_previous", "direction_cosine_final")


def swept_rows(root) -> dict[str, list[tuple]]:
    """The rows of every SWEPT table, read on one connection."""
    con = connect(root)
    try:
        return {table: con.execute(f"SELECT {', '.join(compared_columns(table))} FROM {table} "
                                   "ORDER BY ALL").fetchall() for table in SWEPT}
    finally:
        con.close()


def compared_columns(table: str) -> list[str]:
    return [c.name for c in table_specs()[table].columns
            if c.name != "created_at" and c.name not in NEIGHBOUR_COLUMNS]


def sweep_arguments(root, checkpoints: str) -> list[str]:
    return ["--warehouse", str(root), "--threads", "1", "feature-trajectory-sweep", "--basis",
            "pool", "--checkpoints", checkpoints, "--quiet"]


def sweep_here(root, checkpoints: str) -> None:
    """The sweep in this process, through the same command line as the processes run."""
    done = CliRunner().invoke(cli, sweep_arguments(root, checkpoints))
    assert done.exit_code == 0, done.output + repr(done.exception)


def test_four_processes_sweeping_at_once_match_a_serial_sweep(fitted_warehouse, tmp_path):
    steps = [s for (s,) in query(fitted_warehouse, "SELECT step FROM checkpoints "
                                                   f"WHERE run = '{TINY_RUN}' ORDER BY step")]
    assert len(steps) >= 4
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    shutil.copytree(fitted_warehouse, serial)
    shutil.copytree(fitted_warehouse, parallel)

    sweep_here(serial, "all")
    parts = [",".join(map(str, steps[i::4])) for i in range(4)]
    jobs = [subprocess.Popen([sys.executable, "-m", "featurestore.cli",
                              *sweep_arguments(parallel, part)], stderr=subprocess.PIPE,
                             text=True)
            for part in parts]
    for job in jobs:
        assert job.wait(timeout=600) == 0, job.stderr.read()

    expected = swept_rows(serial)
    got = swept_rows(parallel)
    for table in SWEPT:
        assert got[table] == expected[table], table
    # Each process's own last checkpoint is its "final": cosine 1 there, as at the serial
    # sweep's last checkpoint.
    finals = {int(part.split(",")[-1]) for part in parts}
    at_one = {step for (step,) in query(parallel, "SELECT DISTINCT step FROM trajectories "
                                                  "WHERE abs(direction_cosine_final - 1) < 1e-6")}
    assert finals <= at_one
    assert expected["trajectories"]  # the comparison is not vacuous
    assert {r[0] for r in query(parallel, "SELECT DISTINCT step FROM feature_activations")} == \
        set(steps)
    # One snapshot per process, each naming its own checkpoints on its command line.
    sweeps = [s for s in Warehouse(parallel).snapshots(limit=10)
              if s.job == "feature-trajectory-sweep pool"]
    assert sorted(s.command_line[-2] for s in sweeps) == sorted(parts)


def test_a_rerun_of_some_checkpoints_replaces_only_those(fitted_warehouse, tmp_path):
    root = tmp_path / "wh"
    shutil.copytree(fitted_warehouse, root)
    steps = [s for (s,) in query(root, "SELECT DISTINCT step FROM activation_sets ORDER BY step")]
    for checkpoints in ("all", str(steps[-1])):
        sweep_here(root, checkpoints)
    # The re-run's checkpoint is there once, the others untouched.
    per_step = dict(query(root, "SELECT step, count(*) FROM trajectories GROUP BY step"))
    assert set(per_step) == set(steps) and len(set(per_step.values())) == 1
