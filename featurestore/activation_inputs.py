"""Activations as users have them: recognised, checked and read in slices for conversion.

`featurestore register-activations` takes these forms (see README "Bringing your own
activations"):

- a `datasets` folder (save_to_disk) or a Parquet file with the columns `activations`,
  `sequence_id`, `position`, `token_id`, `split`, where `activations` is
    - a fixed-length list of float32: the activation-set format itself, registered in place;
    - a fixed-length list of float16 or float64 (numpy arrays of those dtypes, polars
      `pl.Array`), or a variable-length list / large_list of float16, float32 or float64 whose
      rows all have one width (`Dataset.from_dict({"activations": x.tolist()})`, polars columns
      built from `.tolist()`): converted;
- an `.npz` file (np.savez) holding `activations` [n_sequences, seq_len, d_model] (float16, float32
  or float64) and `token_ids` [n_sequences, seq_len], optionally `split` [n_sequences] (strings):
  converted, with sequence_id and position implied by the layout;
- an `.npy` file (np.save) of those activations, with its token ids in a second .npy file
  (--token-ids): converted the same way, the activations memory-mapped.

bfloat16 has no numpy, Arrow or datasets type: bfloat16 tensors reach files as float32
(`x.float().numpy()`, or datasets' own conversion of a tensor) or float64 (`x.tolist()`), both
accepted, and both hold every bfloat16 value exactly. A 2-byte "void" array in an .npz (bfloat16
saved through ml_dtypes) is refused, since nothing says what its bits mean.

Converted inputs are read one slice at a time (float32 activations and token columns, ready for
ActivationSetWriter), so converting needs memory for one slice, not the set. The input file is
only read.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featurestore.activations import TOKEN_COLUMNS, TokenColumns
from featurestore.errors import InvalidActivationsError
from featurestore.file_formats import NPY_MAGIC, ZIP_MAGIC, require_parquet, require_start

# Float32 activation values per slice read for conversion (32 MiB): rows = this // d_model.
SLICE_VALUES = 8 * 1024 * 1024
DEFAULT_SPLIT = "tokens"  # the split of .npz rows without a `split` array, as collect names it
NPZ_FIX = ("save the activations and their token ids together: np.savez(PATH.npz, "
           "activations=acts, token_ids=ids) with acts [n_sequences, seq_len, d_model] and ids "
           "[n_sequences, seq_len] (optionally split=[n_sequences] strings)")
TOKEN_TYPES = {"sequence_id": pa.int64(), "position": pa.int32(), "token_id": pa.int64(),
               "split": pa.string()}


@dataclass(frozen=True)
class ActivationInput:
    """One input file or folder, recognised."""

    path: Path
    kind: str  # hf_dataset, parquet, npz or npy
    form: str  # what its activations are, e.g. "Parquet column activations: list<double>"
    n_rows: int
    d_model: int
    in_place: bool  # already the activation-set format: registered where it is, not converted
    token_ids: Path | None = None  # the .npy of token ids that goes with an .npy of activations

    def slices(self) -> Iterator[tuple[np.ndarray, TokenColumns]]:
        """The rows, one slice at a time: float32 activations [rows, d_model] and their token
        columns. A row of another width or a null is refused by its row number when reached."""
        rows = max(1, SLICE_VALUES // self.d_model)
        if self.kind == "npz":
            yield from _npz_slices(self.path, self.d_model, rows)
            return
        if self.kind == "npy":
            yield from _npy_slices(self.path, self.token_ids, rows)
            return
        start = 0
        for batch in _table_batches(self.path, self.kind, rows):
            activations = _float32_rows(batch.column("activations"), self.d_model, start,
                                        self.path)
            tokens = TokenColumns(*(
                _cast(batch.column(name), kind, name, start, self.path)
                .to_numpy(zero_copy_only=False) for name, kind in TOKEN_TYPES.items()))
            yield activations, tokens
            start += batch.num_rows


def open_input(path: str | Path, token_ids: str | Path | None = None) -> ActivationInput:
    """Recognise an input by its suffix and check what can be checked without reading it all:
    the columns and the activations' type (tables), the arrays' names, shapes and dtypes
    (.npz, .npy). Widths of variable-length rows are checked as they are read. `token_ids` is
    the .npy of token ids that an .npy of activations needs (--token-ids)."""
    source = Path(path).expanduser().resolve()
    _sniff(source)
    if source.suffix == ".npy":
        if token_ids is None:
            raise InvalidActivationsError(
                f"{source}: a .npy file holds no token ids, which every activation set needs; "
                "give them with --token-ids IDS.npy ([n_sequences, seq_len] integers), or "
                f"{NPZ_FIX}")
        return _npy_input(source, Path(token_ids).expanduser().resolve())
    if token_ids is not None:
        raise InvalidActivationsError(
            f"--token-ids goes with a .npy file of activations; {source} holds its own token ids")
    if source.is_dir():
        return _table_input(source, "hf_dataset")
    if source.suffix == ".parquet":
        return _table_input(source, "parquet")
    if source.suffix == ".npz":
        return _npz_input(source)
    raise InvalidActivationsError(
        f"{source}: expected a datasets save_to_disk folder, a .parquet file, an .npz file or an "
        ".npy file with --token-ids")


def _sniff(source: Path) -> None:
    """Refuse a file whose first bytes are not its suffix's format (a pickle named .parquet),
    before a reader fails on it."""
    if source.is_dir():
        return
    if source.suffix == ".parquet":
        require_parquet(source, str(source), InvalidActivationsError)
    elif source.suffix == ".npz":
        require_start(source, ZIP_MAGIC, "an .npz file", str(source), InvalidActivationsError)
    elif source.suffix == ".npy":
        require_start(source, NPY_MAGIC, "an .npy file", str(source), InvalidActivationsError)


# --- tables: datasets folders and Parquet files -------------------------------------------------


def _table_input(source: Path, kind: str) -> ActivationInput:
    if kind == "parquet":
        parquet = pq.ParquetFile(source)
        schema, n_rows = parquet.schema_arrow, parquet.metadata.num_rows
    else:
        table = _dataset_table(source)
        schema, n_rows = table.schema, table.num_rows
    what = "Parquet" if kind == "parquet" else "datasets"
    missing = [c for c in ("activations", *TOKEN_COLUMNS) if c not in schema.names]
    if missing:
        raise InvalidActivationsError(
            f"{source} lacks column(s) {', '.join(missing)}; an activation set needs "
            f"activations, {', '.join(TOKEN_COLUMNS)}")
    kind_of = schema.field("activations").type
    is_list = (pa.types.is_fixed_size_list(kind_of) or pa.types.is_list(kind_of)
               or pa.types.is_large_list(kind_of))
    if not is_list or not pa.types.is_floating(kind_of.value_type):
        raise InvalidActivationsError(
            f"{source}: column 'activations' is {kind_of}; it must be a list of floats (float16, "
            "float32 or float64) per row, of one length d_model")
    if n_rows == 0:
        raise InvalidActivationsError(f"{source}: the set is empty")
    if pa.types.is_fixed_size_list(kind_of):
        d_model = kind_of.list_size
    else:
        first = next(_table_batches(source, kind, 1)).column("activations")
        if first.null_count:
            raise InvalidActivationsError(f"{source}: row 0 of 'activations' is null")
        d_model = len(first[0])
    if d_model == 0:
        raise InvalidActivationsError(f"{source}: the activation rows are empty (width 0)")
    in_place = pa.types.is_fixed_size_list(kind_of) and kind_of.value_type == pa.float32()
    return ActivationInput(source, kind, f"{what} column activations: {kind_of}", n_rows,
                           d_model, in_place)


def _dataset_table(source: Path) -> pa.Table:
    import datasets

    try:
        return datasets.load_from_disk(str(source)).data.table  # memory-mapped
    except FileNotFoundError as error:
        raise InvalidActivationsError(
            f"{source} is not a saved datasets folder ({error}); pass a folder written by "
            "Dataset.save_to_disk, a .parquet file or an .npz file") from None


def _table_batches(source: Path, kind: str, rows: int) -> Iterator[pa.RecordBatch]:
    columns = ["activations", *TOKEN_COLUMNS]
    if kind == "parquet":
        yield from pq.ParquetFile(source).iter_batches(batch_size=rows, columns=columns)
    else:
        yield from _dataset_table(source).select(columns).to_batches(max_chunksize=rows)


def _float32_rows(column: pa.Array, d_model: int, start: int, source: Path) -> np.ndarray:
    """A slice of the activations column as float32 [rows, d_model]; `start` is the slice's
    first row number, for the errors."""
    if column.null_count:
        row = start + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidActivationsError(f"{source}: row {row} of 'activations' is null")
    if not pa.types.is_fixed_size_list(column.type):
        lengths = pc.list_value_length(column).to_numpy()
        wrong = np.flatnonzero(lengths != d_model)
        if len(wrong):
            row = start + int(wrong[0])
            raise InvalidActivationsError(
                f"{source}: row {row} of 'activations' has {int(lengths[wrong[0]])} values but "
                f"row 0 has {d_model}; every row must have the same width d_model")
    values = column.flatten()
    if values.null_count:
        position = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidActivationsError(
            f"{source}: row {start + position // d_model} of 'activations' holds a null value")
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d_model)


def _cast(column: pa.Array, kind: pa.DataType, name: str, start: int, source: Path) -> pa.Array:
    if column.null_count:
        raise InvalidActivationsError(
            f"{source}: column {name!r} has null values (first in rows {start}..)")
    try:
        return column.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise InvalidActivationsError(
            f"{source}: column {name!r} ({column.type}) in rows {start}.. cannot be read as "
            f"{kind}: {error}") from None


# --- .npz files ---------------------------------------------------------------------------------


def _npz_input(source: Path) -> ActivationInput:
    with zipfile.ZipFile(source) as archive:
        names = {Path(n).stem for n in archive.namelist()}
        missing = [n for n in ("activations", "token_ids") if n not in names]
        if missing:
            raise InvalidActivationsError(
                f"{source} holds {', '.join(sorted(names)) or 'no arrays'}, not "
                f"{' and '.join(missing)}; {NPZ_FIX}")
        shape, dtype = _npy_header(archive, "activations", source)[:2]
    token_ids = _small_array(source, "token_ids")
    _check_layout(source, shape, dtype, token_ids)
    if "split" in names:
        split = _small_array(source, "split")
        if split.shape != shape[:1] or split.dtype.kind != "U":
            raise InvalidActivationsError(
                f"{source}: split must be strings, one per sequence ({shape[0]}), got "
                f"{split.dtype} of shape {split.shape}")
    return ActivationInput(source, "npz", f"npz array activations: {dtype} {list(shape)}",
                           shape[0] * shape[1], shape[2], in_place=False)


def _check_layout(source: Path, shape: tuple, dtype: np.dtype, token_ids: np.ndarray) -> None:
    """Activations [n_sequences, seq_len, d_model] of a float dtype, and integer token ids
    [n_sequences, seq_len]: the layout of .npz and .npy inputs."""
    if len(shape) != 3:
        raise InvalidActivationsError(
            f"{source}: activations has shape {shape}; expected [n_sequences, seq_len, d_model] "
            "(sequences of equal length; reshape a flat [n_tokens, d_model] array with "
            "acts.reshape(n_sequences, seq_len, -1), or store sequences of different lengths as "
            "a Parquet table with sequence_id and position columns)")
    if dtype.kind == "V" and dtype.itemsize == 2:
        raise InvalidActivationsError(
            f"{source}: activations are 2-byte values of no numeric type (bfloat16 saved through "
            "ml_dtypes?); numpy cannot say what they are: save x.float().numpy() (exact for "
            "bfloat16) instead")
    if dtype.kind != "f":
        raise InvalidActivationsError(
            f"{source}: activations are {dtype}; expected float16, float32 or float64")
    if token_ids.shape != shape[:2]:
        raise InvalidActivationsError(
            f"{source}: token_ids has shape {token_ids.shape} but activations has "
            f"{shape[:2]} sequences x positions; they must match")
    if token_ids.dtype.kind not in "iu":
        raise InvalidActivationsError(f"{source}: token_ids are {token_ids.dtype}, not integers")
    if 0 in shape:
        raise InvalidActivationsError(f"{source}: activations are empty (shape {shape})")


def _npy_header(archive: zipfile.ZipFile, name: str, source: Path):
    """(shape, dtype, fortran_order) of one array of an .npz, from its header alone."""
    with archive.open(f"{name}.npy") as member:
        return _read_header(member, name, source)


def _read_header(member, name: str, source: Path):
    version = np.lib.format.read_magic(member)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise InvalidActivationsError(f"{source}: {name} is in .npy format {version}, unknown")
    shape, fortran_order, dtype = read(member)
    if fortran_order:
        raise InvalidActivationsError(
            f"{source}: {name} is stored in Fortran order; save np.ascontiguousarray(x) instead")
    return shape, dtype, fortran_order


def _small_array(source: Path, name: str) -> np.ndarray:
    """One of the small arrays of an .npz (token ids, splits), read whole, never unpickled."""
    try:
        with np.load(source, allow_pickle=False) as archive:
            return archive[name]
    except ValueError as error:  # an object array needs pickle, which is never used
        raise InvalidActivationsError(
            f"{source}: {name} cannot be read without pickle ({error}); save it as a numeric or "
            "fixed-width string array") from None


def _npz_slices(source: Path, d_model: int, rows: int
                ) -> Iterator[tuple[np.ndarray, TokenColumns]]:
    token_ids = _small_array(source, "token_ids").astype(np.int64)
    n_sequences, seq_len = token_ids.shape
    with np.load(source, allow_pickle=False) as archive:
        has_split = "split" in archive.files
    splits = (_small_array(source, "split") if has_split
              else np.full(n_sequences, DEFAULT_SPLIT))
    per_slice = max(1, rows // seq_len)  # whole sequences per slice
    with zipfile.ZipFile(source) as archive, archive.open("activations.npy") as member:
        _, dtype, _ = _read_header(member, "activations", source)
        for first in range(0, n_sequences, per_slice):
            count = min(per_slice, n_sequences - first)
            raw = member.read(count * seq_len * d_model * dtype.itemsize)
            values = np.frombuffer(raw, dtype=dtype).astype(np.float32).reshape(-1, d_model)
            yield values, _sequence_columns(first, count, token_ids, splits)


def _sequence_columns(first: int, count: int, token_ids: np.ndarray,
                      splits: np.ndarray) -> TokenColumns:
    """Token columns of sequences first .. first + count - 1 of an [n_sequences, seq_len] layout."""
    seq_len = token_ids.shape[1]
    return TokenColumns(
        np.repeat(np.arange(first, first + count, dtype=np.int64), seq_len),
        np.tile(np.arange(seq_len, dtype=np.int32), count),
        token_ids[first:first + count].reshape(-1),
        np.repeat(splits[first:first + count].astype(object), seq_len))


# --- .npy files: activations, with their token ids in a second .npy ------------------------------


def _npy_input(source: Path, ids_path: Path) -> ActivationInput:
    with open(source, "rb") as member:
        shape, dtype, _ = _read_header(member, "activations", source)
    _check_layout(source, shape, dtype, _npy_token_ids(ids_path))
    return ActivationInput(source, "npy", f"npy array activations: {dtype} {list(shape)}",
                           shape[0] * shape[1], shape[2], in_place=False, token_ids=ids_path)


def _npy_token_ids(path: Path) -> np.ndarray:
    if path.suffix != ".npy":
        raise InvalidActivationsError(f"--token-ids {path}: expected an .npy file (np.save)")
    require_start(path, NPY_MAGIC, "an .npy file", f"--token-ids {path}",
                  InvalidActivationsError)
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        raise InvalidActivationsError(
            f"--token-ids {path} cannot be read without pickle ({error}); save an integer "
            "array") from None


def _npy_slices(source: Path, ids_path: Path, rows: int
                ) -> Iterator[tuple[np.ndarray, TokenColumns]]:
    token_ids = _npy_token_ids(ids_path).astype(np.int64)
    n_sequences, seq_len = token_ids.shape
    splits = np.full(n_sequences, DEFAULT_SPLIT)
    activations = np.load(source, mmap_mode="r", allow_pickle=False)
    per_slice = max(1, rows // seq_len)  # whole sequences per slice
    for first in range(0, n_sequences, per_slice):
        count = min(per_slice, n_sequences - first)
        values = np.asarray(activations[first:first + count], dtype=np.float32)
        yield values.reshape(-1, activations.shape[2]), _sequence_columns(
            first, count, token_ids, splits)
