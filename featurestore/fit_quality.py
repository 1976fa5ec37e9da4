"""One quality policy for every fitted dictionary: train-crosscoder and shared-feature-fit.

Both jobs evaluate the trained dictionary once on held tokens and write a report: the explained
variance at every source it was fitted on (a checkpoint of a shared basis, a source of a
crosscoder), the mean share of latents active per token, and the share never active. `FitBounds`
checks the report; the same three flags set it in both jobs, with the same defaults.

A fit that misses a bound registers nothing in the catalog. Its weights and its report are kept
for inspection in <warehouse>/rejected/<basis>/ (written whole in a temp folder and renamed into
place, so a reader never sees half of it); the next rejected fit of that name replaces it, and
registering a basis of that name removes it. The error names the folder, every bound missed by
how much, and the flag that relaxes it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # the warehouse (duckdb, pyarrow) is imported only when a fit is rejected
    from featurestore.warehouse import Warehouse

from featurestore import ranges
from featurestore.errors import FitRejectedError

REJECTED_DIR = "rejected"
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class FitBounds:
    """What a dictionary must reach before anything is claimed from it."""

    min_explained_variance: float = 0.8  # at every fitted source / checkpoint
    max_active_fraction: float = 0.05  # mean share of latents active per token
    max_dead_fraction: float = 0.5  # share of latents never active on the evaluation tokens

    def __post_init__(self) -> None:
        # A NaN bound compares false with every value: it would pass every fit. (A bound no fit
        # can meet, such as a negative fraction, is allowed: it keeps every fit aside.)
        ranges.ANY.check(self.min_explained_variance, "--min-explained-variance")
        ranges.ANY.check(self.max_active_fraction, "--max-active-fraction")
        ranges.ANY.check(self.max_dead_fraction, "--max-dead-fraction")

    def failures(self, report: dict, unit: str, unfitted: list[str] = ()) -> list[str]:
        """The bounds the report misses, each with its margin and flag. `unit` names what the
        report's explained_variance is keyed by ("step", "source"). Explained variance is bounded
        at the sources the dictionary was fitted on: one in `unfitted` (a shared basis's step 0
        with --init-weight 0) is reported, not bounded."""
        failed = []
        fitted = {key: ev for key, ev in report["explained_variance"].items()
                  if key not in unfitted}
        if fitted:
            worst_key, worst = min(fitted.items(), key=lambda kv: kv[1])
            if worst < self.min_explained_variance:
                failed.append(
                    f"explained variance {worst:.3f} at {unit} {worst_key} is below "
                    f"--min-explained-variance {self.min_explained_variance} "
                    f"(short by {self.min_explained_variance - worst:.3f})")
        if report["active_fraction"] > self.max_active_fraction:
            failed.append(
                f"mean active fraction {report['active_fraction']:.4f} is above "
                f"--max-active-fraction {self.max_active_fraction} "
                f"(over by {report['active_fraction'] - self.max_active_fraction:.4f})")
        if report["dead_fraction"] > self.max_dead_fraction:
            failed.append(
                f"dead fraction {report['dead_fraction']:.3f} is above --max-dead-fraction "
                f"{self.max_dead_fraction} (over by "
                f"{report['dead_fraction'] - self.max_dead_fraction:.3f})")
        return failed


def rejected_path(warehouse: Warehouse, basis: str) -> Path:
    """Where a rejected fit of `basis` keeps its weights and report."""
    return warehouse.root / REJECTED_DIR / basis


def reject_fit(warehouse: Warehouse, job: str, basis: str, report: dict, failures: list[str],
               save_weights: Callable[[Path], None], details: dict, advice: str) -> NoReturn:
    """Keep a fit that missed a bound under rejected/<basis>/ and raise FitRejectedError.

    save_weights(folder) writes the weights; report.json gets the report, the bounds missed and
    `details` (the job's settings). `advice`: what else the user can do, after the flags."""
    from featurestore.writer import utc_now

    folder = keep_rejected(warehouse, basis, save_weights, {
        "basis": basis, "job": job, "rejected_at": utc_now().isoformat(),
        "failures": failures, "fit_quality": report, **details})
    raise FitRejectedError(
        f"{job} {basis}: the fit is too poor to support claims, so nothing was registered:\n"
        "  - " + "\n  - ".join(failures) + f"\nIts weights and report are kept in {folder} "
        f"({REPORT_FILE}). {advice} To accept this fit, relax the bound with the flag named above."
    )


def keep_rejected(warehouse: Warehouse, basis: str, save_weights: Callable[[Path], None],
                  report: dict) -> Path:
    """Write rejected/<basis>/ whole in a temp folder beside it, then rename it into place,
    replacing an earlier rejected fit of the same name."""
    parent = warehouse.root / REJECTED_DIR
    parent.mkdir(parents=True, exist_ok=True)
    staged = parent / f".{basis}-{uuid.uuid4().hex}"
    staged.mkdir()
    final, old = parent / basis, None
    try:
        save_weights(staged)
        (staged / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        for file in staged.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            old = parent / f".{basis}-old-{uuid.uuid4().hex}"
            os.rename(final, old)
        os.rename(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        if old is not None and not final.exists():
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
