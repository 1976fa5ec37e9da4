"""`featurestore check`: is every file the warehouse serves what its catalog says it is?

A warehouse is a catalog plus files: table files (Parquet, written by DuckLake or by featurestore's
partition writers) and artefact folders (checkpoints, activation sets, basis weights). A disk
fault, a half-finished copy or a hand edit can damage any of them. `check_warehouse` reads every
file the newest snapshot serves and compares it with what was recorded when it was written:

- table files: present, the byte size the catalog recorded, the SHA-256 recorded right after the
  commit that wrote it (`record_checksums`), a readable footer with the catalog's row count, and
  every page decodable;
- artefacts: every path a row points at exists; safetensors files are whole; an activation set
  holds the tokens its row fingerprints; a basis's `decoder_directions` rows are its weights.

Each problem names the command that wrote the damaged file (from the snapshot's commit info), so
the fix is to run it again. A damaged table file cannot be read, and so cannot be replaced by a
job either (DuckLake reads a file to delete rows from it): `repair` takes damaged table files out
of the newest snapshot in one new snapshot, exactly as DuckLake drops a file whose rows are all
deleted. Their rows are gone from then on (they were unreadable already); older snapshots and
every other file are untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq

from featurestore.errors import FeaturestoreError
from featurestore.lake import LAKE
from featurestore.results import Result
from featurestore.warehouse import Warehouse, records
from featurestore.writer import commit_info

METADATA = f"__ducklake_metadata_{LAKE}"  # where DuckLake attaches the catalog's own tables
CHECKSUMS = "featurestore_file_checksums"  # ours, kept beside DuckLake's tables in the catalog
HASH_CHUNK = 1 << 22
# Decoder directions are stored as FLOAT[]; the weights are float32 too, so they agree exactly
# unless one of them changed. The tolerance only absorbs the float64 norm in between.
DIRECTION_TOLERANCE = 1e-6


@dataclass(frozen=True)
class TableFile:
    """One Parquet file a table's snapshot reads: a data file or a delete file."""

    table: str
    kind: str  # 'data' or 'delete'
    file_id: int  # DuckLake's id; data and delete files draw from one counter
    data_file_id: int  # the data file (for a delete file: the data file it deletes from)
    path: Path
    relative: str  # to the warehouse's data folder: the key of its checksum
    size: int
    rows: int  # rows the catalog says it holds (for a delete file: rows it deletes)
    snapshot: int  # the snapshot it belongs to


def table_files(con: duckdb.DuckDBPyConnection, data_path: Path, live: bool = True,
                ids: tuple[int, int] | None = None) -> list[TableFile]:
    """The table files the newest snapshot reads (or, `live=False`, every file the catalog
    knows; `ids`: only those with a file id in [low, high)), from the catalog's own tables;
    their paths are relative to the schema's, the table's, then the data folder."""
    files = []
    for kind, table, id_column, count in (
            ("data", "ducklake_data_file", "data_file_id", "record_count"),
            ("delete", "ducklake_delete_file", "delete_file_id", "delete_count")):
        where = "f.end_snapshot IS NULL" if live else "true"
        if ids is not None:
            where += f" AND f.{id_column} >= {int(ids[0])} AND f.{id_column} < {int(ids[1])}"
        rows = con.execute(f"""
            SELECT t.table_name, f.{id_column}, f.data_file_id, f.path, f.path_is_relative,
                   f.file_size_bytes, f.{count}, f.begin_snapshot, s.path, t.path
            FROM {METADATA}.{table} f
            JOIN {METADATA}.ducklake_table t
              ON t.table_id = f.table_id AND t.end_snapshot IS NULL
            JOIN {METADATA}.ducklake_schema s
              ON s.schema_id = t.schema_id AND s.end_snapshot IS NULL
            WHERE {where}
            ORDER BY t.table_name, f.path""").fetchall()
        for (name, file_id, data_file_id, path, relative, size, count_, begin, schema_path,
             table_path) in rows:
            relative_path = f"{schema_path}{table_path}{path}" if relative else path
            files.append(TableFile(name, kind, int(file_id), int(data_file_id),
                                   data_path / relative_path if relative else Path(path),
                                   relative_path, int(size), int(count_ or 0), int(begin)))
    return files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _ensure_checksum_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(f"CREATE TABLE IF NOT EXISTS {METADATA}.{CHECKSUMS} "
                "(path VARCHAR PRIMARY KEY, file_size_bytes BIGINT, sha256 VARCHAR, "
                "snapshot_id BIGINT)")


