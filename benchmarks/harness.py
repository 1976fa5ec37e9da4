"""What every benchmark shares: repeated timing, statistics, machine info and result files.

A benchmark module (bench_*.py next to this file) defines `run(options) -> BenchmarkResult`.
Inside it, its figures are taken together with `measure`, which runs each one's work a few times
untimed (warm-up: imports, first page faults of a memory map, allocator growth) and then
`options.repeats` times timed, keeping every sample. Figures are rates (GB/s, tokens/s), so
bigger is better, and every figure that is not itself a baseline names the baseline it is
compared with; both are measured in the same process, interleaved, so a busy machine slows both
alike and their ratio stays meaningful even when the absolute numbers do not.

A command that takes minutes (end_to_end: the demo, the test suite) is timed once instead, as a
Measurement in seconds with no baseline: smaller is better there, and its unit says so.

Nothing here asserts a time: benchmarks report, tests decide.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True)
class RunOptions:
    """How hard to run: set once by run.py and handed to every benchmark."""

    quick: bool  # smaller inputs, fewer repeats: a smoke run, not figures to quote
    repeats: int  # timed runs per figure
    warmup: int  # untimed runs before them


@dataclass
class Measurement:
    """One figure: a rate measured `len(samples)` times."""

    label: str
    unit: str
    samples: list[float]  # one rate per timed repeat, in the order they ran
    baseline: str | None = None  # label of the figure this one is compared with
    note: str = ""  # what a reader must know to trust the figure (e.g. measured on a subset)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


@dataclass
class BenchmarkResult:
    name: str
    description: str  # one line: what was measured, at what size
    measurements: list[Measurement]
    config: dict = field(default_factory=dict)  # sizes and settings, for the JSON file
    details: dict = field(default_factory=dict)  # further figures that are not rates (memory)
    notes: list[str] = field(default_factory=list)  # printed under the table

    def measurement(self, label: str) -> Measurement:
        return next(m for m in self.measurements if m.label == label)

    def ratio(self, measurement: Measurement) -> float | None:
        """Median over the baseline's median; None for a baseline itself."""
        if measurement.baseline is None:
            return None
        return measurement.median / self.measurement(measurement.baseline).median


@dataclass
class Figure:
    """Work to time, and how to turn one run of it into a rate."""

    label: str
    unit: str
    work: Callable[[], float]  # does the work once; returns how much it processed
    scale: float = 1.0  # amount * scale = amount in `unit`'s numerator (1e-9: bytes -> GB)
    baseline: str | None = None  # label of the figure this one is compared with
    note: str = ""  # becomes Measurement.note


def measure(figures: list[Figure], options: RunOptions) -> list[Measurement]:
    """Warm each figure up, then time them round-robin and return one Measurement per figure.

    Round-robin (repeat r of every figure before repeat r + 1 of any) means a change in machine
    load during the benchmark hits a baseline and the figures compared with it alike; each round
    starts one figure further on, so no figure always runs right after the same other one (whose
    leftovers, such as a heap to trim or files to flush, it would otherwise always pay for).
    `work` reports its own amount so the rate counts what really went through (the last, partial
    batch included) rather than what was meant to.
    """
    for figure in figures:
        for _ in range(options.warmup):
            figure.work()
    samples: dict[str, list[float]] = {figure.label: [] for figure in figures}
    for repeat in range(options.repeats):
        first = repeat % len(figures)
        for figure in figures[first:] + figures[:first]:
            started = time.perf_counter()
            amount = figure.work()
            seconds = time.perf_counter() - started
            samples[figure.label].append(amount * figure.scale / seconds)
    return [Measurement(f.label, f.unit, samples[f.label], f.baseline, f.note) for f in figures]


DEVICE_ENV = "FEATURESTORE_BENCH_DEVICE"


