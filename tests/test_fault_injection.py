"""SIGKILL at chosen and at random points of writing jobs: the warehouse is always whole.

Each job runs in a child process, forked from a launcher process (LAUNCHER below, `python -c`)
that imported featurestore once. Before the job starts, the child wraps one point of
featurestore (a function, a SQL statement of the commit's connection, or the crosscoder
trainer's os.replace) so that it kills itself with SIGKILL exactly there: featurestore has no
hooks for this. The child prints markers (job start, commit start, BEGIN, COMMIT returned,
commit end, job done), which tell where a kill landed; the random test kills children itself.

After a kill the warehouse holds the state before the job or the state after it, never a mix:
every table reads; every row points at an artefact folder that exists and holds what the rows
say (decoder_directions are the weights at bases.path, an activation set's tokens have the
fingerprint of its row, a run's checkpoints lie in one folder trained with the run's seed); and
running the job again gives the rows an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featurestore.activations import TokenColumns, write_activation_set
from featurestore.cli import cli
from featurestore.compaction import ARTEFACT_TABLES, compact_warehouse
from featurestore.crosscoder import CrossCoder, CrossCoderConfig
from featurestore.crosscoder_training import (
    STATE_FILE,
    TrainerConfig,
    load_state,
    lr_factor,
    make_optimizer,
)
from featurestore.lake import LAKE
from featurestore.registry import open_activation_set
from featurestore.schema import table_specs
from featurestore.settings import set_torch_threads
from featurestore.warehouse import Warehouse, connect, records
from featurestore.writer import VERSION_SUFFIX

from .conftest import RELAXED_BOUNDS, STAGES, TINY_D_MODEL, TINY_RUN

# The prepared warehouse: run `tiny` trained for 3 steps (checkpoints 0..3), one stage collected
# at three checkpoints, a shared basis fitted on them, swept at two, and its births analysed.
TRAIN_STEPS = 3
STAGE = STAGES[0]
COLLECTED = "0,2,LAST"
FITTED = "0,2,3"
SWEPT = "0,3"
COLLECT_TOKENS = 512
BASIS = "tiny-b"
FIT = dict(dict_size=32, k=4, steps=20, batch_size=128, **RELAXED_BOUNDS)
BIRTHS = dict(metric="activation_rate", presence="absolute", threshold=0.05, persistence=1,
              permutations=5)

# Each job as the tests re-run it on the prepared warehouse: (module in featurestore.ingest,
# function, arguments). Every one replaces rows the warehouse holds with other rows: another
# seed (train-model: other weights and losses; collect: other tokens; fit: other weights;
# births: another null), or more checkpoints (the sweep).
JOBS = {
    "train-model": ("train_model", "train_model",
                    dict(run=TINY_RUN, steps=TRAIN_STEPS, d_model=TINY_D_MODEL, seed=1,
                         progress=False)),
    "collect": ("collect", "collect",
                dict(run=TINY_RUN, stages=[STAGE], checkpoints=COLLECTED, tokens=COLLECT_TOKENS,
                     seed=1, progress=False)),
    "shared-feature-fit": ("shared_feature_fit", "shared_feature_fit",
                           dict(run=TINY_RUN, stage=STAGE, name=BASIS, checkpoints=FITTED, seed=1,
                                progress=False, **FIT)),
    "feature-trajectory-sweep": ("trajectory_sweep", "feature_trajectory_sweep",
                                 dict(basis=BASIS, checkpoints="all", progress=False)),
    "feature-birth-analyze": ("birth_analysis", "analyze_births",
                              dict(basis=BASIS, seed=1, **BIRTHS)),
}
# A crosscoder on an activation folder outside any warehouse: the quickest first job.
SAE = "sae"
SAE_TRAINING = dict(dict_size=32, k=4, batch_size=128, log_every=10, progress=False,
                    **RELAXED_BOUNDS)
SAE_JOB = ("train_crosscoder", "train_crosscoder_job")
CHILD_TIMEOUT = 300
VERSION = re.compile(VERSION_SUFFIX.pattern.rstrip("$"))
THREADS = 1  # every job, here and in children: equal threads give equal floats

# Libraries the jobs import inside their functions (torch imports _dynamo on the first optimiser):
# the launcher imports them too, or every child would spend seconds importing them afresh.
LAZY_IMPORTS = ["torch._dynamo", "datasets", "nnsight", "scipy.sparse", "scipy.optimize"]

# The launcher: a process that imports featurestore, torch, the jobs and LAZY_IMPORTS, parses the
# table definitions and loads DuckDB's extensions once, then forks one child per job it is sent
# (a JSON line on stdin), so each job starts in milliseconds. It prints "@fault pid N" for each
# child and "@fault exit STATUS" when the child has ended; the child prints its markers ("@fault
# EVENT MONOTONIC-TIME") in between, on the same stdout.
LAUNCHER = textwrap.dedent("""
    import gc, importlib, json, os, shutil, signal, sys, time, traceback

    from featurestore.settings import set_torch_threads

    set_torch_threads(int(sys.argv[1]))
    import featurestore.schema as schema
    import featurestore.warehouse as warehouse
    import featurestore.writer as writer
    from featurestore.lake import lake_connection

    for module in sys.argv[2:]:
        importlib.import_module(module)
    schema.table_specs()
    lake_connection("sqlite").close()  # checks the extensions' signatures (featurestore.lake)
    gc.freeze()  # the children's garbage collections skip all that was loaded here


    def say(text):
        # One write of a whole line: the launcher and its child share the pipe.
        os.write(1, f"@fault {text}\\n".encode())


    def mark(event):
        say(f"{event} {time.monotonic()}")


    def die():
        mark("killed")
        os.kill(os.getpid(), signal.SIGKILL)


    def child(spec):
        # Apply the kill point of `spec`, mark where the job is, run it.
        kill = spec["kill"] or {}
        calls = {"n": 0}

        def hit():
            # Whether this call of the kill point is the one to kill at (the nth, default 1st).
            calls["n"] += 1
            return calls["n"] == kill.get("nth", 1)

        class Connection:
            # The commit's DuckDB connection, passed through, with markers and the kill point
            # "sql:PREFIX" (the nth statement starting with PREFIX).
            def __init__(self, con):
                self._con = con

            def __getattr__(self, name):
                return getattr(self._con, name)

            def execute(self, sql, *args):
                target = (kill.get("at", "").startswith("sql:")
                          and sql.lstrip().startswith(kill["at"][4:]) and hit())
                if target and kill.get("when", "before") == "before":
                    die()
                result = self._con.execute(sql, *args)
                if sql.startswith("BEGIN"):
                    mark("begin")
                if sql == "COMMIT":
                    mark("committed")
                if target:
                    die()
                return result

        open_lake = warehouse.Warehouse._open

        def writable_open(self, *, read_only, create=False):
            con = open_lake(self, read_only=read_only, create=create)
            return con if read_only else Connection(con)

        warehouse.Warehouse._open = writable_open
        commit = writer.Writer.commit

        def marked_commit(self):
            mark("commit-start")
            commit(self)
            mark("commit-end")

        writer.Writer.commit = marked_commit

        if kill.get("at", "").startswith("call:"):
            # "call:MODULE:NAME": kill before or after the nth call of a function or method.
            _, module_name, qualname = kill["at"].split(":")
            owner = importlib.import_module(module_name)
            *parents, name = qualname.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = getattr(owner, name)

            def wrapped(*args, **kwargs):
                target = hit()
                if target and kill.get("when", "before") == "before":
                    die()
                result = original(*args, **kwargs)
                if target:
                    die()
                return result

            setattr(owner, name, wrapped)

        if kill.get("at") == "replace":
            # The nth os.replace of the crosscoder trainer: copies of the new state (the temp
            # file) and of the state it replaces go to `side`, then the child dies before the
            # rename ("before"), after it ("after"), or with the temp file half written ("torn").
            import featurestore.crosscoder_training as training

            class Os:
                def __getattr__(self, name):
                    return getattr(os, name)

                def replace(self, src, dst):
                    if not hit():
                        return os.replace(src, dst)
                    os.makedirs(kill["side"], exist_ok=True)
                    shutil.copyfile(src, os.path.join(kill["side"], "new"))
                    shutil.copyfile(dst, os.path.join(kill["side"], "old"))
                    if kill["when"] == "torn":
                        os.truncate(src, os.path.getsize(src) // 2)
                        die()
                    if kill["when"] == "before":
                        die()
                    os.replace(src, dst)
                    die()

            training.os = Os()

        job = getattr(importlib.import_module("featurestore.ingest." + spec["module"]),
                      spec["function"])
        mark("start")
        job(**spec["kwargs"])
        mark("done")


    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.dup2(os.open(spec["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                child(spec)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {os.waitstatus_to_exitcode(status)}")
""")


@dataclass
class Child:
    """How a child ended: its exit status, and its markers in seconds after the job started."""

    returncode: int
    events: dict[str, float]
    stderr: str

    def killed_at_its_point(self) -> bool:
        return self.returncode == -signal.SIGKILL and "killed" in self.events

    def where(self) -> str:
        """Where the job was when it ended: before its commit, in the commit before BEGIN, in
        the transaction, after COMMIT returned, or done."""
        if "done" in self.events:
            return "finished"
        if "committed" in self.events:
            return "after COMMIT"
        if "begin" in self.events:
            return "in transaction"
        if "commit-start" in self.events:
            return "commit, before BEGIN"
        return "before commit"


class Launcher:
    """Runs jobs in child processes forked from one launcher process (LAUNCHER)."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        jobs = sorted({job[0] for job in [*JOBS.values(), SAE_JOB]})
        modules = [f"featurestore.ingest.{job}" for job in jobs] + LAZY_IMPORTS
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(THREADS), *modules],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.pending = b""

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=CHILD_TIMEOUT)
        self.process.stdout.close()

    def _line(self, deadline: float) -> str | None:
        """The launcher's next line, or None if none came before `deadline` (monotonic)."""
        while b"\n" not in self.pending:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([self.process.stdout], [], [], wait)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the launcher exited")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def run(self, job: tuple, kwargs: dict, root: Path, kill: dict | None = None,
            kill_after: tuple[str, float] | None = None) -> Child:
        """Run `job` in a child on the warehouse at `root`. `kill`: a kill point the child
        applies itself; `kill_after` (marker, seconds): this process kills the child that many
        seconds after it printed the marker (if it is still running by then)."""
        stderr = self.scratch / "stderr"
        spec = {"module": job[0], "function": job[1], "kill": kill, "stderr": str(stderr),
                "kwargs": {**kwargs, "warehouse": str(root)}}
        self.process.stdin.write((json.dumps(spec) + "\n").encode())
        give_up = time.monotonic() + CHILD_TIMEOUT
        pid, times, status, hung = None, {}, None, False
        while status is None:
            deadline = give_up
            if kill_after is not None and kill_after[0] in times and pid is not None:
                deadline = min(give_up, times[kill_after[0]] + kill_after[1])
            line = self._line(deadline)
            if line is None:  # the time to kill came, or the child hung
                assert pid is not None, "the launcher started no child"
                hung = kill_after is None
                with contextlib.suppress(ProcessLookupError):  # it just ended
                    os.kill(pid, signal.SIGKILL)
                kill_after = None
                continue
            if not line.startswith("@fault "):
                continue  # the job's own output
            _, word, value = line.split()
            if word == "pid":
                pid = int(value)
            elif word == "exit":
                status = int(value)
            else:
                times[word] = float(value)
        errors = stderr.read_text() if stderr.exists() else ""
        assert not hung, f"{job[1]} ran longer than {CHILD_TIMEOUT} s: {errors}"
        start = times.get("start", 0.0)
        return Child(status, {event: t - start for event, t in times.items()}, errors)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """The tests ask for it before the warehouses they prepare, so that the launcher imports
    while those are built."""
    launcher = Launcher(tmp_path_factory.mktemp("launcher"))
    yield launcher
    launcher.close()