def record_checksums(con: duckdb.DuckDBPyConnection, data_path: Path, snapshot: int) -> int:
    """Record the SHA-256 of every live table file that `snapshot`'s commit created, for `check`
    to compare with.

    Called right after the commit (DuckLake names its files only as it commits them); a job
    killed in between leaves files without a checksum, which `check` verifies the other ways.
    A commit's files are those whose ids it drew (DuckLake may file a rewritten delete file
    under an earlier snapshot, so the snapshot a file belongs to does not say who wrote it).
    """
    (low, high) = con.execute(f"""
        SELECT (SELECT next_file_id FROM {METADATA}.ducklake_snapshot
                WHERE snapshot_id < s.snapshot_id ORDER BY snapshot_id DESC LIMIT 1),
               s.next_file_id
        FROM {METADATA}.ducklake_snapshot s WHERE s.snapshot_id = ?""", [snapshot]).fetchone()
    files = table_files(con, data_path, ids=(low or 0, high))
    if not files:
        return 0
    _ensure_checksum_table(con)
    rows = [(f.relative, f.size, file_sha256(f.path), snapshot) for f in files]
    con.executemany(f"INSERT INTO {METADATA}.{CHECKSUMS} VALUES (?, ?, ?, ?)", rows)
    return len(rows)


def forget_checksums(con: duckdb.DuckDBPyConnection, data_path: Path) -> None:
    """Drop the checksums of files the catalog no longer knows (deleted by compaction)."""
    known = [f.relative for f in table_files(con, data_path, live=False)]
    try:
        con.execute(f"DELETE FROM {METADATA}.{CHECKSUMS} WHERE NOT list_contains(?, path)",
                    [known])
    except duckdb.CatalogException:  # no checksum recorded yet
        pass


def _recorded_checksums(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    try:
        return dict(con.execute(f"SELECT path, sha256 FROM {METADATA}.{CHECKSUMS}").fetchall())
    except duckdb.CatalogException:  # no job committed since checksums were introduced
        return {}


# -- what is wrong with one file ----------------------------------------------------------------

def table_file_problem(file: TableFile, checksum: str | None, deep: bool) -> str | None:
    """Why `file` cannot be served as the catalog recorded it, or None."""
    if not file.path.exists():
        return "the file is missing"
    size = file.path.stat().st_size
    if size != file.size:
        return f"it is {size} bytes, but {file.size} were written"
    if deep and checksum is not None and file_sha256(file.path) != checksum:
        return "its contents changed since it was written (SHA-256 differs)"
    try:
        parquet = pq.ParquetFile(file.path)
        if parquet.metadata.num_rows != file.rows:
            return (f"it holds {parquet.metadata.num_rows} rows, but the catalog recorded "
                    f"{file.rows}")
        if deep:  # decode every page, one row group at a time
            for group in range(parquet.num_row_groups):
                parquet.read_row_group(group)
    except Exception as error:  # pyarrow raises several types for damaged files
        return f"it cannot be read as Parquet ({str(error).strip().splitlines()[0]})"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file is whole: a JSON header whose tensors end where the file does."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size:
                return "its header length is past the end of the file"
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError):
        return "it is not a safetensors file (no readable header)"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if path.stat().st_size != expected:
        return f"it is {path.stat().st_size} bytes, but its header describes {expected}"
    return None


# -- the report ---------------------------------------------------------------------------------

@dataclass
class Problem(Result):
    """One damaged or missing thing and the command that writes it again."""

    kind: str  # 'table file', 'artefact' or 'directions'
    table: str
    path: str
    reason: str
    rows: int | None  # table rows that depend on it
    rerun: str | None  # the command that wrote it, where the snapshot recorded one

    def summary(self) -> str:
        rows = f", {self.rows} rows" if self.rows is not None else ""
        rerun = f"; re-run: {self.rerun}" if self.rerun else ""
        return f"{self.kind} {self.path} ({self.table}{rows}): {self.reason}{rerun}"


@dataclass
class CheckResult(Result):
    warehouse: str
    snapshot: int
    deep: bool
    table_files: int = 0
    checksums_verified: int = 0
    artefacts: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired_snapshot: int | None = None  # the snapshot --repair committed, if it did

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "problems"},
                "ok": self.ok, "problems": [p.to_dict() for p in self.problems]}

    def summary(self) -> str:
        """A line per problem, then what was checked and what to do."""
        lines = [problem.summary() for problem in self.problems]
        checked = (f"checked {self.table_files} table files ({self.checksums_verified} "
                   f"against their checksums) and {self.artefacts} artefacts at snapshot "
                   f"{self.snapshot}")
        if self.ok:
            lines.append(f"{checked}: all intact")
        elif self.repaired_snapshot is not None:
            lines.append(f"{checked}: {len(self.problems)} problems; damaged table files taken "
                         f"out of the catalog at snapshot {self.repaired_snapshot}. Run the "
                         "commands named above to write their rows again.")
        else:
            lines.append(f"{checked}: {len(self.problems)} problems. Run the commands named "
                         "above (with --repair first where a table file is damaged).")
        return "\n".join(lines)


