"""Concurrent writers: several processes committing to one warehouse at the same time.

Writers take no lock (featurestore/warehouse.py): each job commits its own DuckLake transaction,
and one that loses a race with another job's commit is run again from the start. This measures
what that costs. Each commit is a small, sweep-like job write: `writer.put("trajectories", rows)`
of ROWS feature rows for one (basis, step), every column filled with numpy data, each commit its
own step, so no two commits touch the same rows.

A fixed total of COMMITS commits (QUICK_COMMITS with --quick) is split evenly across N writer
processes, N = 1, 2, 4, started together; a figure's sample is that total over the wall time from
handing the processes their work to the last one reporting done:

    commits/s, 1 process         the baseline: the same total committed serially by one process
    commits/s, 2 / 4 processes   the same total from 2 and 4 processes at once

The processes (sys.executable running this file as a worker) are started once, before timing,
and wait on their stdin for work, so interpreter start-up and imports are not timed; each
commit still opens its own catalog connection, as a separate job would. Every figure has its own
warehouse (a SQLite catalog, the default), created before timing and kept across its samples,
so the three see catalogs that grow alike. Notes and details give, per N, the commit latency
inside each process (the `with wh.writer(...)` block: put, commit, retries and their waits) and
the retries per commit: Writer.attempts - 1, the whole-transaction retries featurestore makes
when the catalog reports a race (DuckLake's own internal retries are not counted). On a machine
with fewer cores than writers, the processes also compete for the CPU.

After timing, each warehouse is checked: one snapshot per commit, ROWS rows per step committed,
and no key twice; a failure raises rather than reporting figures of a broken warehouse.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from bench_warehouse_scale import trajectory_table
from harness import BenchmarkResult, Figure, RunOptions, measure

from featurestore.schema import table_specs
from featurestore.warehouse import Warehouse, init_warehouse

WRITER_COUNTS = (1, 2, 4)
COMMITS, QUICK_COMMITS = 40, 8  # the total per sample; divisible by every writer count
ROWS = 1_024  # feature rows per commit: one (basis, step) of a 1,024-feature basis
STEP_EVERY = 100
JOB = "bench-concurrent-writers"


def run(options: RunOptions) -> BenchmarkResult:
    total = QUICK_COMMITS if options.quick else COMMITS
    assert all(total % n == 0 for n in WRITER_COUNTS)
    with tempfile.TemporaryDirectory(prefix="bench-concurrent-writers-") as tmp, \
            WriterPool(max(WRITER_COUNTS)) as pool:
        roots = {n: Path(tmp) / f"warehouse-{n}" for n in WRITER_COUNTS}
        for root in roots.values():
            init_warehouse(root)
        commits: dict[int, list[dict]] = {n: [] for n in WRITER_COUNTS}  # every commit's report
        next_step = dict.fromkeys(WRITER_COUNTS, 0)

        def write(n: int):
            def work() -> float:
                per_writer = total // n
                first = next_step[n]
                next_step[n] += total
                reports = pool.commit(roots[n], [
                    list(range(first + w * per_writer, first + (w + 1) * per_writer))
                    for w in range(n)])
                commits[n] += [c for report in reports for c in report]
                return total
            return work

        processes = {n: f"{n} process" + ("es" if n > 1 else "") for n in WRITER_COUNTS}
        label = {n: f"commits/s, {processes[n]}" for n in WRITER_COUNTS}
        figures = [Figure(label[n], "commits/s", write(n),
                          baseline=None if n == 1 else label[1]) for n in WRITER_COUNTS]
        measurements = measure(figures, options)
        for n in WRITER_COUNTS:
            check_warehouse(roots[n], next_step[n])

    result = BenchmarkResult(
        name="concurrent_writers",
        description=(f"{total} commits of {ROWS:,} trajectories rows each to one warehouse "
                     f"(SQLite catalog), from {', '.join(map(str, WRITER_COUNTS))} processes "
                     "at once"),
        measurements=measurements,
        config={"writer_counts": list(WRITER_COUNTS), "commits_per_sample": total,
                "rows_per_commit": ROWS, "catalog": "sqlite",
                "cores": os.cpu_count()},
    )
    result.details["per_writer_count"] = {}
    for n in WRITER_COUNTS:
        latencies = [c["seconds"] * 1000 for c in commits[n]]
        retries = [c["attempts"] - 1 for c in commits[n]]
        summary = {
            "commits": len(commits[n]),
            "latency_ms": {"mean": statistics.mean(latencies),
                           "median": statistics.median(latencies), "max": max(latencies)},
            "retries_per_commit": sum(retries) / len(retries),
            "commits_retried": sum(r > 0 for r in retries),
            "max_attempts": max(retries) + 1,
        }
        result.details["per_writer_count"][str(n)] = summary
        ms = summary["latency_ms"]
        result.notes.append(
            f"{processes[n]}: commit latency {ms['mean']:.0f} ms mean ({ms['median']:.0f} median, "
            f"{ms['max']:.0f} max); {summary['retries_per_commit']:.2f} "
            f"retries per commit ({summary['commits_retried']} of {len(retries)} commits retried, "
            f"at most {summary['max_attempts']} attempts)")
    result.notes.append(f"counted over warm-up and timed samples; {os.cpu_count()} cores for up "
                        f"to {max(WRITER_COUNTS)} writer processes")
    return result


def check_warehouse(root: Path, commits: int) -> None:
    """Every commit landed, once: one snapshot each, ROWS rows per step, no key twice."""
    wh = Warehouse(root)
    ours = [s for s in wh.snapshots() if s.job and s.job.startswith(JOB)]
    con = wh.connect()
    try:
        rows, keys, per_step = con.execute(
            "SELECT count(*), count(DISTINCT (basis, feature_id, step)), "
            "count(DISTINCT step) FILTER (WHERE n = ?) "
            "FROM (SELECT *, count(*) OVER (PARTITION BY step) AS n FROM trajectories)",
            [ROWS]).fetchone()
    finally:
        con.close()
    problems = []
    if len(ours) != commits:
        problems.append(f"{len(ours)} snapshots of {JOB}, expected {commits}")
    if rows != commits * ROWS:
        problems.append(f"{rows:,} rows, expected {commits:,} commits x {ROWS:,} = "
                        f"{commits * ROWS:,}")
    if keys != rows:
        problems.append(f"{rows - keys:,} rows repeat a key")
    if per_step != commits:  # each commit wrote its own step
        problems.append(f"{commits - per_step} steps do not hold exactly {ROWS:,} rows")
    if problems:
        raise RuntimeError(f"concurrent_writers: the warehouse at {root} is wrong after the "
                           f"benchmark: {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------
# The writer processes


class WriterPool:
    """`size` worker processes, started once; `commit` hands each of the first len(steps) of
    them a list of steps to commit to one warehouse, and waits for all of their reports."""

    def __init__(self, size: int):
        self.size = size
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> WriterPool:
        try:
            for _ in range(self.size):
                self.processes.append(subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--worker"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1))
            for process in self.processes:  # imports done, rows template built
                self._reply(process)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def commit(self, root: Path, steps: list[list[int]]) -> list[list[dict]]:
        workers = self.processes[:len(steps)]
        for process, mine in zip(workers, steps):
            process.stdin.write(json.dumps({"root": str(root), "steps": mine}) + "\n")
        return [self._reply(process) for process in workers]

    def _reply(self, process: subprocess.Popen):
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"concurrent_writers: writer process {process.pid} exited "
                               f"(status {process.wait()}); its error is above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"concurrent_writers: writer process {process.pid} failed: "
                               f"{reply['error']}")
        return reply["commits"]

    def _stop(self) -> None:
        # Closing stdin ends a worker's loop; one that does not stop in time is killed.
        for process in self.processes:
            if process.stdin and not process.stdin.closed:
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def trajectory_rows(rng: np.random.Generator) -> pa.Table:
    """ROWS trajectories rows for one checkpoint (its step set per commit), generated as the
    warehouse-scale benchmark generates a sweep's rows."""
    return trajectory_table(rng, ROWS, np.zeros(1, dtype=np.int64), 16_384)


