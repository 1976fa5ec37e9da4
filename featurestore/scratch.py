"""Folders a job writes before it is done (its scratch, a layout being built, a training state),
and how a later job tells the folder of a killed job from the folder of one still running.

A job makes such a folder only once it holds a lock (flock) on a lock file beside it,
<folder>.lock, and keeps the lock until it is done with the folder. The kernel drops the lock of
a process however it ends, so a folder whose lock nobody holds was left by a job that was killed
or crashed: any later job can take the lock and delete it, however young it is, and no job
deletes the folder of a job that is still running (on any machine, where the filesystem's locks
work across machines). A folder with no lock file beside it was made by an older featurestore:
it counts as abandoned once it is older than the caller's `lockless_age`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

LOCK_SUFFIX = ".lock"
# The training states of train-crosscoder (kept after a failure, for --resume), one folder per
# basis name under the warehouse root.
TRAINING_FOLDER = "training"


def lock_path(folder: Path) -> Path:
    return folder.with_name(folder.name + LOCK_SUFFIX)


class Claim:
    """A held lock on `folder`: nobody else deletes the folder until `release`. The folder is
    made too, unless `make` is False (the holder makes it when it needs it)."""

    def __init__(self, folder: Path, make: bool = True):
        self.folder = folder
        while True:
            try:
                fd = os.open(lock_path(folder), os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # no parent yet, or another job just removed it empty
                folder.parent.mkdir(parents=True, exist_ok=True)
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a sweep deletes an old folder
            try:  # a sweep that held the lock may have deleted the file: lock a new one
                if os.stat(lock_path(folder)).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd: int | None = fd
        if make:
            folder.mkdir(exist_ok=True)

    def release(self, remove: bool, warn: str | None = None) -> None:
        """Let go of the folder, deleting it first when `remove` (else only if it is empty); a
        folder that cannot be deleted is left for a later sweep, with a warning line naming it
        (prefixed `warn`)."""
        if self._fd is None:
            return
        try:
            if remove:
                remove_tree(self.folder, warn)
            else:
                try:
                    self.folder.rmdir()
                except OSError:
                    pass  # not empty (kept on purpose), or already gone
            lock_path(self.folder).unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *_) -> None:
        self.release(remove=False)


def remove_tree(folder: Path, warn: str | None = None) -> bool:
    """Delete `folder`; on failure print one warning line (when `warn` names who is deleting)
    and return False. Cleanup that fails must not fail a job that has done its work."""
    failures: list[str] = []

    def failed(_function, path, error):
        failures.append(f"{path}: {error[1] if isinstance(error, tuple) else error}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=failed)
    else:
        shutil.rmtree(folder, onerror=failed)
    failures = [f for f in failures if "No such file or directory" not in f]
    if failures and warn:
        print(f"featurestore: warning: {warn}: could not delete {folder} ({failures[0]}); a "
              "later job or `featurestore compact` deletes it", file=sys.stderr)
    return not failures


def sweep(parent: Path, matches: Callable[[str], bool], *, lockless_age: timedelta,
          min_age: timedelta = timedelta(0), dry_run: bool = False,
          abandoned: Callable[[Path], bool] = lambda _: True,
          warn: str | None = None) -> list[Path]:
    """Delete the folders in `parent` whose names `matches` accepts, that no running job holds,
    that are at least `min_age` old (`lockless_age` without a lock file), and that `abandoned`
    agrees are no longer needed; the folders deleted (with `dry_run`: those that would be)."""
    if not parent.is_dir():
        return []
    removed = []
    for folder in sorted(parent.iterdir()):
        if folder.name.endswith(LOCK_SUFFIX) or not matches(folder.name) or folder.is_symlink():
            continue
        lock = lock_path(folder)
        has_lock = lock.exists()
        if not older(folder, min_age if has_lock else max(min_age, lockless_age)):
            continue
        fd = _try_lock(lock) if has_lock else None
        if has_lock and fd is None:
            continue  # its job is running
        try:
            if abandoned(folder):
                if dry_run or remove_tree(folder, warn):
                    removed.append(folder)
                if not dry_run:
                    lock.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    # Lock files of jobs killed before they made their folder, or after deleting it.
    if not dry_run:
        for lock in parent.glob(f"*{LOCK_SUFFIX}"):
            folder = lock.with_name(lock.name[:-len(LOCK_SUFFIX)])
            if matches(folder.name) and not folder.exists():
                fd = _try_lock(lock)
                if fd is not None:
                    try:
                        if not folder.exists():
                            lock.unlink(missing_ok=True)
                    finally:
                        os.close(fd)
    return removed


def newest_mtime(path: Path) -> float:
    """When `path`, or anything in it if it is a folder, last changed, as a UNIX time."""
    times = [path.stat().st_mtime]
    for parent, _, files in os.walk(path):
        times += [(Path(parent) / f).stat().st_mtime for f in files]
    return max(times)


def _try_lock(lock: Path) -> int | None:
    """An open, locked descriptor of `lock`, or None when another process holds it (or the
    file is gone)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def older(path: Path, age: timedelta) -> bool:
    """Whether `path` was last modified at least `age` ago (False once it is gone)."""
    try:
        return time.time() - path.stat().st_mtime >= age.total_seconds()
    except FileNotFoundError:
        return False