def _commands(con: duckdb.DuckDBPyConnection) -> dict[int, str]:
    """Snapshot id -> the command that made it: its command line where it came from the CLI,
    else the job name (commit message)."""
    commands = {}
    for snapshot, message, extra in con.execute(
            f"SELECT snapshot_id, commit_message, commit_extra_info "
            f"FROM {METADATA}.ducklake_snapshot_changes").fetchall():
        info = json.loads(extra) if extra else {}
        line = info.get("command_line")
        commands[int(snapshot)] = ("featurestore " + shlex.join(line) if line
                                   else message and f"the job {message!r}")
    return commands


def check_warehouse(warehouse: str | os.PathLike | None = None, *, catalog: str | None = None,
                    deep: bool = True, repair: bool = False) -> CheckResult:
    """Verify every file the newest snapshot serves; with `repair`, take damaged table files
    out of the catalog (one new snapshot) so that the jobs that wrote them can run again.

    `deep=False` skips what reads whole files (checksums, page decoding, activation
    fingerprints, directions against weights): seconds instead of a read of the warehouse.
    """
    wh = Warehouse(warehouse, catalog)
    if not wh.exists():
        raise wh._missing()
    con = wh._open(read_only=True)
    try:
        commands = _commands(con)
        result = CheckResult(str(wh.root), wh.current_snapshot(con), deep)
        files = table_files(con, wh.data_path)
        found, result.checksums_verified = _table_file_problems(wh, con, commands, files, deep)
        result.table_files = len(files)
        result.problems += [problem for _, problem in found]
        damaged = [file for file, _ in found]
        broken_tables = {f.table for f in damaged}
        with wh.connect() as lake:
            writers = {f.path.name: commands.get(f.snapshot) for f in files}
            _check_artefacts(wh, lake, result, writers, broken_tables, deep)
    finally:
        con.close()
    if repair and damaged:
        result.repaired_snapshot = drop_table_files(wh, damaged)
    return result


def _check_artefacts(wh: Warehouse, lake: duckdb.DuckDBPyConnection, result: CheckResult,
                     writers: dict[str, str | None], broken_tables: set[str], deep: bool) -> None:
    """Every artefact path of checkpoints, activation_sets and bases (tables whose files are
    themselves damaged cannot be read, and are reported above)."""
    from featurestore.registry import open_activation_set

    def rows(table: str, sql: str) -> list[dict]:
        return [] if table in broken_tables else records(lake, sql)

    def report(kind: str, table: str, row: dict, reason: str, count: int | None = 1) -> None:
        result.problems.append(Problem(kind, table, row["path"], reason, count,
                                       writers.get(Path(row["filename"]).name)))

    for row in rows("checkpoints", "SELECT path, filename FROM lake.checkpoints"):
        result.artefacts += 1
        path = wh.path(row["path"])
        if not path.exists():
            report("artefact", "checkpoints", row, "the checkpoint is missing")
            continue
        for weights in sorted(path.rglob("*.safetensors")) if path.is_dir() else []:
            if reason := safetensors_problem(weights):
                report("artefact", "checkpoints", row, f"{weights.name}: {reason}")
    for row in rows("activation_sets", "SELECT *, filename FROM lake.activation_sets"):
        result.artefacts += 1
        if not wh.path(row["path"]).exists():
            report("artefact", "activation_sets", row, "the activation set is missing")
            continue
        try:
            acts = open_activation_set(wh, row)
            if deep and acts.token_columns().fingerprint() != row["tokens_fingerprint"]:
                report("artefact", "activation_sets", row,
                       "its tokens are not the ones its row fingerprints")
        except Exception as error:  # datasets and pyarrow raise many types for damaged files
            report("artefact", "activation_sets", row,
                   f"it cannot be read ({str(error).strip().splitlines()[0]})")
    directions_readable = "decoder_directions" not in broken_tables
    for row in rows("bases", "SELECT name, path, filename FROM lake.bases"):
        result.artefacts += 1
        _check_basis(wh, lake, result, row, report, deep and directions_readable)


