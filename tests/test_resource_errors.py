"""A full disk, no memory and no permission are one-line errors that say what the warehouse kept.

Every failure is real: a tmpfs filled to the last bytes (mounting needs root; the tests that need
it skip elsewhere), a file-size limit (RLIMIT_FSIZE) or an address-space limit (RLIMIT_AS) in a
child process, a read-only filesystem or folder, DuckDB's own memory limit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.errors import FeaturestoreError
from featurestore.resource_errors import DISK_FULL, resource_problem
from featurestore.warehouse import Warehouse

from .conftest import query, snapshot

REPO = Path(__file__).resolve().parents[1]
# A second, small run: its checkpoints are what fills the disk.
TRAIN = ["train-model", "--run", "second", "--steps", "2", "--d-model", "16", "--quiet"]


@contextmanager
def small_disk(folder: Path, size: str = "64m", read_only: bool = False) -> Iterator[Path]:
    """A tmpfs mounted at `folder`; the test is skipped where mounting is not permitted."""
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """A file taking all of the disk's free space but `leave` bytes."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(1, stat.f_bavail * stat.f_frsize - leave))
    return filler


def invoke(root: Path, *args: str):
    return CliRunner().invoke(cli, ["--warehouse", str(root), *args], catch_exceptions=False)


def run_child(code: str, *args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """`code` in a new Python process (from the repository root), with `args` as sys.argv[1:]."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)


def one_line_error(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "Traceback" not in output
    return lines[0]


def test_a_full_disk_fails_the_job_in_one_line_and_keeps_the_warehouse(trained_warehouse,
                                                                     tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        root = disk / "warehouse"
        shutil.copytree(trained_warehouse, root)
        before = snapshot(root)
        filler = fill(disk, leave=20_000)

        result = invoke(root, *TRAIN)
        assert result.exit_code == 1
        line = one_line_error(result.output)
        assert line.startswith("Error: disk full") and "No space left on device" in line
        assert "the warehouse is unchanged: nothing was committed" in line
        assert snapshot(root) == before
        assert not any((root / "tmp").glob("*"))  # the job's scratch went with it

        filler.unlink()
        again = invoke(root, *TRAIN)
        assert again.exit_code == 0, again.output
        assert query(root, "SELECT count(*) FROM runs") == [(2,)]


def test_a_full_disk_at_the_commit_names_the_table_file(tmp_path):
    with small_disk(tmp_path / "disk", size="4m") as disk:
        wh = Warehouse(disk / "warehouse")
        with wh.writer("first") as writer:
            writer.put("token_strings", [{"run": "a", "token_id": 0, "token_text": "x",
                                          "tokenizer": "t"}])
        snapshots = len(wh.snapshots())
        fill(disk, leave=200_000)
        rows = 200_000
        strings = pa.table({"run": ["b"] * rows, "token_id": np.arange(rows),
                            "token_text": [f"{i:x}-{i * 7919 % 104729:x}" for i in range(rows)],
                            "tokenizer": ["t"] * rows})
        with pytest.raises(FeaturestoreError) as failed:
            with wh.writer("too big") as writer:
                writer.put("token_strings", strings)
        problem = resource_problem(failed.value)
        assert problem is not None and problem.kind == DISK_FULL
        assert problem.path.startswith(str(wh.data_path / "main" / "token_strings"))
        assert len(wh.snapshots()) == snapshots


def test_a_file_size_limit_is_a_message_too(trained_warehouse, tmp_path):
    """No root needed: RLIMIT_FSIZE makes a write past the limit fail with EFBIG."""
    root = tmp_path / "warehouse"
    shutil.copytree(trained_warehouse, root)
    before = snapshot(root)
    child = run_child("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # > SQLite's -shm
        from featurestore.cli import main
        sys.argv = ["featurestore", *sys.argv[1:]]
        main()
    """, "--warehouse", str(root), *TRAIN)
    assert child.returncode == 1, child.stderr
    line = one_line_error(child.stderr)
    assert line.startswith("Error: file size limit reached") and "ulimit -f" in line
    assert "nothing was committed" in line
    assert snapshot(root) == before


