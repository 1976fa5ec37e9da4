"""The allowed values of numeric settings, shared by the command line and the Python API.

A `Range` says what a setting may be; the CLI's click types (featurestore.cli_types) refuse a bad
flag with the flag's name and the range, and the jobs and config dataclasses check the same ranges
with `Range.check`, so a notebook caller is refused with the same words. Floats must be finite:
NaN compares false with every bound and would otherwise slip through into stored results.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from featurestore.errors import FeaturestoreError

# Seeds reach numpy, whose legacy seeding takes 32-bit values, and torch.manual_seed.
MAX_SEED = 2**32 - 1
# Steps, counts and ids are stored in BIGINT columns.
MAX_INT64 = 2**63 - 1
# Threads and worker processes: far more than any machine has cores, far fewer than would
# exhaust the process table.
MAX_PARALLEL = 1024


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high` (None: unbounded), each end included unless open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def contains(self, value) -> bool:
        if isinstance(value, bool):
            return False
        if self.integer:
            if not isinstance(value, numbers.Integral):
                return False
        elif not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """e.g. 'a finite number in [0, 1)', 'an integer >= 1'."""
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            if self.integer:
                return f"{kind} in {self.low}..{self.high}"
            return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return kind

    def check(self, value, flag: str):
        """`value` if it is in the range; else a FeaturestoreError naming `flag`."""
        if not self.contains(value):
            raise FeaturestoreError(f"{flag} {value!r}: must be {self.describe()}")
        return value


# Floats
ANY = Range()
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
BETA = Range(0, 1, high_open=True)  # Adam's moment decay: 1 would never forget
COSINE = Range(-1, 1)

# Integers
COUNT = Range(1, MAX_INT64, integer=True)
NON_NEGATIVE_COUNT = Range(0, MAX_INT64, integer=True)
STEP = NON_NEGATIVE_COUNT  # a checkpoint's step, or a feature id
SEED = Range(0, MAX_SEED, integer=True)
PARALLEL = Range(1, MAX_PARALLEL, integer=True)