def run_job(job: tuple, kwargs: dict, root: Path):
    """Run `job` in this process (with the children's thread count)."""
    module, function = job[:2]
    set_torch_threads(THREADS)
    return getattr(importlib.import_module(f"featurestore.ingest.{module}"), function)(
        **kwargs, warehouse=str(root))


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ---------------------------------------------------------------------------------------------
# What a whole warehouse is


@dataclass
class Examined:
    rows: dict[str, list[tuple]]  # every table's rows, sorted (see contents)
    paths: dict[str, list[str]]  # the artefact paths of checkpoints, activation_sets, bases
    snapshots: int


def examine(root: Path, exact: bool = False) -> Examined:
    """Check that the warehouse at `root` is whole (check_whole, and every table reads: contents
    reads each whole), and read what it holds, on one connection."""
    con = connect(root)
    try:
        # One transaction: DuckLake reads its catalog once for all the reads, not once per read.
        con.execute("BEGIN TRANSACTION")
        check_whole(Warehouse(root), con)
        paths = {table: sorted(p for (p,) in con.execute(f"SELECT path FROM {table}").fetchall())
                 for table in ARTEFACT_TABLES}
        (snapshots,) = con.execute(f"SELECT count(*) FROM {LAKE}.snapshots()").fetchone()
        return Examined(contents(con, exact), paths, snapshots)
    finally:
        con.close()


