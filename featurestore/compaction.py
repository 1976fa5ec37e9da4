"""`featurestore compact`: expire old snapshots and delete what no remaining snapshot reads.

Nothing a job replaces is deleted when it commits: the old rows' files and the old artefact
folders stay readable at older snapshots (time travel, and notebooks opened before the commit).
Compaction is what reclaims them, with DuckLake's own maintenance functions for the table files:

1. merge small table files into larger ones (ducklake_merge_adjacent_files);
2. expire snapshots older than `older_than` (ducklake_expire_snapshots); the newest snapshot is
   never expired;
3. delete the table files only expired snapshots read (ducklake_cleanup_old_files) and files no
   snapshot knows, e.g. from a killed job (ducklake_delete_orphaned_files), when older than
   `older_than`;
4. delete artefact folders (runs/, activations/, bases/ under a versioned name) that no
   remaining snapshot points at, and scratch folders of jobs, when older than `older_than`.

The age guard on every deletion keeps what a running job has written but not yet committed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from featurestore.errors import FeaturestoreError
from featurestore.integrity import forget_checksums, record_checksums
from featurestore.lake import LAKE
from featurestore.results import Result
from featurestore.scratch import older, sweep
from featurestore.warehouse import Warehouse
from featurestore.writer import VERSION_SUFFIX, utc_now

DEFAULT_OLDER_THAN = timedelta(days=7)
# Tables whose `path` column points at artefact folders.
ARTEFACT_TABLES = ("checkpoints", "activation_sets", "bases")
ARTEFACT_ROOTS = ("runs", "activations", "bases")


@dataclass
class CompactResult(Result):
    older_than_seconds: float
    dry_run: bool
    snapshots_expired: int
    snapshots_kept: int
    table_files_deleted: int
    orphan_files_deleted: int
    artefact_folders_deleted: list[str]
    scratch_folders_deleted: int

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"expired {self.snapshots_expired} snapshots (kept {self.snapshots_kept}); "
                f"{verb} {self.table_files_deleted} table files, {self.orphan_files_deleted} "
                f"orphaned files, {len(self.artefact_folders_deleted)} artefact folders and "
                f"{self.scratch_folders_deleted} scratch folders")


def parse_age(text: str) -> timedelta:
    """'7d', '12h', '30m', '45s' or '0' as a timedelta."""
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    value = text.strip().lower()
    if value == "0":
        return timedelta(0)
    if len(value) < 2 or value[-1] not in units or not value[:-1].replace(".", "", 1).isdigit():
        raise FeaturestoreError(f"--older-than {text!r}: give a number and a unit, e.g. 7d, "
                                "12h, 30m or 0 (everything but the newest snapshot)")
    return timedelta(**{units[value[-1]]: float(value[:-1])})


def compact_warehouse(warehouse: str | None = None, older_than: timedelta = DEFAULT_OLDER_THAN,
                      dry_run: bool = False, catalog: str | None = None) -> CompactResult:
    wh = Warehouse(warehouse, catalog)
    if not wh.exists():
        raise wh._missing()
    cutoff = utc_now() - older_than
    con = wh._open(read_only=False)
    try:
        before = _snapshot_ids(con)
        if not dry_run:
            con.execute("CALL ducklake_merge_adjacent_files(?)", [LAKE])
            for snapshot in set(_snapshot_ids(con)) - set(before):  # the merged files
                record_checksums(con, wh.data_path, snapshot)
        expired = con.execute("CALL ducklake_expire_snapshots(?, older_than => ?, dry_run => ?)",
                              [LAKE, cutoff, dry_run]).fetchall()
        cleaned = con.execute("CALL ducklake_cleanup_old_files(?, older_than => ?, "
                              "dry_run => ?)", [LAKE, cutoff, dry_run]).fetchall()
        orphans = con.execute("CALL ducklake_delete_orphaned_files(?, older_than => ?, "
                              "dry_run => ?)", [LAKE, cutoff, dry_run]).fetchall()
        kept = _snapshot_ids(con) if not dry_run else sorted(
            set(before) - {int(row[0]) for row in expired})
        referenced = _referenced_folders(con, kept)
        if not dry_run:
            forget_checksums(con, wh.data_path)
    finally:
        con.close()
    if not dry_run:
        wh.refresh_catalog_backup()
        if wh.catalog_backup is not None:  # copies of the catalog that a killed job left half-made
            for temp in wh.catalog_backup.parent.glob(f"{wh.catalog_backup.name}.tmp-*"):
                if older(temp, older_than):
                    temp.unlink(missing_ok=True)
    folders = [f for f in _artefact_folders(wh.root)
               if f not in referenced and older(wh.path(f), older_than)]
    # Scratch of jobs no longer running (a running job holds its lock; see featurestore.scratch)
    scratch = sweep(wh.tmp_dir, lambda name: name.startswith("job-"), lockless_age=older_than,
                    min_age=older_than, dry_run=dry_run)
    if not dry_run:
        for folder in folders:
            shutil.rmtree(wh.path(folder), ignore_errors=True)
    return CompactResult(older_than.total_seconds(), dry_run, len(expired), len(kept),
                         len(cleaned), len(orphans), sorted(folders), len(scratch))


def _snapshot_ids(con) -> list[int]:
    return [int(s) for (s,) in con.execute(
        f"SELECT snapshot_id FROM {LAKE}.snapshots() ORDER BY snapshot_id").fetchall()]


def _referenced_folders(con, snapshots: list[int]) -> set[str]:
    """Versioned artefact folders (relative to the root) that a row of any snapshot points at."""
    tables = {t for (t,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ?", [LAKE]).fetchall()}
    referenced: set[str] = set()
    for snapshot in snapshots:
        for table in ARTEFACT_TABLES:
            if table not in tables:
                continue
            try:
                paths = con.execute(f"SELECT DISTINCT path FROM {LAKE}.{table} "
                                    f"AT (VERSION => {snapshot}) WHERE path IS NOT NULL").fetchall()
            except Exception:  # the table did not exist yet at that snapshot
                continue
            for (path,) in paths:
                referenced.update(_versioned_ancestors(path))
    return referenced


def _versioned_ancestors(path: str) -> list[str]:
    """runs/demo@V/checkpoints/step_1 -> ['runs/demo@V']."""
    parts = Path(path).parts
    return [str(Path(*parts[:i + 1])) for i, part in enumerate(parts)
            if VERSION_SUFFIX.search(part)]


def _artefact_folders(root: Path) -> list[str]:
    """Every versioned folder under runs/, activations/ and bases/, relative to the root."""
    found = []
    for top in ARTEFACT_ROOTS:
        for folder, children, _ in os.walk(root / top):
            for child in list(children):
                if VERSION_SUFFIX.search(child):
                    found.append(str((Path(folder) / child).relative_to(root)))
                    children.remove(child)  # do not descend into an artefact
    return found
