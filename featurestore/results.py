"""The base of every job's and export's result: a dataclass that prints itself as JSON or as
the text the CLI shows."""

from __future__ import annotations

from dataclasses import asdict


class Result:
    """Mixed into a result dataclass: `to_dict()` is what `--json` prints, `summary()` what the
    command prints without it."""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """The result as the command prints it: one or more lines, without a final newline, so
        `print(result.summary())` in a notebook shows what the CLI shows.

        Each subclass words its own: a generic `field: value` listing would bury the numbers
        that matter under lists of rows and paths."""
        raise NotImplementedError(f"{type(self).__name__} does not define summary()")
