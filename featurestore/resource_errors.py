"""Errors of the machine rather than of the input: a full disk, no memory, no permission.

Every library a job uses raises them in its own form: Python and pyarrow an OSError with an errno,
numpy a MemoryError, torch its OutOfMemoryError (GPU) or a RuntimeError saying "Cannot allocate
memory" (CPU), DuckDB an IOException or OutOfMemoryException, safetensors an error whose message
ends in "(os error 28)". `resource_problem` recognises each, by type and errno, else by the
operating system's own words for the errno (strerror) in the message, along the chain of errors
that caused it; the CLI turns what it finds into one line with the path, what the warehouse
kept and the fix.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from dataclasses import dataclass

DISK_FULL = "disk full"
OUT_OF_MEMORY = "out of memory"
PERMISSION_DENIED = "permission denied"
FILE_SIZE_LIMIT = "file size limit reached"

_KINDS = {
    errno.ENOSPC: DISK_FULL,
    errno.EDQUOT: DISK_FULL,
    errno.ENOMEM: OUT_OF_MEMORY,
    errno.EACCES: PERMISSION_DENIED,
    errno.EPERM: PERMISSION_DENIED,
    errno.EROFS: PERMISSION_DENIED,
    errno.EFBIG: FILE_SIZE_LIMIT,
}
# "No space left on device", "Permission denied", ...: how DuckDB, Rust and C++ libraries pass
# an errno on in their messages.
_WORDS = {os.strerror(code): kind for code, kind in _KINDS.items()}
_FIXES = {
    DISK_FULL: "Free space (`featurestore compact` deletes what no snapshot reads) and run the "
               "command again",
    OUT_OF_MEMORY: "Run it again with a smaller setting (--batch-size, --tokens, --dict-size, "
                   "--d-model) or on a machine with more memory",
    PERMISSION_DENIED: "Let this user write there (or mount it read-write), or point "
                       "--warehouse / --out elsewhere, and run the command again",
    FILE_SIZE_LIMIT: "Raise the file size limit (ulimit -f) and run the command again",
}
_QUOTED_PATH = re.compile(r"""["'](/[^"']+)["']""")
_DETAIL_CHARACTERS = 200


@dataclass(frozen=True)
class ResourceProblem:
    """What ran out (kind), where (path, when the error says), the error's own words."""

    kind: str
    path: str | None
    detail: str

    def describe(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"{self.kind}{where} ({self.detail})"

    @property
    def fix(self) -> str:
        return _FIXES[self.kind]


def resource_problem(error: BaseException) -> ResourceProblem | None:
    """The resource problem behind `error` (itself, or an error it was raised from or while
    handling), or None when it is some other error."""
    chain = list(_chain(error))
    for link in chain:
        kind = _kind(link)
        if kind is not None:
            path = None if kind == OUT_OF_MEMORY else next(filter(None, map(_path, chain)), None)
            return ResourceProblem(kind, path, _detail(link))
    return None


def _chain(error: BaseException):
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _kind(error: BaseException) -> str | None:
    from featurestore.errors import FeaturestoreError

    if isinstance(error, MemoryError) or isinstance(error, _out_of_memory_types()):
        return OUT_OF_MEMORY
    if isinstance(error, OSError) and error.errno in _KINDS:
        return _KINDS[error.errno]
    if isinstance(error, FeaturestoreError):  # its own words were chosen; look at its cause
        return None
    text = str(error)
    return next((kind for words, kind in _WORDS.items() if words in text), None)


def _out_of_memory_types() -> tuple[type, ...]:
    """torch's and DuckDB's out-of-memory errors, from the libraries this process imported."""
    found = []
    torch = sys.modules.get("torch")
    if torch is not None:
        found += [t for t in (getattr(torch, "OutOfMemoryError", None),
                              getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None))
                  if isinstance(t, type)]
    duckdb = sys.modules.get("duckdb")
    if duckdb is not None:
        found.append(duckdb.OutOfMemoryException)
    return tuple(found)


def _path(error: BaseException) -> str | None:
    """The file the error names: an OSError's own, else the first quoted absolute path in its
    message whose folder exists (messages also quote examples, such as '/path/to/tmp.tmp')."""
    if isinstance(error, OSError) and error.filename:
        return os.fsdecode(error.filename)
    for match in _QUOTED_PATH.finditer(str(error)):
        if os.path.isdir(os.path.dirname(match.group(1))):
            return match.group(1)
    return None


def _detail(error: BaseException) -> str:
    """The error's own words, on one line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= _DETAIL_CHARACTERS else text[:_DETAIL_CHARACTERS - 1] + "…"