def contents(con, exact: bool) -> dict[str, list[tuple]]:
    """Every table's rows, sorted. Unless `exact`: without timestamp columns, and with the
    version taken out of artefact paths, so two runs of the same jobs compare equal."""
    tables = {}
    for table in table_specs().values():
        columns = [c.name for c in table.columns if exact or not c.type.startswith("TIMESTAMP")]
        rows = con.execute(f"SELECT {', '.join(columns)} FROM {table.name}").fetchall()
        if not exact and "path" in columns:
            at = columns.index("path")
            rows = [(*row[:at], VERSION.sub("@V", row[at]), *row[at + 1:]) for row in rows]
        tables[table.name] = sorted(rows, key=repr)
    return tables


def check_whole(wh: Warehouse, con) -> None:
    """Every artefact row points at a folder that holds what it says."""
    for table in ARTEFACT_TABLES:
        for (path,) in con.execute(f"SELECT path FROM {table}").fetchall():
            assert wh.path(path).is_dir(), f"{table}.path {path} does not exist"
    for basis in records(con, "SELECT name, path, d_hidden, n_sources FROM bases"):
        decoder = CrossCoder.load(wh.path(basis["path"])).decoder().detach().double().numpy()
        stored = np.zeros_like(decoder)
        rows = con.execute("SELECT feature_id, source_index, direction FROM decoder_directions "
                           "WHERE basis = ?", [basis["name"]]).fetchall()
        assert len(rows) == basis["d_hidden"] * basis["n_sources"]
        for feature, source, direction in rows:
            stored[feature, source] = direction
        cosine = (stored * decoder).sum(-1) / (np.linalg.norm(stored, axis=-1)
                                               * np.linalg.norm(decoder, axis=-1))
        assert cosine.min() > 0.9999, f"{basis['name']}: decoder_directions are other weights"
        np.testing.assert_allclose(stored, decoder, rtol=1e-5, atol=1e-7)
    for row in records(con, "SELECT * FROM activation_sets"):
        tokens = open_activation_set(wh, row).token_columns()  # checks the shape too
        assert tokens.fingerprint() == row["tokens_fingerprint"], \
            f"activation set {row['name']} holds other tokens than its row says"
    for run in records(con, "SELECT run, seed FROM runs WHERE model_family = 'demo'"):
        folders = {versioned_folder(p) for (p,) in con.execute(
            "SELECT path FROM checkpoints WHERE run = ?", [run["run"]]).fetchall()}
        assert len(folders) == 1, f"checkpoints of {run['run']} lie in {folders}"
        trained = json.loads(wh.path(f"{folders.pop()}/run.json").read_text())
        assert trained["train"]["seed"] == run["seed"], \
            f"run {run['run']}: the checkpoints are of another training"