def worker() -> None:
    """Read {"root", "steps"} lines from stdin; commit one job per step; answer each line with
    {"commits": [{"step", "seconds", "attempts"}, ...]} (or {"error"}) on stdout."""
    # Replies get the real stdout to themselves; anything else printed goes to stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    table_specs()  # parsed once per process, before any timing
    template = trajectory_rows(np.random.default_rng(os.getpid()))
    step_column = template.schema.get_field_index("step")
    replies.write(json.dumps({"commits": []}) + "\n")
    for line in sys.stdin:
        order = json.loads(line)
        wh = Warehouse(order["root"])
        done = []
        try:
            for index in order["steps"]:
                step = index * STEP_EVERY
                rows = template.set_column(step_column, "step",
                                           pa.array(np.full(ROWS, step, dtype=np.int64)))
                started = time.perf_counter()
                with wh.writer(f"{JOB} step {step}") as writer:
                    writer.put("trajectories", rows)
                done.append({"step": step, "seconds": time.perf_counter() - started,
                             "attempts": writer.attempts})
        except Exception as error:  # reported to the parent, which raises it
            replies.write(json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n")
            continue
        replies.write(json.dumps({"commits": done}) + "\n")


if __name__ == "__main__":  # a writer process of WriterPool
    if sys.argv[1:] != ["--worker"]:
        sys.exit("this file is run by benchmarks/run.py --only concurrent_writers")
    worker()
