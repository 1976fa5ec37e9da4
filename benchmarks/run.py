"""Run the benchmarks and print what they measured.

    python benchmarks/run.py              # every bench_*.py here (`make bench`); the longest
                                          # are end_to_end (the demo and the test suite),
                                          # recovery (BatchTopK training to a planted
                                          # dictionary) and warehouse_scale (105M rows)
    python benchmarks/run.py --quick      # smaller inputs, fewer repeats, no end_to_end: a smoke
                                          # run, not figures to quote
    python benchmarks/run.py --only collect --only sweep
    python benchmarks/run.py --skip end_to_end
    python benchmarks/run.py --threads 1  # torch threads (default 2)
    FEATURESTORE_BENCH_DEVICE=cpu python benchmarks/run.py --only crosscoder  # cpu or cuda only

On a machine with a GPU, the crosscoder and sweep benchmarks add CUDA figures (TF32 and bf16
autocast) with utilisation against the GPU's own matmul rate; without one they say they skipped.

Prints the machine first, then runs each benchmark module, writes its full result (every sample,
the machine, the load average) to benchmarks/results/<name>.json, and ends with one table per
benchmark: median, min and max of each figure and its ratio to the baseline measured in the same
run, then the wall time of each benchmark and of the whole suite. Nothing is asserted: a slow
figure is information, not a failure.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from harness import (
    BenchmarkResult,
    RunOptions,
    format_table,
    load_average,
    machine_info,
    write_result,
)

from featurestore.settings import set_torch_threads

# The project's default on a 2-core machine; fixed rather than taken from the environment so that
# figures from bigger machines compare. On a machine another process keeps busy, 2 threads can be
# several times slower than 1 (each parallel region waits for a thread that is not scheduled);
# --threads 1 shows whether that is happening.
TORCH_THREADS = 2
REPEATS, QUICK_REPEATS = 5, 3
WARMUP = 1
# The 1-minute load average counts the benchmark's own threads too (and lags behind the one
# before it), so it sits between 1 and the core count on a quiet machine; above the core count
# more threads want a core than there are cores, and other processes are taking a share.
BUSY_LOAD_PER_CORE = 1.0


def benchmark_modules() -> dict[str, str]:
    """Benchmark name -> module name, for every bench_<name>.py next to this file."""
    here = Path(__file__).parent
    return {path.stem.removeprefix("bench_"): path.stem
            for path in sorted(here.glob("bench_*.py"))}


def main() -> None:
    modules = benchmark_modules()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller inputs and fewer repeats (a smoke run, not figures to quote)")
    parser.add_argument("--only", choices=sorted(modules), action="append",
                        help="run just this benchmark (repeat for several)")
    parser.add_argument("--skip", choices=sorted(modules), action="append", default=[],
                        help="leave this benchmark out (repeat for several)")
    parser.add_argument("--threads", type=int, default=TORCH_THREADS,
                        help=f"torch intra-op threads (default {TORCH_THREADS})")
    args = parser.parse_args()

    options = RunOptions(quick=args.quick, repeats=QUICK_REPEATS if args.quick else REPEATS,
                         warmup=WARMUP)
    set_torch_threads(args.threads)
    machine = machine_info()
    print(describe_machine(machine))
    print(f"options: {'quick, ' if options.quick else ''}{options.repeats} timed repeats after "
          f"{options.warmup} warm-up per figure\n", flush=True)

    suite_started = time.perf_counter()
    finished: list[tuple[BenchmarkResult, float, float, float]] = []
    for name in [n for n in (args.only or sorted(modules)) if n not in args.skip]:
        print(f"running {name} ...", flush=True)
        load_before = load_average()
        started = time.perf_counter()
        result = importlib.import_module(modules[name]).run(options)
        seconds = time.perf_counter() - started
        load_after = load_average()
        path = write_result(result, options, machine, load_before, load_after, seconds)
        print(f"  {seconds:.0f} s, results in {path}", flush=True)
        finished.append((result, load_before, load_after, seconds))
    suite_seconds = time.perf_counter() - suite_started

    cores = machine["cores"] or 1
    for result, load_before, load_after, _ in finished:
        print(f"\n{result.name}: {result.description}")
        print(f"  load average (1 min): {load_before:.1f} before, {load_after:.1f} after, on "
              f"{cores} cores")
        if max(load_before, load_after) > BUSY_LOAD_PER_CORE * cores:
            print("  the machine was busy: absolute figures are pessimistic and noisy; ratios "
                  "hold up better, as both sides of each ran under the same load")
        print(format_table(result))
    print("\nwall time per benchmark: " + ", ".join(
        f"{result.name} {seconds:.0f} s" for result, _, _, seconds in finished))
    print(f"whole suite: {suite_seconds / 60:.1f} minutes")


def describe_machine(machine: dict) -> str:
    versions = ", ".join(f"{package} {version}"
                         for package, version in machine["versions"].items())
    return (f"machine: {machine['cpu']}, {machine['cores']} cores, torch threads "
            f"{machine['torch_threads']}, GPU: {machine['gpu'] or 'none'}\n"
            f"python {machine['python']} on {machine['platform']}\n"
            f"{versions}")


if __name__ == "__main__":
    main()
