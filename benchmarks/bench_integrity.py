"""What keeping the warehouse verifiable costs: checksums and a catalog copy at every commit, and
`featurestore check`.

The warehouse is bench_warehouse_scale's synthetic basis (one commit: feature_activations
partitions, trajectories, births, diffs, lineage edges), generated twice: once as featurestore
commits (recording the SHA-256 of every new table file and refreshing catalog.sqlite.backup
after the commit) and once with that post-commit work switched off, the baseline. Their commit
times are reported as details (one run each: the generation is the expensive part).

Then, timed round-robin on the first warehouse:

    check --quick            sizes, footers, row counts, artefacts present (no file read whole)
    check                    the same plus every checksum, every page decoded
    read every table file    the bytes of every live table file read once: the floor for check
    catalog copy             one refresh of catalog.sqlite.backup

Figures are MB/s of live table files (check, read) and copies/s (catalog copy).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench_warehouse_scale import (
    QUICK_CHECKPOINTS,
    QUICK_FEATURES,
    QUICK_K,
    QUICK_TOKENS,
    generate_warehouse,
)
from harness import BenchmarkResult, Figure, RunOptions, measure

from featurestore.integrity import check_warehouse, table_files
from featurestore.warehouse import Warehouse
from featurestore.writer import Writer

# A mid-size warehouse (about 10M activation rows): big enough that reading files dominates.
FEATURES, CHECKPOINTS, TOKENS, K = 4_096, 50, 8_192, 24
READ_CHUNK = 1 << 22


def live_files(root: Path) -> list[Path]:
    wh = Warehouse(root)
    con = wh._open(read_only=True)
    try:
        return [f.path for f in table_files(con, wh.data_path)]
    finally:
        con.close()


def read_all(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                total += len(chunk)
    return total


def run(options: RunOptions) -> BenchmarkResult:
    sizes = ((QUICK_FEATURES, QUICK_CHECKPOINTS, QUICK_TOKENS, QUICK_K) if options.quick
             else (FEATURES, CHECKPOINTS, TOKENS, K))
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        root = Path(tmp) / "warehouse"
        verified = generate_warehouse(root, *sizes)["timings"]
        after_commit = Writer._after_commit
        Writer._after_commit = lambda self, con, extra: None
        try:
            plain = generate_warehouse(Path(tmp) / "plain", *sizes)["timings"]
        finally:
            Writer._after_commit = after_commit

        paths = live_files(root)
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        wh = Warehouse(root)

        def check(deep: bool) -> float:
            result = check_warehouse(root, deep=deep)
            assert result.ok, [p.summary() for p in result.problems]
            return megabytes

        def copy_catalog() -> float:
            wh.refresh_catalog_backup()
            return 1.0

        figures = [
            Figure("read every table file", "MB/s", lambda: read_all(paths) / 1e6),
            Figure("check --quick", "MB/s", lambda: check(False),
                   baseline="read every table file"),
            Figure("check", "MB/s", lambda: check(True), baseline="read every table file"),
            Figure("catalog copy", "copies/s", copy_catalog),
        ]
        measurements = measure(figures, options)
        catalog_kb = Path(wh.catalog.target).stat().st_size / 1e3
    return BenchmarkResult(
        name="integrity",
        description=f"checksums, catalog copy and check on {len(paths)} table files "
                    f"({megabytes:.0f} MB) of a {sizes[0]}-feature x {sizes[1]}-checkpoint "
                    "basis",
        measurements=measurements,
        config={"features": sizes[0], "checkpoints": sizes[1], "tokens": sizes[2], "k": sizes[3],
                "table_files": len(paths), "table_megabytes": megabytes,
                "catalog_kilobytes": catalog_kb},
        details={"commit_s_with_checksums_and_copy": verified["commit_s"],
                 "commit_s_without": plain["commit_s"]},
        notes=[f"commit of the whole basis: {verified['commit_s']:.2f} s with checksums and the "
               f"catalog copy, {plain['commit_s']:.2f} s without (one run each)",
               f"catalog: {catalog_kb:.0f} kB"],
    )