def versioned_folder(path: str) -> str:
    """The artefact folder a stored path lies in: runs/tiny@V/checkpoints/step_1 -> runs/tiny@V."""
    parts = Path(path).parts
    last = max(i for i, part in enumerate(parts) if VERSION_SUFFIX.search(part))
    return str(Path(*parts[:last + 1]))


def versioned_folders(root: Path) -> set[str]:
    """Every artefact folder on disk (runs/, activations/, bases/), relative to the root."""
    return {str(p.relative_to(root)) for top in ("runs", "activations", "bases")
            for p in (root / top).rglob("*@*") if VERSION_SUFFIX.search(p.name)}


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The warehouse the jobs of JOBS re-run on (see TRAIN_STEPS). About 15 s."""
    from featurestore.ingest.birth_analysis import analyze_births
    from featurestore.ingest.collect import collect
    from featurestore.ingest.shared_feature_fit import shared_feature_fit
    from featurestore.ingest.train_model import train_model
    from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep

    set_torch_threads(THREADS)
    root = tmp_path_factory.mktemp("fault") / "warehouse"
    train_model(TINY_RUN, steps=TRAIN_STEPS, d_model=TINY_D_MODEL, warehouse=root,
                progress=False)
    collect(TINY_RUN, [STAGE], checkpoints=COLLECTED, tokens=COLLECT_TOKENS, warehouse=root,
            progress=False)
    shared_feature_fit(TINY_RUN, STAGE, BASIS, checkpoints=FITTED, warehouse=root,
                       progress=False, **FIT)
    feature_trajectory_sweep(BASIS, checkpoints=SWEPT, warehouse=root, progress=False)
    analyze_births(BASIS, warehouse=root, **BIRTHS)
    shutil.rmtree(root / "tmp", ignore_errors=True)
    return root


@pytest.fixture(scope="module")
def prepared_state(prepared) -> Examined:
    """examine(prepared, exact=True), which is what every copy of it holds."""
    return examine(prepared, exact=True)


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """The rows after an uninterrupted run of a job of JOBS on a copy of the prepared
    warehouse, in this process, once per job."""
    done: dict[str, dict] = {}

    def rows(job: str) -> dict:
        if job not in done:
            root = copy(prepared, tmp_path_factory.mktemp("uninterrupted") / job)
            run_job(JOBS[job], JOBS[job][2], root)
            done[job] = examine(root).rows
        return done[job]

    return rows


@pytest.fixture(scope="module")
def activation_folder(tmp_path_factory) -> Path:
    n, d = 1024, 8
    rng = np.random.default_rng(0)
    index = np.arange(n)
    folder = tmp_path_factory.mktemp("acts") / "acts"
    write_activation_set(folder, rng.standard_normal((n, d)).astype(np.float32),
                         TokenColumns(index // 16, (index % 16).astype(np.int32),
                                      rng.integers(0, 50, n), np.array(["s"] * n, dtype=object)))
    return folder


def sae_kwargs(folder: Path, **changes) -> dict:
    return {"name": SAE, "sources": [f"x={folder}"], "steps": 20, "save_every": 10,
            **SAE_TRAINING, **changes}


@pytest.fixture(scope="session")
def kill_seed() -> int:
    """The seed of the random kill times: $FEATURESTORE_KILL_SEED, else drawn and printed."""
    seed = int(os.environ.get("FEATURESTORE_KILL_SEED", random.SystemRandom().randrange(2**31)))
    print(f"\nkill times seeded with {seed} (FEATURESTORE_KILL_SEED={seed} repeats them)")
    return seed


# ---------------------------------------------------------------------------------------------
# 1. A kill inside the commit of a job that replaces existing data

COMMIT = {"at": "sql:COMMIT"}
REPLACING_KILLS = [
    # Every delete and insert ran, COMMIT did not.
    ("shared-feature-fit", COMMIT, "old"),
    ("collect", COMMIT, "old"),
    ("train-model", COMMIT, "old"),
    # Half way through the deletes and inserts.
    ("shared-feature-fit", {"at": "call:featurestore.writer:_delete_where", "nth": 3}, "old"),
    ("train-model", {"at": "call:featurestore.writer:Writer._write_rows", "nth": 2,
                     "when": "after"}, "old"),
    # The sweep's partition files were moved into the data folder, one was registered.
    ("feature-trajectory-sweep", {"at": "sql:CALL ducklake_add_data_files", "nth": 2}, "old"),
    # COMMIT returned; the job did not get to clean up.
    ("shared-feature-fit", {**COMMIT, "when": "after"}, "new"),
    ("collect", {"at": "call:featurestore.writer:Writer.commit", "when": "after"}, "new"),
]


@pytest.mark.parametrize(("job", "kill", "outcome"), REPLACING_KILLS,
                         ids=[f"{j}-{k['at'].split(':')[-1]}-{k.get('when', 'before')}"
                              for j, k, _ in REPLACING_KILLS])
def test_a_kill_inside_a_replacing_commit_leaves_the_old_or_the_new_state(
        launcher, prepared, prepared_state, uninterrupted, tmp_path, job, kill, outcome,
        fault_tally):
    root = copy(prepared, tmp_path / "warehouse")
    before = prepared_state
    digests = {p: folder_digest(root / p) for ps in before.paths.values() for p in ps}

    table_files = set((root / "data").rglob("*.parquet"))

    child = launcher.run(JOBS[job], JOBS[job][2], root, kill=kill)
    assert child.killed_at_its_point(), child.stderr

    killed = examine(root, exact=outcome == "old")  # checks that it is whole
    if outcome == "old":
        assert killed == before
        # The rows point at the old folders, unchanged.
        assert {p: folder_digest(root / p) for p in digests} == digests
        # The killed job's own folders and table files are orphans, which compaction deletes.
        orphans = versioned_folders(root) - {versioned_folder(p) for p in digests}
        orphan_files = set((root / "data").rglob("*.parquet")) - table_files
        assert orphans if job != "feature-trajectory-sweep" else orphan_files
        compact_warehouse(str(root), older_than=timedelta(0))
        assert not [folder for folder in orphans if (root / folder).exists()]
        assert not [path for path in orphan_files if path.exists()]
        assert examine(root, exact=True).rows == before.rows
    else:
        assert killed.rows == uninterrupted(job)
        assert killed.snapshots == before.snapshots + 1

    run_job(JOBS[job], JOBS[job][2], root)
    assert examine(root).rows == uninterrupted(job)
    fault_tally.record("kill at a chosen point", next_run_succeeded=True)


# ---------------------------------------------------------------------------------------------
# 2. A kill during the first commit of a new warehouse

FIRST_COMMIT_KILLS = [
    # The empty SQLite catalog file exists; DuckLake has not initialised it.
    {"at": "call:featurestore.warehouse:prepare_sqlite", "when": "after"},
    # Half of the tables created, in the uncommitted transaction.
    {"at": "sql:CREATE TABLE", "nth": 8},
    COMMIT,
]


@pytest.fixture(scope="module")
def first_job_rows(activation_folder, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("first") / "warehouse"
    run_job(SAE_JOB, sae_kwargs(activation_folder), root)
    return examine(root).rows


@pytest.mark.parametrize("kill", FIRST_COMMIT_KILLS,
                         ids=["after-prepare_sqlite", "mid-CREATE-TABLE", "before-COMMIT"])
def test_a_kill_during_the_first_commit_leaves_a_clear_message_and_a_rerun_works(
        launcher, activation_folder, first_job_rows, tmp_path, kill, fault_tally):
    root = tmp_path / "warehouse"
    child = launcher.run(SAE_JOB, sae_kwargs(activation_folder), root, kill=kill)
    assert child.killed_at_its_point(), child.stderr

    runner = CliRunner()
    result = runner.invoke(cli, ["--warehouse", str(root), "tables"])
    fault_tally.record_cli("kill at a chosen point", result)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert "featurestore init" in result.output, result.output

    run_job(SAE_JOB, sae_kwargs(activation_folder), root)
    result = runner.invoke(cli, ["--warehouse", str(root), "tables"])
    assert result.exit_code == 0, result.output
    assert examine(root).rows == first_job_rows


# ---------------------------------------------------------------------------------------------
# 3. A kill while the crosscoder trainer saves its state


def saved_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON of a state file, read with safetensors alone."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return ({k: f.get_tensor(k) for k in f.keys()},
                json.loads(f.metadata()["featurestore.state"]))


def assert_loads_as(state_dir: Path, expected: Path) -> None:
    """load_state gives exactly the state in the file `expected`: weights, optimiser moments,
    step, metrics, scheduler, random generator and data position."""
    tensors, meta = saved_state(expected)
    config = TrainerConfig.from_dict(meta["trainer"])
    model = CrossCoder(CrossCoderConfig.from_dict(meta["model_config"]))
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    step, metrics, data_state = load_state(state_dir, model, optimizer, scheduler, config)
    assert (step, metrics) == (meta["step"], meta["metrics"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, tensors[f"model.{name}"]), name
    for index, moments in optimizer.state_dict()["state"].items():
        for name, value in moments.items():
            assert torch.equal(value.reshape(-1), tensors[f"optim.{index}.{name}"].reshape(-1))
    assert scheduler.last_epoch == meta["scheduler"]["last_epoch"]
    assert torch.equal(torch.get_rng_state(), tensors["rng.torch"])
    arrays = {k: v for k, v in (data_state or {}).items() if isinstance(v, np.ndarray)}
    assert arrays.keys() == {k[len("data."):] for k in tensors if k.startswith("data.")}
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, tensors[f"data.{name}"].numpy())


STATE_STEPS = 30  # states saved at steps 10, 20 and 30; the kill is at the second save


@pytest.fixture(scope="module")
def resumable_rows(activation_folder, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resumable") / "warehouse"
    run_job(SAE_JOB, sae_kwargs(activation_folder, steps=STATE_STEPS), root)
    return examine(root).rows


@pytest.mark.parametrize(("when", "kept", "step"),
                         [("torn", "old", 10), ("before", "old", 10), ("after", "new", 20)])
def test_a_kill_while_saving_the_training_state_keeps_one_whole_state(
        launcher, activation_folder, resumable_rows, tmp_path, when, kept, step):
    root = tmp_path / "warehouse"
    side = tmp_path / "side"
    kwargs = sae_kwargs(activation_folder, steps=STATE_STEPS)
    child = launcher.run(SAE_JOB, kwargs, root,
                         kill={"at": "replace", "nth": 2, "when": when, "side": str(side)})
    assert child.killed_at_its_point(), child.stderr

    state_dir = root / "training" / SAE
    assert saved_state(side / kept)[1]["step"] == step
    assert saved_state(side / ("new" if kept == "old" else "old"))[1]["step"] != step
    assert_loads_as(state_dir, side / kept)
    assert (state_dir / STATE_FILE).read_bytes() == (side / kept).read_bytes()

    run_job(SAE_JOB, {**kwargs, "resume": True}, root)
    # Resumed from either state, the crosscoder is the one an uninterrupted run trains.
    assert examine(root).rows == resumable_rows
    assert not state_dir.exists()


# ---------------------------------------------------------------------------------------------
# 4. Readers keep the snapshot they opened


def test_a_reader_opened_before_a_commit_keeps_reading_its_snapshot(prepared, tmp_path):
    root = copy(prepared, tmp_path / "warehouse")
    reader = connect(root)
    questions = {
        "bases": "SELECT name, path, fit_quality FROM bases",
        "directions": "SELECT feature_id, direction FROM decoder_directions ORDER BY ALL",
        "checkpoints": "SELECT step, path, train_loss FROM checkpoints ORDER BY step",
        "activations": "SELECT step, count(*), sum(value) FROM feature_activations "
                       "GROUP BY step ORDER BY step",
        "trajectories": "SELECT count(*) FROM trajectories",
    }
    seen = {name: reader.execute(sql).fetchall() for name, sql in questions.items()}
    assert seen["activations"] and seen["trajectories"] != [(0,)]

    for job in ("shared-feature-fit", "train-model"):  # replace the basis, then the run
        run_job(JOBS[job], JOBS[job][2], root)

    # The open reader still answers from its snapshot, from files the commits replaced.
    assert {name: reader.execute(sql).fetchall() for name, sql in questions.items()} == seen
    (_, basis_path, _), = seen["bases"]
    stored = np.array([d for _, d in seen["directions"]])
    decoder = CrossCoder.load(root / basis_path).decoder().detach().numpy()[:, 0]
    np.testing.assert_allclose(stored, decoder, rtol=1e-5, atol=1e-7)
    reader.close()

    # A new reader sees the new rows.
    fresh = connect(root)
    try:
        now = {name: fresh.execute(sql).fetchall() for name, sql in questions.items()}
    finally:
        fresh.close()
    # Re-training the run dropped the basis fitted on its old weights, and what came from it.
    assert now["bases"] == [] and now["directions"] == []
    assert now["checkpoints"] != seen["checkpoints"]
    assert now["activations"] == [] and now["trajectories"] == [(0,)]


# ---------------------------------------------------------------------------------------------
# (c) Kills at random times across the writing jobs

TRIALS = {"train-model": 6, "collect": 6, "shared-feature-fit": 7,
          "feature-trajectory-sweep": 6, "feature-birth-analyze": 6}


@pytest.mark.slow
def test_random_kills_across_jobs_leave_a_whole_warehouse(launcher, prepared, kill_seed,
                                                           tmp_path, fault_tally):
    rng = random.Random(kill_seed)
    tally: dict[str, dict[str, int]] = {}
    recovered = []
    started = time.monotonic()
    # A thread examines a warehouse while the launcher runs a child: each killed child's while
    # the next one runs, and the warehouse before the jobs or the last job's recovered one while
    # a job's reference child runs. So every child runs under the same load, and the kill times
    # drawn from the reference's timing fall where they are meant to.
    with ThreadPoolExecutor(1) as examiner:
        before_state = examiner.submit(examine, prepared)
        for job, trials in TRIALS.items():
            # An uninterrupted child on a fresh copy: the rows the job writes, and when it
            # commits.
            reference = copy(prepared, tmp_path / f"{job}-reference")
            timing = launcher.run(JOBS[job], JOBS[job][2], reference)
            assert timing.returncode == 0, timing.stderr
            before = before_state.result()
            reference_state = examiner.submit(examine, reference)
            commit = timing.events["commit-end"] - timing.events["commit-start"]
            killed = []
            for trial in range(trials):
                root = copy(prepared, tmp_path / f"{job}-{trial}")
                # Half the kills anywhere in the job, half in (and just after) its commit.
                kill_after = (("start", rng.uniform(0, timing.events["done"]))
                              if rng.random() < 0.5
                              else ("commit-start", rng.uniform(0, 1.5 * commit)))
                child = launcher.run(JOBS[job], JOBS[job][2], root, kill_after=kill_after)
                killed.append((root, child, examiner.submit(examine, root)))  # checks it is whole

            after = reference_state.result().rows
            assert after != before.rows
            counts = tally.setdefault(job, {})
            for _, child, examined in killed:
                assert child.returncode in (0, -signal.SIGKILL), child.stderr
                where = child.where()
                state = examined.result()
                fault_tally.record("random kill",
                                   mixed_state=state.rows not in (before.rows, after))
                assert state.rows in (before.rows, after), f"{job} killed {where}: a mix of rows"
                new = state.rows == after
                if where in ("before commit", "commit, before BEGIN"):
                    assert not new, f"{job} killed {where} committed"
                if where in ("after COMMIT", "finished"):
                    assert new, f"{job} killed {where} did not commit"
                assert state.snapshots == before.snapshots + new
                if not new:
                    assert state.paths == before.paths
                key = f"{where} -> {'new' if new else 'old'}"
                counts[key] = counts.get(key, 0) + 1
            for folder, *_ in killed[:-1]:
                shutil.rmtree(folder)
            shutil.rmtree(reference)
            # After every kill, an uninterrupted run on the last trial's warehouse.
            root = killed[-1][0]
            run_job(JOBS[job], JOBS[job][2], root)
            recovered.append((job, after, examiner.submit(examine, root)))

    for job, after, examined in recovered:
        assert examined.result().rows == after, f"{job} run again after a kill"
        fault_tally.recovered()
    total = sum(sum(c.values()) for c in tally.values())
    in_commit = sum(n for c in tally.values() for k, n in c.items()
                    if k.startswith(("commit,", "in transaction")))
    print(f"\n{total} random kills in {time.monotonic() - started:.0f} s, "
          f"{in_commit} inside a commit:")
    for job, counts in tally.items():
        print(f"  {job:26} {sum(counts.values())} trials: "
              + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    assert total >= 30
