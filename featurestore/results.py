"""The base of every job's and export's result: a dataclass that prints itself as JSON."""

from __future__ import annotations

from dataclasses import asdict


class Result:
    """Mixed into a result dataclass: `to_dict()` is what `--json` prints."""

    def to_dict(self) -> dict:
        return asdict(self)
