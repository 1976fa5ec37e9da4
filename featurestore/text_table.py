"""Plain aligned text tables, as the CLI and the demo summary print them."""

from __future__ import annotations

import json
from datetime import date, datetime


def format_table(header: list[str], rows: list[list[str]], max_width: int = 60) -> str:
    """A plain aligned text table, cells cut at max_width, with its row count below."""
    cells = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in row]
             for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def format_cell(value) -> str:
    """One value as a table cell: None empty, floats to 6 significant digits, lists and dicts as
    JSON."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=json_default)
    return str(value)


def json_default(value):
    """`json.dumps(default=...)` for what results hold besides JSON types: dates as ISO text,
    numpy scalars as numbers, anything else as its str()."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)
