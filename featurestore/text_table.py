"""Plain aligned text tables, as the CLI and the demo summary print them."""

from __future__ import annotations


def format_table(header: list[str], rows: list[list[str]], max_width: int = 60) -> str:
    """A plain aligned text table, cells cut at max_width, with its row count below."""
    cells = [[c if len(c) <= max_width else c[: max_width - 1] + "…" for c in row]
             for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)
