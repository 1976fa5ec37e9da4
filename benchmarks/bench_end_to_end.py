"""The README's two commands, timed: `make demo` and `make test` after the one-time install.

Each runs once, in a fresh process, exactly as the Makefile runs it (`featurestore demo` and
`python -m pytest`), from this benchmark's interpreter, which is the installed environment's: so
what is timed is the work, not the install that `make` skips once `.venv` is current. The demo
writes its warehouse and artifacts to a temporary directory, never to ./warehouse.

Minutes-long commands are timed once rather than repeated: their spread across runs (a few
percent) is far below the margin to the target, and repeating them would take the whole suite
past its own time budget. The target is at most 5 minutes each on 2 cores; it has no
baseline to divide by, so the table shows the wall time and the notes say whether it was met.

Peak memory: the largest resident set of any process the command started (the demo itself; for
the tests, pytest), read from the kernel's accounting of a child that has exited. With --quick the
benchmark is skipped: neither command has a smaller version whose time would mean anything.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import BenchmarkResult, Measurement, RunOptions, in_fresh_process

REPOSITORY = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 300.0


def run(options: RunOptions) -> BenchmarkResult:
    if options.quick:  # the commands have no smaller version: their time is the figure
        return BenchmarkResult("end_to_end", "make demo and make test: skipped with --quick", [],
                               notes=["run without --quick to time the README's commands"])
    with tempfile.TemporaryDirectory(prefix="bench-end-to-end-") as tmp:
        demo = timed_command(
            [sys.executable, "-m", "featurestore", "--warehouse", str(Path(tmp) / "warehouse"),
             "demo", "--quiet", "--artifacts", str(Path(tmp) / "artifacts")], cwd=tmp)
    tests = timed_command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          cwd=str(REPOSITORY))
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?)", tests.output)
    summary = ", ".join(f"{n} {word}" for n, word in counts) or "no pytest summary line"

    measurements = [
        Measurement("make demo (featurestore demo)", "s", [demo.seconds]),
        Measurement("make test (pytest)", "s", [tests.seconds], note=summary),
    ]
    notes = [f"target: each at most {TARGET_SECONDS:.0f} s on 2 cores, after the install; "
             "each command ran once (see the module docstring)"]
    for label, command in (("make demo", demo), ("make test", tests)):
        verdict = "met" if command.seconds <= TARGET_SECONDS else "missed"
        notes.append(f"{label}: {command.seconds:.0f} s, target {verdict}; exit status "
                     f"{command.returncode}; peak RSS {command.peak_rss_mb:,.0f} MB")
    failed = [label for label, command in (("demo", demo), ("tests", tests))
              if command.returncode != 0]
    if failed:
        notes.append(f"FAILED: {', '.join(failed)}; the last lines of its output:")
        notes += ["  " + line for line in (demo if "demo" in failed else tests).tail()]
    return BenchmarkResult(
        name="end_to_end",
        description="the README's commands after the install: make demo and make test, once each",
        measurements=measurements,
        config={"target_seconds": TARGET_SECONDS, "python": sys.executable},
        details={"demo": demo.details(), "tests": tests.details()},
        notes=notes,
    )


@dataclass
class CommandRun:
    seconds: float
    returncode: int
    output: str  # stdout and stderr
    peak_rss_mb: float

    def tail(self, lines: int = 15) -> list[str]:
        return self.output.strip().splitlines()[-lines:]

    def details(self) -> dict:
        return {"seconds": self.seconds, "returncode": self.returncode,
                "peak_rss_mb": self.peak_rss_mb, "output_tail": self.tail()}


def timed_command(command: list[str], cwd: str) -> CommandRun:
    """Run `command` from a fresh process of its own, whose only child it is: that process's
    accounting of its exited children is then the command's alone."""
    return CommandRun(*in_fresh_process(_run_and_measure, command, cwd)[0])


def _run_and_measure(command: list[str], cwd: str) -> tuple[float, int, str, float]:
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    # ru_maxrss of the children is the largest of this process's exited descendants, in KiB.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, finished.returncode, finished.stdout + finished.stderr, peak_kib / 1024
