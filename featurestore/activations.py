"""Activation sets on disk: writing them, reading them fast, and checking they can be combined.

An activation set is a Hugging Face `datasets` folder (save_to_disk) with one row per token:

    activations  float32[d_model]   the stage's activation vector
    sequence_id  int64              which token sequence
    position     int32              position in the sequence
    token_id     int64              the token at that position
    split        string             the data split the sequence came from

Sets collected together share their token columns row for row; a SHA-256 of those columns (the
fingerprint) lets any job check alignment without reading the activations.

Reading for training never goes through datasets' per-row formatter: `ActivationSet` takes the
memory-mapped Arrow buffers as numpy views and gathers rows into torch tensors, so memory use is
bounded by the batch, not by the set.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore.errors import FeaturestoreError, InvalidActivationsError
from featurestore.file_formats import require_parquet

TOKEN_COLUMNS = ("sequence_id", "position", "token_id", "split")
NORM_SAMPLE_ROWS = 8192
RECORD_BATCH_ROWS = 65_536


def features(d_model: int):
    import datasets

    return datasets.Features({
        "activations": datasets.List(datasets.Value("float32"), length=d_model),
        "sequence_id": datasets.Value("int64"),
        "position": datasets.Value("int32"),
        "token_id": datasets.Value("int64"),
        "split": datasets.Value("string"),
    })


@dataclass
class TokenColumns:
    """The token identity of every row; equal across aligned sets."""

    sequence_id: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.sequence_id)

    def __getitem__(self, rows: slice) -> TokenColumns:
        return TokenColumns(self.sequence_id[rows], self.position[rows], self.token_id[rows],
                            self.split[rows])

    def sequences(self, name: str, purpose: str) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [n_sequences, length], each sequence's split): the model inputs these rows
        were read from, rebuilt in (sequence, position) order. `purpose` says who needs them, for
        the error when sequences differ in length."""
        order = np.lexsort((self.position, self.sequence_id))
        _, lengths = np.unique(np.asarray(self.sequence_id)[order], return_counts=True)
        if len(set(lengths.tolist())) != 1:
            raise FeaturestoreError(
                f"activation set {name} holds sequences of different lengths; {purpose} needs "
                "equal-length sequences to rebuild the model's input")
        length = int(lengths[0])
        token_ids = np.asarray(self.token_id)[order].reshape(-1, length)
        splits = np.asarray(self.split)[order].reshape(-1, length)[:, 0].astype(str)
        return token_ids, splits

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for column in (self.sequence_id, self.position, self.token_id):
            digest.update(np.ascontiguousarray(column, dtype=np.int64).tobytes())
        return digest.hexdigest()


def check_finite(activations, what: str, first_row: int = 0) -> None:
    """Refuse NaN/Inf; `first_row` is the row number of activations[0] in its set.
    `activations` is a numpy array [rows, width], or a torch tensor [..., width] (a model's
    output, copied to numpy only when a value is not finite: logits can be large)."""
    if not isinstance(activations, np.ndarray):
        import torch

        if bool(torch.isfinite(activations).all()):
            return
        activations = activations.detach().reshape(-1, activations.shape[-1]).float().numpy()
    finite = np.isfinite(activations)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise InvalidActivationsError(
            f"{what}: {int((~finite).sum())} NaN/Inf values in {len(bad_rows)} rows (first bad "
            f"row {first_row + int(bad_rows[0])}). Activation sets must be finite: check the "
            "model or the data that produced them."
        )


def norm_sample(position: np.ndarray, exclude_first: bool = True,
                sample_rows: int = NORM_SAMPLE_ROWS, seed: int = 0) -> np.ndarray:
    """Sorted row numbers to estimate the norm scale on: a seeded sample, position 0 left out
    by default (the first token's residual norm is often an outlier that would dominate)."""
    if len(position) == 0:
        raise InvalidActivationsError("cannot estimate the norm scale: the set holds no rows")
    rows = np.flatnonzero(position != 0) if exclude_first else np.arange(len(position))
    if len(rows) == 0:
        raise InvalidActivationsError(
            "cannot estimate the norm scale: no rows left after excluding position 0; "
            "use --include-first-position"
        )
    if len(rows) > sample_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, sample_rows, replace=False))
    return rows