def _check_basis(wh, lake, result, row, report, compare_directions: bool) -> None:
    from featurestore.crosscoder import CONFIG_FILE, WEIGHTS_FILE, CrossCoder

    folder = wh.path(row["path"])
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (folder / name).exists():
            report("artefact", "bases", row, f"{name} of basis {row['name']!r} is missing")
            return
    if reason := safetensors_problem(folder / WEIGHTS_FILE):
        report("artefact", "bases", row, f"{WEIGHTS_FILE}: {reason}")
        return
    if not compare_directions:
        return
    stored = lake.execute(
        "SELECT feature_id, source_index, direction FROM decoder_directions WHERE basis = ? "
        "ORDER BY feature_id, source_index", [row["name"]]).fetchall()
    if not stored:
        return
    decoder = CrossCoder.load(folder).decoder().detach().float().numpy()
    ids = np.array([(f, s) for f, s, _ in stored])
    directions = np.array([d for _, _, d in stored], dtype=np.float32)
    in_range = ((ids[:, 0] < decoder.shape[0]) & (ids[:, 1] < decoder.shape[1])).all()
    if not in_range or directions.shape[1] != decoder.shape[2] or not np.allclose(
            directions, decoder[ids[:, 0], ids[:, 1]], rtol=0, atol=DIRECTION_TOLERANCE):
        report("directions", "decoder_directions", row,
               f"the decoder_directions rows of basis {row['name']!r} are not its weights",
               len(stored))


# -- repair -------------------------------------------------------------------------------------

def drop_damaged_files(wh: Warehouse, table: str, job: str) -> list[Problem]:
    """Take the damaged files of `table` out of the catalog, for a job whose commit could not
    read them: it replaces rows of that table, and no one can read the damaged rows anyway.
    Returns what was dropped (nothing when every file is intact)."""
    con = wh._open(read_only=True)
    try:
        files = [f for f in table_files(con, wh.data_path) if f.table == table]
        found, _ = _table_file_problems(wh, con, _commands(con), files, deep=True)
    finally:
        con.close()
    if found:
        drop_table_files(wh, [file for file, _ in found], f"drop damaged files, for {job}")
    return [problem for _, problem in found]


def _table_file_problems(wh: Warehouse, con: duckdb.DuckDBPyConnection,
                         commands: dict[int, str], files: list[TableFile], deep: bool
                         ) -> tuple[list[tuple[TableFile, Problem]], int]:
    """The damaged ones of `files`, each with its problem, and how many intact files were
    verified against a recorded checksum."""
    checksums = _recorded_checksums(con)
    found, verified = [], 0
    for file in files:
        checksum = checksums.get(file.relative)
        reason = table_file_problem(file, checksum, deep)
        verified += int(deep and checksum is not None and reason is None)
        if reason:
            shown = (file.path.relative_to(wh.root) if file.path.is_relative_to(wh.root)
                     else file.path)
            found.append((file, Problem("table file", file.table, str(shown), reason,
                                        file.rows if file.kind == "data" else None,
                                        commands.get(file.snapshot))))
    return found, verified


def drop_table_files(wh: Warehouse, files: list[TableFile], message: str = "check --repair"
                     ) -> int:
    """End `files` at a new snapshot, in one transaction on the catalog's own tables: what
    DuckLake records when a delete removes every row of a file (the file's end_snapshot, and a
    `deleted_from_table` change that makes a concurrent writer to the table retry). A damaged
    delete file takes its data file with it: without the deletes its rows would come back."""
    data_ids = sorted({f.data_file_id for f in files})
    tables = sorted({f.table for f in files})
    con = wh._open(read_only=False)
    try:
        table_ids = [tid for (tid,) in con.execute(
            f"SELECT table_id FROM {METADATA}.ducklake_table WHERE end_snapshot IS NULL "
            f"AND table_name IN ({', '.join('?' for _ in tables)}) ORDER BY table_id",
            tables).fetchall()]
        marks = ", ".join(str(int(i)) for i in data_ids)
        con.execute("BEGIN TRANSACTION")
        (snapshot,) = con.execute(
            f"SELECT max(snapshot_id) + 1 FROM {METADATA}.ducklake_snapshot").fetchone()
        con.execute(f"INSERT INTO {METADATA}.ducklake_snapshot SELECT ?, now(), schema_version, "
                    f"next_catalog_id, next_file_id FROM {METADATA}.ducklake_snapshot "
                    "WHERE snapshot_id = ?", [snapshot, snapshot - 1])
        con.execute(f"INSERT INTO {METADATA}.ducklake_snapshot_changes VALUES (?, ?, ?, ?, ?)",
                    [snapshot, ",".join(f"deleted_from_table:{t}" for t in table_ids),
                     "featurestore", message, commit_info()])
        for table in ("ducklake_data_file", "ducklake_delete_file"):
            con.execute(f"UPDATE {METADATA}.{table} SET end_snapshot = ? "
                        f"WHERE data_file_id IN ({marks}) AND end_snapshot IS NULL", [snapshot])
        con.execute("COMMIT")
    except duckdb.Error as error:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass
        raise FeaturestoreError(f"check --repair: nothing was changed: {error}") from None
    finally:
        con.close()
    return int(snapshot)
