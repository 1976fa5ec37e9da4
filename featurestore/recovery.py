"""`featurestore catalog restore`: bring back a damaged or lost SQLite catalog from a copy.

Every commit refreshes a copy of the catalog beside it (catalog.sqlite.backup), and
`featurestore catalog backup` makes one on demand. The table files and artefacts never change
once written, so a copy of the catalog is all a restore needs: the warehouse comes back at the
snapshot of the copy. Files written by jobs committed after it are unknown to the restored
catalog (`featurestore compact` deletes them as orphans); those jobs are run again.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from featurestore.errors import FeaturestoreError
from featurestore.lake import prepare_sqlite, sqlite_catalog_damage
from featurestore.results import Result
from featurestore.warehouse import Warehouse
from featurestore.writer import utc_now


@dataclass
class RestoreResult(Result):
    catalog: str
    restored_from: str
    damaged_copy: str | None  # where the catalog it replaced was kept, if there was one
    snapshot: int  # the newest snapshot of the restored catalog
    snapshot_time: str
    job: str | None
    unknown_table_files: int  # files of jobs committed after the copy: run those jobs again

    def summary(self) -> str:
        kept = f"; the replaced catalog is at {self.damaged_copy}" if self.damaged_copy else ""
        lines = [f"restored {self.catalog} from {self.restored_from}: snapshot "
                 f"{self.snapshot} ({self.job}, {self.snapshot_time}){kept}"]
        if self.unknown_table_files:
            lines.append(f"{self.unknown_table_files} table files were written after that "
                         "snapshot: run the jobs committed since then again (`featurestore "
                         "compact` deletes those files)")
        return "\n".join(lines)


def restore_catalog(warehouse: str | os.PathLike | None = None, *, catalog: str | None = None,
                    source: str | os.PathLike | None = None, force: bool = False) -> RestoreResult:
    """Replace the SQLite catalog with `source` (default: the automatic backup). A catalog that
    is not damaged is replaced only with `force`, since the snapshots after the copy are lost;
    the replaced catalog is kept beside it as catalog.sqlite.damaged-<time>."""
    wh = Warehouse(warehouse, catalog)
    if wh.catalog.kind != "sqlite":
        raise FeaturestoreError(
            "catalog restore replaces a SQLite catalog; restore a PostgreSQL catalog with "
            "pg_restore (or point-in-time recovery) of its database")
    target = Path(wh.catalog.target)
    copy = Path(source).expanduser().resolve() if source else wh.catalog_backup
    if not copy.exists():
        raise FeaturestoreError(
            f"no catalog copy at {copy}: give --from FILE, a copy made with `featurestore "
            "catalog backup`" if source is None else f"--from {copy} does not exist")
    if damage := sqlite_catalog_damage(copy):
        raise FeaturestoreError(f"--from {copy} cannot be restored: {damage}")
    if target.exists() and not force and wh._damage() is None:
        raise FeaturestoreError(
            f"the catalog {target} is not damaged: restoring {copy} over it would drop every "
            "snapshot committed after that copy. Pass --force to do it anyway.")
    damaged_copy = None
    if target.exists():
        stamp = utc_now().strftime("%Y%m%dT%H%M%S")
        damaged_copy = target.with_name(f"{target.name}.damaged-{stamp}")
        os.replace(target, damaged_copy)
    for suffix in ("-wal", "-shm", "-journal"):  # they belong to the catalog just set aside
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    temp = target.with_name(f"{target.name}.restoring")
    shutil.copyfile(copy, temp)
    prepare_sqlite(temp)  # WAL again, as every catalog featurestore creates
    os.replace(temp, target)
    return _describe(wh, copy, damaged_copy)


def _describe(wh: Warehouse, copy: Path, damaged_copy: Path | None) -> RestoreResult:
    from featurestore.integrity import table_files

    con = wh._open(read_only=True)
    try:
        snapshot = wh.current_snapshot(con)
        (moment, job) = con.execute(
            "SELECT snapshot_time, commit_message FROM lake.snapshots() WHERE snapshot_id = ?",
            [snapshot]).fetchone()
        known = {f.path.resolve() for f in table_files(con, wh.data_path, live=False)}
    finally:
        con.close()
    on_disk = {p.resolve() for p in wh.data_path.rglob("*.parquet")} if wh.data_path.exists() \
        else set()
    return RestoreResult(wh.catalog.target, str(copy), damaged_copy and str(damaged_copy),
                         snapshot, str(moment), job, len(on_disk - known))