@contextmanager
def read_only_copy(source: Path, folder: Path) -> Iterator[Path]:
    """A copy of the warehouse `source` that this process cannot write to. Root ignores file
    modes: as root the copy is on a tmpfs remounted read-only, else its folders lose their
    write permission."""
    if os.geteuid() == 0:
        with small_disk(folder) as disk:
            shutil.copytree(source, disk / "warehouse")
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            yield disk / "warehouse"
        return
    root = folder / "warehouse"
    shutil.copytree(source, root)
    folders = [Path(f) for f, _, _ in os.walk(root)]
    for f in folders:
        f.chmod(0o555)
    try:
        yield root
    finally:
        for f in folders:
            f.chmod(0o755)


def test_permission_denied_names_the_path(trained_warehouse, tmp_path):
    with read_only_copy(trained_warehouse, tmp_path / "disk") as root:
        before = snapshot(root)
        result = invoke(root, *TRAIN)
        assert result.exit_code == 1
        line = one_line_error(result.output)
        assert line.startswith(f"Error: permission denied at {root}")
        assert "nothing was committed" in line
        assert snapshot(root) == before


def test_out_of_memory_in_duckdb(trained_warehouse):
    result = invoke(trained_warehouse, "sql", "--trusted",
                    "SET memory_limit = '4MB'; SET temp_directory = ''; "
                    "SELECT count(DISTINCT i::VARCHAR || 'x') FROM range(3000000) AS t(i)")
    assert result.exit_code == 1
    line = one_line_error(result.output)
    assert line.startswith("Error: out of memory (Out of Memory Error")
    assert "the warehouse is unchanged" in line and "--batch-size" in line


def test_out_of_memory_in_torch(trained_warehouse, tmp_path):
    """A model that needs more memory than the process may map (RLIMIT_AS) though the machine
    has it: torch's allocator fails."""
    root = tmp_path / "warehouse"
    shutil.copytree(trained_warehouse, root)
    before = snapshot(root)
    child = run_child("""
        import resource, sys
        import torch
        from featurestore.cli import main
        mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + 600 * 2**20, resource.RLIM_INFINITY))
        sys.argv = ["featurestore", *sys.argv[1:]]
        main()
    """, "--warehouse", str(root), "--threads", "1", "train-model", "--run", "wide",
        "--steps", "1", "--d-model", "1024", "--quiet")
    assert child.returncode == 1, child.stderr
    line = one_line_error(child.stderr)
    assert line.startswith("Error: out of memory") and "nothing was committed" in line
    assert snapshot(root) == before


def test_a_result_that_cannot_be_printed_after_the_commit_is_a_warning(tmp_path):
    """init commits, then its line goes to a stdout on a full disk: the command succeeded."""
    root = tmp_path / "warehouse"
    with small_disk(tmp_path / "disk", size="1m") as disk:
        fill(disk)
        with open(disk / "out.txt", "w") as out:
            first = run_child("from featurestore.cli import main; import sys; "
                              "sys.argv = ['featurestore', *sys.argv[1:]]; main()",
                              "--warehouse", str(root), "init", stdout=out)
            again = run_child("from featurestore.cli import main; import sys; "
                              "sys.argv = ['featurestore', *sys.argv[1:]]; main()",
                              "--warehouse", str(root), "init", stdout=out)
    assert first.returncode == 0, first.stderr
    assert first.stderr.strip().splitlines() == [
        "featurestore: warning: init committed, but its result could not be shown: disk full "
        "(No space left on device)"]
    assert Warehouse(root).exists()
    # The second init commits nothing: a failure to print it is the command's failure.
    assert again.returncode == 1
    assert "nothing was committed" in one_line_error(again.stderr)
    assert [s.job for s in Warehouse(root).snapshots() if s.job] == ["init"]


def test_unrelated_errors_keep_their_traceback(trained_warehouse):
    """Only resource errors are translated: a bug stays a bug."""
    child = run_child("""
        import sys
        from featurestore import warehouse
        def broken(*args, **kwargs):
            raise KeyError("a bug")
        warehouse.Warehouse.snapshots = broken
        from featurestore.cli import main
        sys.argv = ["featurestore", *sys.argv[1:]]
        main()
    """, "--warehouse", str(trained_warehouse), "snapshots")
    assert child.returncode == 1 and "Traceback" in child.stderr and "KeyError" in child.stderr
