"""Python functions callable from SQL on every `featurestore.connect()` connection.

SQL macros (sql/macros/) cover what plain SQL can say; these are for what needs Python or the
warehouse's location, which a macro stored in the catalog cannot know. They belong to the core
with the sql/ files because views use them (frequency_births calls dominant_frequency).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb

if TYPE_CHECKING:
    from featurestore.warehouse import Warehouse


def register_sql_functions(con: duckdb.DuckDBPyConnection, warehouse: Warehouse) -> None:
    def fs_path(path: str) -> str:
        """Absolute location of a path stored in a table (they are relative to the root)."""
        return str(warehouse.path(path))

    con.create_function("fs_path", fs_path, ["VARCHAR"], "VARCHAR")
    # Both return NULL for some inputs (an even length, a constant): DuckDB must be told so.
    con.create_function("fourier_shares", fourier_shares, ["DOUBLE[]"], "DOUBLE[]",
                        null_handling="special")
    con.create_function("dominant_frequency", dominant_frequency, ["DOUBLE[]"], "INTEGER",
                        null_handling="special")


def fourier_shares(values: list[float] | None) -> list[float] | None:
    """fourier_shares(values): a function over Z_p (a list of p values, p odd, e.g. a feature's
    answer_profile) split by frequency: element 1 the constant's share of the squared norm,
    element k + 1 frequency k's (cos and sin together); sums to 1, or all 0 for a zero list.

        SELECT feature_id, fourier_shares(answer_profile) FROM feature_frequencies
    """
    from featurestore.grokking import fourier_shares as shares

    if values is None or len(values) % 2 == 0 or any(v is None for v in values):
        return None  # the real Fourier basis over Z_p pairs cos and sin: p must be odd
    return shares(values).tolist()


def dominant_frequency(values: list[float] | None) -> int | None:
    """dominant_frequency(values): the non-constant frequency k holding the largest share of
    fourier_shares(values); NULL for a constant or zero list."""
    found = fourier_shares(values)
    if found is None or sum(found[1:]) < 1e-12:
        return None
    return max(range(1, len(found)), key=lambda k: found[k])
