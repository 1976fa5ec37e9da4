"""What every export shares: query rows ready for JSON, and files written atomically.

Graphs, plots, the artifact layout and reports all turn warehouse queries into files that other
tools read, so they all need rows as plain dicts whose values JSON can hold, and files that a
reader sees whole or not at all.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from featurestore.warehouse import records


def json_ready(value):
    """`value` with NaN and infinities as None (JSON has neither, and strict parsers reject
    them) and DuckDB's Decimals (HUGEINT sums, DECIMAL arithmetic) as int or float."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    return value


def json_records(con, sql: str, params: list | None = None) -> list[dict]:
    """A query's rows as dicts of JSON-ready values."""
    return [json_ready(row) for row in records(con, sql, params)]


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Write `path` through `write(temporary path)` in the same folder, fsynced, then renamed
    over `path`: a reader sees the old file or the new one, never part of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary = Path(temporary)
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the file from other users
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