def norm_scale(sample: np.ndarray) -> float:
    """The scalar s with mean ||s * x||_2 = sqrt(d_model) over the sample rows x."""
    mean_norm = float(np.linalg.norm(sample.astype(np.float64), axis=1).mean())
    if mean_norm == 0.0:
        raise InvalidActivationsError("cannot estimate the norm scale: all activations are zero")
    return math.sqrt(sample.shape[1]) / mean_norm


def write_activation_set(directory: Path, activations: np.ndarray, tokens: TokenColumns) -> None:
    """Save one set as a datasets folder; `directory` must not exist yet or be empty."""
    with ActivationSetWriter(directory, activations.shape[1]) as out:
        out.write(activations, tokens)


class ActivationSetWriter:
    """Writes one activation set batch by batch, so memory is bounded by a batch, not the set.

    The batches go to an Arrow stream file next to `directory`; on a clean exit datasets copies it
    into `directory` as a save_to_disk folder (reading it memory-mapped), and the stream file is
    removed either way.
    """

    def __init__(self, directory: Path, d_model: int):
        self.directory = Path(directory)
        self.d_model = d_model
        self.rows = 0
        self._stream_path = self.directory.with_name(self.directory.name + ".partial.arrow")
        self._schema = pa.schema([
            ("activations", pa.list_(pa.float32(), d_model)),
            ("sequence_id", pa.int64()),
            ("position", pa.int32()),
            ("token_id", pa.int64()),
            ("split", pa.string()),
        ])
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self._stream_path), "wb")
        self._stream = pa.ipc.new_stream(self._sink, self._schema)

    def write(self, activations: np.ndarray, tokens: TokenColumns) -> None:
        n, d_model = activations.shape
        if d_model != self.d_model:
            raise ValueError(f"activation width {d_model}, expected {self.d_model}")
        if len(tokens) != n:
            raise ValueError(f"{n} activation rows but {len(tokens)} token rows")
        flat = pa.array(np.ascontiguousarray(activations, dtype=np.float32).reshape(-1))
        self._stream.write_batch(pa.record_batch([
            pa.FixedSizeListArray.from_arrays(flat, d_model),
            pa.array(tokens.sequence_id, pa.int64()),
            pa.array(tokens.position, pa.int32()),
            pa.array(tokens.token_id, pa.int64()),
            pa.array(tokens.split, pa.string()),
        ], schema=self._schema))
        self.rows += n

    def __enter__(self) -> ActivationSetWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            self._stream.close()
            self._sink.close()
            if error_type is None:
                self._save()
        finally:
            self._stream_path.unlink(missing_ok=True)

    def _save(self) -> None:
        import datasets

        dataset = datasets.Dataset.from_file(str(self._stream_path),
                                             info=datasets.DatasetInfo(
                                                 features=features(self.d_model)))
        datasets.disable_progress_bars()  # the job that calls this shows its own progress
        # save_to_disk writes Arrow record batches of DEFAULT_MAX_BATCH_SIZE rows (1,000). Every
        # record batch is a separate chunk for the reader, and a shuffled training batch touches
        # nearly all of them, so larger record batches make shuffled reads several times faster.
        default_batch = datasets.config.DEFAULT_MAX_BATCH_SIZE
        datasets.config.DEFAULT_MAX_BATCH_SIZE = RECORD_BATCH_ROWS
        try:
            dataset.save_to_disk(str(self.directory))
        finally:
            datasets.config.DEFAULT_MAX_BATCH_SIZE = default_batch


