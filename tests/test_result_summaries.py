"""Results render themselves: a command prints `result.summary()`, so a notebook's
`print(result.summary())` shows what the CLI shows, and every result the CLI prints has one."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.results import Result

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"featurestore": "featurestore", "ingest": "featurestore.ingest",
            "queries": "featurestore.queries"}

# Results no command prints: the jobs that return them run inside `experiment grokking`, whose
# own result is what the CLI shows.
NOT_PRINTED = {
    "GrokkingRunResult": "returned by train_grokking_run, a step of experiment grokking",
    "GrokkingReportResult": "returned by write_grokking_report, a step of experiment grokking",
}


def run(args, warehouse):
    return CliRunner().invoke(cli, ["--warehouse", str(warehouse), *args],
                              catch_exceptions=False)


def result_classes() -> list[type]:
    """Every subclass of Result in the source tree, found by importing each module that names
    `Result` as a base (so a new result is checked without being listed here)."""
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            if "(Result)" in path.read_text():
                importlib.import_module(f"{package}.{path.stem}")
    found, todo = [], list(Result.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_every_printed_result_has_its_own_summary():
    classes = result_classes()
    assert len(classes) > 20  # the discovery found the results, not an empty list
    missing = [cls.__qualname__ for cls in classes
               if cls.summary is Result.summary and cls.__name__ not in NOT_PRINTED]
    assert not missing, f"results without summary(): {missing}"
    names = {cls.__name__ for cls in classes}
    assert set(NOT_PRINTED) <= names, "NOT_PRINTED names a result that is gone"


def test_check_prints_its_summary(trained_warehouse):
    from featurestore.integrity import check_warehouse

    printed = run(["check", "--quick"], trained_warehouse)
    assert printed.exit_code == 0
    assert printed.output == check_warehouse(trained_warehouse, deep=False).summary() + "\n"


def test_compact_dry_run_prints_its_summary(warehouse_copy):
    from datetime import timedelta

    from featurestore.compaction import compact_warehouse

    printed = run(["compact", "--older-than", "0", "--dry-run"], warehouse_copy)
    expected = compact_warehouse(warehouse_copy, timedelta(0), dry_run=True).summary()
    assert printed.output == expected + "\n"


def test_feature_compare_prints_its_summary(analysed_warehouse, tmp_path):
    """A summary with a table: the header line and the aligned rows, as the command prints."""
    from featurestore.ingest.feature_compare import compare_features
    from featurestore.warehouse import connect

    root = tmp_path / "warehouse"
    shutil.copytree(analysed_warehouse, root)  # the comparison rewrites its diffs rows
    con = connect(root)
    (first, last), = con.execute(
        "SELECT min(step), max(step) FROM trajectories WHERE basis = 'tiny-l2'").fetchall()
    con.close()
    printed = run(["feature-compare", "--basis", "tiny-l2", "--source", str(first),
                   "--target", str(last), "--top", "5"], root)
    result = compare_features("tiny-l2", first, last, warehouse=root, top=5)
    assert printed.output == result.summary() + "\n"
    assert printed.output.count("\n") > 5  # the table came with it
