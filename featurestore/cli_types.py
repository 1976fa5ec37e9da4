"""Click types for the CLI's flags, built on featurestore.ranges.

Click names the flag in its error ("Invalid value for '--lr': nan is not a finite number > 0"),
so every numeric flag gets a type with its range: click.IntRange for integers, FiniteFloat for
floats (click's FloatRange lets NaN through, since NaN compares false with every bound). Flags
whose text stands for another value (LAST, an age) convert to what the Python API takes.
"""

from __future__ import annotations

import click

from featurestore import ranges
from featurestore.ranges import Range


class FiniteFloat(click.FloatRange):
    """A finite float (no nan or inf) within a Range. A FloatRange, so that --help shows the
    range as it does for integers."""

    def __init__(self, allowed: Range = ranges.ANY):
        super().__init__(allowed.low, allowed.high, allowed.low_open, allowed.high_open)
        self.allowed = allowed

    def convert(self, value, param, ctx) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not self.allowed.contains(number):
            self.fail(f"{value} is not {self.allowed.describe()}", param, ctx)
        return number

    def _describe_range(self) -> str:  # click's hook for the help text
        return self.allowed.describe()


def int_range(allowed: Range) -> click.IntRange:
    return click.IntRange(allowed.low, allowed.high)


class StepOrLast(click.IntRange):
    """A checkpoint step, or LAST for the last one: -1, as the Python API takes it."""

    name = "step"

    def __init__(self):
        super().__init__(ranges.STEP.low, ranges.STEP.high)

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, str) and value.strip().upper() == "LAST":
            return -1
        try:
            int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r}: give a checkpoint step or LAST", param, ctx)
        return super().convert(value, param, ctx)

    def get_metavar(self, param, ctx=None) -> str:
        return "STEP|LAST"


class Age(click.ParamType):
    """An age such as 7d, 12h, 30m, 45s or 0, as a timedelta."""

    name = "age"

    def convert(self, value, param, ctx):
        from featurestore.compaction import parse_age
        from featurestore.errors import FeaturestoreError

        if not isinstance(value, str):
            return value
        try:
            return parse_age(value)
        except FeaturestoreError as error:
            self.fail(str(error), param, ctx)


COUNT = int_range(ranges.COUNT)
NON_NEGATIVE_COUNT = int_range(ranges.NON_NEGATIVE_COUNT)
STEP = int_range(ranges.STEP)
SEED = int_range(ranges.SEED)
PARALLEL = int_range(ranges.PARALLEL)

ANY = FiniteFloat()
POSITIVE = FiniteFloat(ranges.POSITIVE)
NON_NEGATIVE = FiniteFloat(ranges.NON_NEGATIVE)
FRACTION = FiniteFloat(ranges.FRACTION)
BETA = FiniteFloat(ranges.BETA)
COSINE = FiniteFloat(ranges.COSINE)
STEP_OR_LAST = StepOrLast()
AGE = Age()
