"""A warehouse written by the previous release (schema 2) converts to DuckLake in place."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.errors import SchemaVersionError
from featurestore.migrate import migrate_warehouse
from featurestore.schema import table_specs
from featurestore.warehouse import Warehouse, connect

from .conftest import query

FIXTURE = Path(__file__).parent / "data" / "schema2_warehouse"

# The live rows of every table, as the previous release's `featurestore tables` counted them
# (tests/data/schema2_warehouse.md); tables not listed were empty.
LIVE_ROWS = {
    "runs": 1, "checkpoints": 16, "activation_sets": 6, "bases": 1, "features": 32,
    "decoder_directions": 32, "training_metrics": 60, "token_strings": 69, "trajectories": 192,
    "feature_activations": 12236, "feature_directions": 192, "feature_examples": 1359,
    "split_profiles": 768, "checkpoint_summary": 6, "births": 64, "birth_summary": 10,
    "diffs": 32, "schema_version": 1,
}


@pytest.fixture
def old_warehouse(tmp_path) -> Path:
    """A copy of the fixture, its catalog unpacked: the 3 MB DuckDB file is kept gzipped (70 kB)
    in git, byte for byte as the previous release wrote it."""
    root = tmp_path / "old"
    shutil.copytree(FIXTURE, root)
    packed = root / "featurestore.duckdb.gz"
    with gzip.open(packed) as source, open(root / "featurestore.duckdb", "wb") as target:
        shutil.copyfileobj(source, target)
    packed.unlink()
    return root


def test_readers_of_an_old_warehouse_are_told_to_migrate(old_warehouse):
    with pytest.raises(SchemaVersionError, match="schema 2.*featurestore catalog migrate"):
        connect(old_warehouse)


def test_migrate_keeps_every_table_and_artefact(old_warehouse):
    # The same rows as the old files hold, counted here with pyarrow alone: for each table its
    # newest file (each partition's newest, for feature_activations).
    step_300 = [f for f in (old_warehouse / "tables" / "feature_activations").rglob("*.parquet")
                if "step=300" in str(f)]
    assert len(step_300) == 2  # the old release's replaced partition is still on disk
    newest_300 = pq.read_table(max(step_300, key=lambda f: f.name))

    result = CliRunner().invoke(cli, ["--warehouse", str(old_warehouse), "catalog", "migrate"])
    assert result.exit_code == 0, result.output
    assert "converted" in result.output and "schema2-backup" in result.output

    counts = {t: query(old_warehouse, f"SELECT count(*) FROM {t}")[0][0] for t in table_specs()}
    assert counts == {t: LIVE_ROWS.get(t, 0) for t in table_specs()}
    assert query(old_warehouse, "SELECT version FROM schema_version") == [(3,)]
    got = query(old_warehouse, "SELECT feature_id, sequence_id, position, value FROM "
                               "feature_activations WHERE step = 300 ORDER BY ALL")
    assert got == sorted(zip(*(newest_300[c].to_pylist()
                               for c in ("feature_id", "sequence_id", "position", "value"))))
    # Artefacts stayed where the rows point.
    for table in ("checkpoints", "activation_sets", "bases"):
        for (path,) in query(old_warehouse, f"SELECT path FROM {table}"):
            assert (old_warehouse / path).exists(), (table, path)
    assert sorted(p.name for p in (old_warehouse / "schema2-backup").iterdir()) == [
        "featurestore.duckdb", "tables"]
    assert [s.job for s in Warehouse(old_warehouse).snapshots(limit=1)] == ["catalog migrate"]
    # Run again: nothing left to convert.
    assert not migrate_warehouse(old_warehouse).migrated


def test_a_job_converts_an_old_warehouse_before_writing(old_warehouse, capsys):
    from featurestore.ingest.birth_analysis import analyze_births

    analyze_births("tiny-l1", persistence=3, permutations=1, warehouse=old_warehouse)
    assert "converting" in capsys.readouterr().err
    rules = query(old_warehouse, "SELECT DISTINCT persistence FROM births ORDER BY 1")
    assert rules == [(2,), (3,), (4,)]  # the two old rules kept, the new one added
