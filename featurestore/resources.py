"""What the machine can give a job: memory and disk, checked before a setting makes a job use it.

A flag such as --batch-size or --dict-size decides how much memory a job allocates, --tokens how
much collect writes; a value far beyond the machine would otherwise swap it to a halt, be killed
by the kernel or fill the disk, minutes in. Jobs estimate what a setting needs and call
`require_memory` or `require_disk` before allocating or writing it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from featurestore.errors import FeaturestoreError

FLOAT_BYTES = 4  # float32, the precision of activations and dictionaries
# A token held in memory by collect, feature-patch and feature-lineage: its int64 id, and its
# TokenColumns row (int64 sequence_id, int32 position, int64 token_id, a reference to its split).
TOKEN_BYTES = 8 + 8 + 4 + 8 + 8
CGROUP = Path("/sys/fs/cgroup")


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping: MemAvailable of /proc/meminfo
    (else the free pages), lowered to what a cgroup v2 memory limit leaves; None if the system
    says neither."""
    found = _meminfo_available()
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            found = None
    limit = _cgroup_left()
    if limit is not None:
        found = limit if found is None else min(found, limit)
    return found


def require_memory(flag: str, value, needed: int, what: str) -> None:
    """Refuse `flag` `value` when what it makes a job allocate (`needed` bytes, for `what`)
    exceeds the memory available."""
    available = available_memory()
    if available is not None and needed > available:
        raise FeaturestoreError(
            f"{flag} {value}: {what} needs {needed:,} bytes ({format_bytes(needed)}) but this "
            f"machine has {available:,} bytes ({format_bytes(available)}) available; lower "
            f"{flag}")


def require_disk(flag: str, value, needed: int, directory: Path, what: str) -> None:
    """Refuse `flag` `value` when what it makes a job write (`needed` bytes, for `what`)
    exceeds the free space of the disk holding `directory`."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise FeaturestoreError(
            f"{flag} {value}: {what} needs {needed:,} bytes ({format_bytes(needed)}) of disk but "
            f"{directory} has {free:,} bytes ({format_bytes(free)}) free; lower {flag}")


def format_bytes(count: int) -> str:
    """e.g. '4.4 GiB'."""
    size, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel counts in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_left() -> int | None:
    """memory.max - memory.current of this process's cgroup v2 (a container's limit)."""
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        current = int((CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit():
        return None
    return max(0, int(limit) - current)
