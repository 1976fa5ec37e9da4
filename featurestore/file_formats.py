"""Files recognised by their first bytes before a reader opens them.

A file's name says what its writer meant, not what it holds: a pickle saved as `acts.parquet` or
`model.safetensors` would fail deep inside pyarrow, numpy or safetensors, or (safetensors in a
model folder) only when a later job loads it. These checks read a few bytes and refuse such a
file by name, saying what it starts with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from featurestore.errors import FeaturestoreError

PARQUET_MAGIC = b"PAR1"  # at the start and at the end of every Parquet file
ZIP_MAGIC = b"PK\x03\x04"  # .npz files are zip archives
NPY_MAGIC = b"\x93NUMPY"
# safetensors: an 8-byte little-endian header length, then that many bytes of JSON. The
# safetensors library refuses headers over 100 MB; so does this check.
SAFETENSORS_MAX_HEADER = 100_000_000
# What a file that is not the expected format often is, by its first bytes.
KNOWN_STARTS = (
    (b"\x80", "a Python pickle"),
    (ZIP_MAGIC, "a zip archive (an .npz, or a torch.save file)"),
    (PARQUET_MAGIC, "a Parquet file"),
    (NPY_MAGIC, "a numpy .npy file"),
    (b"\x89HDF", "an HDF5 file"),
)


def starts_with(path: Path) -> str:
    """'it starts with b"...", like a Python pickle', or 'it is empty, 0 bytes'."""
    with open(path, "rb") as file:
        head = file.read(8)
    if not head:
        return "it is empty, 0 bytes"
    kind = next((what for magic, what in KNOWN_STARTS if head.startswith(magic)), None)
    return f"it starts with {head!r}" + (f", like {kind}" if kind else "")


def require_parquet(path: Path, label: str, error: type[FeaturestoreError] = FeaturestoreError
                    ) -> None:
    """Refuse a file that is not Parquet; `label` names it in the message (a path, a flag)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        head = file.read(4)
        file.seek(max(0, size - 4))
        tail = file.read(4)
    if head != PARQUET_MAGIC:
        raise error(f"{label} is not a Parquet file ({starts_with(path)})")
    if size < 12 or tail != PARQUET_MAGIC:
        raise error(f"{label} is a truncated Parquet file ({size} bytes, no footer); write it "
                    "again")


def require_start(path: Path, magic: bytes, what: str, label: str,
                  error: type[FeaturestoreError] = FeaturestoreError) -> None:
    """Refuse a file that does not start with `magic` (e.g. NPY_MAGIC, what='an .npy file')."""
    with open(path, "rb") as file:
        head = file.read(len(magic))
    if head != magic:
        raise error(f"{label} is not {what} ({starts_with(path)})")


def require_safetensors(path: Path, label: str,
                        error: type[FeaturestoreError] = FeaturestoreError) -> None:
    """Refuse a file that is not safetensors: an 8-byte little-endian length N, then N bytes of
    a JSON object (the tensors' names, dtypes, shapes and offsets)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        fits = 2 <= length <= min(size - 8, SAFETENSORS_MAX_HEADER)
        header = file.read(length) if fits else b""
    try:
        parsed = json.loads(header) if fits else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise error(f"{label} is not a safetensors file ({starts_with(path)}); featurestore "
                    "never unpickles weights: save them with safetensors (save_pretrained(..., "
                    "safe_serialization=True) or safetensors.torch.save_file)")