class ActivationSet:
    """A memory-mapped activation set, read as numpy views and torch batches.

    `norm_scale`, when given, is applied by `rows`/`batches` with normalized=True.
    """

    def __init__(self, path: str | os.PathLike, format: str = "hf_dataset",
                 norm_scale: float | None = None, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(path)
        self.norm_scale = norm_scale
        self.table = _open_table(self.path, format)
        column = self.table.column("activations")
        if not pa.types.is_fixed_size_list(column.type):
            raise InvalidActivationsError(
                f"{self.path}: column 'activations' is {column.type}; it must be a fixed-length "
                "list of float32 (datasets.List(Value('float32'), length=d_model))"
            )
        self.d_model = column.type.list_size
        # One zero-copy [rows, d_model] view per Arrow chunk of the memory map.
        self._chunks = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.d_model)
                        for c in column.chunks if len(c)]
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def token_columns(self) -> TokenColumns:
        return TokenColumns(*(self.table.column(c).to_numpy() for c in TOKEN_COLUMNS))

    def rows(self, index: np.ndarray, normalized: bool = False) -> np.ndarray:
        """Activations of the given row numbers as one float32 array [len(index), d_model]."""
        index = np.asarray(index, dtype=np.int64)
        order = None
        if len(index) > 1 and np.any(index[1:] < index[:-1]):
            order = np.argsort(index, kind="stable")
            index = index[order]
        out = np.empty((len(index), self.d_model), dtype=np.float32)
        # Sorted row numbers fall into each chunk as one contiguous slice of `index`.
        bounds = np.searchsorted(index, self._starts)
        for chunk, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi > lo:
                out[lo:hi] = self._chunks[chunk][index[lo:hi] - self._starts[chunk]]
        if order is not None:
            unsorted = np.empty_like(out)
            unsorted[order] = out
            out = unsorted
        if normalized:
            out *= self._scale()
        return out

    def all_rows(self) -> np.ndarray:
        """Every row in order (a copy; use for sets that fit in memory)."""
        return np.concatenate(self._chunks) if self._chunks else np.empty((0, self.d_model))

    def batches(self, batch_size: int, shuffle_seed: int | None = None,
                normalized: bool = False) -> Iterator:
        """Torch tensors [batch, d_model] covering every row once; seeded shuffle if asked."""
        import torch

        order = np.arange(len(self))
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(len(self))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            if shuffle_seed is not None:
                index = np.sort(index)  # sorted reads are sequential in the memory map
            yield torch.from_numpy(self.rows(index, normalized))

    def _scale(self) -> float:
        if self.norm_scale is None:
            raise FeaturestoreError(
                f"{self.name}: normalized reads need the set's norm_scale (from activation_sets)"
            )
        return self.norm_scale


def _open_table(path: Path, format: str) -> pa.Table:
    if not path.exists():
        raise FeaturestoreError(f"activation set {path} does not exist")
    if format == "hf_dataset":
        import datasets

        try:
            return datasets.load_from_disk(str(path)).data.table
        except FileNotFoundError as error:
            raise FeaturestoreError(
                f"{path} is not a saved datasets folder ({error}); pass a folder written by "
                "Dataset.save_to_disk, or a .parquet file"
            ) from None
    if format == "parquet":
        if path.is_file():
            require_parquet(path, str(path), InvalidActivationsError)
        return pq.read_table(path, memory_map=True)
    raise FeaturestoreError(f"unknown activation set format {format!r} (hf_dataset or parquet)")


def check_aligned(sets: list[dict]) -> None:
    """Refuse to combine activation sets whose rows or widths differ.

    `sets` are activation_sets rows (name, n_tokens, d_model, tokens_fingerprint, path, format).
    """
    first = sets[0]
    for other in sets[1:]:
        if other["d_model"] != first["d_model"]:
            raise InvalidActivationsError(
                f"d_model mismatch: {first['name']} has d_model {first['d_model']} but "
                f"{other['name']} has {other['d_model']}; only sets of equal width can be combined"
            )
        if other["n_tokens"] != first["n_tokens"]:
            raise InvalidActivationsError(
                f"misaligned rows: {first['name']} has {first['n_tokens']} rows but "
                f"{other['name']} has {other['n_tokens']}; collect both on the same tokens "
                "(same --tokens, --splits and --seed)"
            )
        if other["tokens_fingerprint"] != first["tokens_fingerprint"]:
            row = _first_difference(first, other)
            raise InvalidActivationsError(
                f"misaligned rows: {first['name']} and {other['name']} hold different tokens "
                f"(first difference at row {row}); collect both on the same tokens (same "
                "--tokens, --splits and --seed)"
            )


def _first_difference(a: dict, b: dict) -> int:
    ta = ActivationSet(a["path"], a["format"]).token_columns()
    tb = ActivationSet(b["path"], b["format"]).token_columns()
    differs = np.zeros(len(ta), dtype=bool)
    for column in ("sequence_id", "position", "token_id"):
        differs |= getattr(ta, column) != getattr(tb, column)
    return int(np.flatnonzero(differs)[0]) if differs.any() else -1