def benchmark_devices() -> list[str]:
    """Where the device-aware benchmarks run: "cpu", and "cuda" where torch sees a GPU;
    FEATURESTORE_BENCH_DEVICE=cpu or =cuda picks one of them."""
    import torch

    choice = os.environ.get(DEVICE_ENV, "")
    if choice not in ("", "cpu", "cuda"):
        raise RuntimeError(f"{DEVICE_ENV}={choice!r}: use cpu or cuda, or unset it for both")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}=cuda, but torch sees no GPU here; unset it to run on "
                           "the CPU")
    if choice:
        return [choice]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def matmul_figure(label: str, device: str, n: int, repeats: int, dtype=None,
                  note: str = "") -> Figure:
    """The device's matrix-multiply rate in GFLOP/s (`repeats` n x n products a sample, then a
    synchronize on a GPU): what utilisation figures divide an achieved FLOP rate by."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype or torch.float32)
            for _ in range(2))

    def work() -> float:
        for _ in range(repeats):
            torch.mm(a, b)
        if device == "cuda":  # the products were only queued
            torch.cuda.synchronize()
        return repeats * 2 * n**3  # a multiply-add is 2 FLOPs
    return Figure(label, "GFLOP/s", work, 1e-9, note=note)


@contextmanager
def tf32_matmuls(device: str):
    """On CUDA, fp32 matmuls in TF32 (the usual training setting) while figures run there."""
    import torch

    if device != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def peak_rss_mb() -> float:
    """This process's peak resident set since it started, in MB (VmHWM, Linux; NaN elsewhere).

    Not ru_maxrss: Linux carries that across exec, so a process spawned from a big parent would
    report at least the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # kB
    except OSError:
        pass  # no /proc: not Linux
    return float("nan")


def in_fresh_process(function: Callable, *args):
    """(function(*args), the peak RSS in MB of the fresh interpreter that ran it): memory of one
    piece of work alone, without what earlier benchmarks left in this process."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_call_and_measure, (function, args))
        # Let the worker exit on its own: killed (the pool's exit terminates it), it leaves the
        # semaphores it made (tqdm makes one) for the resource tracker to warn about.
        pool.close()
        pool.join()
    return result


def _call_and_measure(function: Callable, args: tuple):
    return function(*args), peak_rss_mb()


def machine_info() -> dict:
    """The facts a figure depends on, recorded next to it."""
    import datasets
    import duckdb
    import numpy
    import pyarrow
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "duckdb": duckdb.__version__,
            "datasets": datasets.__version__,
            "numpy": numpy.__version__,
            "pyarrow": pyarrow.__version__,
        },
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall through to what the platform module knows
    return platform.processor() or "unknown"


def load_average() -> float:
    """The 1-minute load average: other processes competing for the cores skew every figure."""
    return os.getloadavg()[0]


def write_result(result: BenchmarkResult, options: RunOptions, machine: dict,
                 load_before: float, load_after: float, seconds: float) -> Path:
    """Save benchmarks/results/<name>.json and return its path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    document = {
        "benchmark": result.name,
        "description": result.description,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": asdict(options),
        "machine": machine,
        "load_average_1min": {"before": load_before, "after": load_after},
        "seconds": seconds,
        "config": result.config,
        "measurements": [
            {**asdict(m), "median": m.median, "min": m.min, "max": m.max,
             "ratio_to_baseline": result.ratio(m)}
            for m in result.measurements
        ],
        "details": result.details,
        "notes": result.notes,
    }
    path = RESULTS_DIR / f"{result.name}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def format_table(result: BenchmarkResult) -> str:
    """The result as an aligned text table, then its footnotes and notes."""
    header = ["measurement", "median", "min", "max", "unit", "ratio", "baseline"]
    rows = []
    baselines = {m.baseline for m in result.measurements}
    for m in result.measurements:
        ratio = result.ratio(m)
        rows.append([
            m.label + (" *" if m.note else ""),
            _number(m.median), _number(m.min), _number(m.max), m.unit,
            "-" if ratio is None else f"{ratio:.3g}x",
            m.baseline or ("(baseline)" if m.label in baselines else "-"),
        ])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    # Text columns left-aligned, numbers right-aligned so their digits line up.
    right = {1, 2, 3, 5}
    lines = []
    for row in [header, *rows]:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    lines += [f"  * {m.label}: {m.note}" for m in result.measurements if m.note]
    lines += [f"  {note}" for note in result.notes]
    return "\n".join(lines)


def _number(value: float) -> str:
    # Whole numbers from 100 up, else three significant figures: the run-to-run spread is wider
    # than any further digit.
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
