"""train-crosscoder under torchrun with 2 CPU processes (gloo) equals one process (vanilla)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from featurestore.crosscoder import CrossCoder
from featurestore.ingest.train_crosscoder import train_crosscoder_job
from featurestore.warehouse import connect

from .conftest import RELAXED_BOUNDS, RELAXED_FLAGS, TINY_RUN, TINY_STEPS, basis_path

SOURCES = [f"base={TINY_RUN}@0:layer_2_post_mlp", f"tuned={TINY_RUN}@{TINY_STEPS}:layer_2_post_mlp"]
OPTIONS = ["--arch", "vanilla", "--dict-size", "32", "--steps", "12", "--batch-size", "64",
           "--log-every", "4", "--save-every", "4", "--seed", "1", *RELAXED_FLAGS]


def test_two_processes_train_the_same_basis_as_one(warehouse_copy):
    train_crosscoder_job("single", SOURCES, arch="vanilla", dict_size=32, steps=12,
                         batch_size=64, log_every=4, save_every=4, seed=1,
                         warehouse=warehouse_copy, progress=False, **RELAXED_BOUNDS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "featurestore", "--warehouse",
               str(warehouse_copy), "--threads", "1", "train-crosscoder", "--name", "ddp",
               "--quiet", *[arg for s in SOURCES for arg in ("--source", s)], *OPTIONS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]

    single = CrossCoder.load(basis_path(warehouse_copy, "single")).state_dict()
    ddp = CrossCoder.load(basis_path(warehouse_copy, "ddp")).state_dict()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    con = connect(warehouse_copy)
    bases = dict(con.execute("SELECT name, steps FROM bases").fetchall())
    con.close()
    assert bases == {"single": 12, "ddp": 12}  # registered once, by rank 0
