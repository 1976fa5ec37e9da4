"""A token set from a file: text or token ids, packed into sequences and sampled by split.

`--tokens-from PATH` (collect, and train-crosscoder's activation buffer) reads

    .txt        plain text; blank lines separate documents; one split, `all`
    .jsonl      one JSON object per line
    .parquet    a Parquet file
    a folder    a datasets save_to_disk folder (a DatasetDict's names are its splits)

A table holds either text (the --text-column, default `text`) or token ids (`input_ids`, lists of
one length: the file is then pre-tokenized and its ids are used as they are, any text column
unread), and optionally a `split` column naming each row's split (`all` when it has none).

Text is tokenized with the model's tokenizer (featurestore.token_text.TokenizerSearch), without
the special tokens the tokenizer would add (such as a BOS). The documents of each split are
joined into one token stream, each followed by the tokenizer's EOS token (a tokenizer without one
is refused: documents would run into each other unmarked), and the stream is cut into sequences
of --seq-len tokens (default: the model's context, at most DEFAULT_SEQ_LEN; a longer --seq-len is
refused), the last partial sequence dropped. Sequences never cross splits.

Sampling is balanced and seeded: every split gives the same number of sequences, drawn at random
by a generator seeded from (--seed, split name), so a split's sample does not depend on which
other splits are asked for, and a larger --tokens extends a smaller one's sample. The sequences
are interleaved split by split (a, b, c, a, b, c, ...), so any prefix of the set is balanced too.
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from featurestore.activations import TokenColumns
from featurestore.errors import FeaturestoreError
from featurestore.file_formats import require_parquet
from featurestore.token_text import TokenizerSearch

if TYPE_CHECKING:  # for annotations only: torch is imported when a file is read
    import torch

DEFAULT_SPLIT = "all"  # the one split of a file without a split column
DEFAULT_SEQ_LEN = 128
TEXT_FORMATS = ".txt, .jsonl, .parquet or a datasets save_to_disk folder"


@dataclass(frozen=True)
class CorpusOptions:
    """How to read a token file: the --text-column, --seq-len and --splits flags."""

    text_column: str = "text"
    seq_len: int | None = None  # None: the model's context, at most DEFAULT_SEQ_LEN
    splits: tuple[str, ...] | None = None  # None: every split of the file


DEFAULT_OPTIONS = CorpusOptions()


@dataclass
class TokenSet:
    """Sequences of token ids with their splits, and what they were made from."""

    tokens: torch.Tensor  # int64 [n_sequences, seq_len]
    splits: np.ndarray  # each sequence's split
    source: str  # for activation_sets.token_source: file, tokenizer, seq_len, splits, seed
    notes: list[str] = field(default_factory=list)  # what the user should know, e.g. file size

    def columns(self) -> TokenColumns:
        return sequence_columns(self.tokens, self.splits)


def sequence_columns(tokens, sequence_splits: np.ndarray) -> TokenColumns:
    """TokenColumns of token ids [n_sequences, n_ctx], one split per sequence."""
    n_seq, n_ctx = tokens.shape
    return TokenColumns(
        sequence_id=np.repeat(np.arange(n_seq, dtype=np.int64), n_ctx),
        position=np.tile(np.arange(n_ctx, dtype=np.int32), n_seq),
        token_id=tokens.reshape(-1).numpy().astype(np.int64),
        split=np.repeat(sequence_splits, n_ctx),
    )


def model_context(module) -> int | None:
    """The longest sequence a model takes, from its config; None if the config does not say."""
    config = getattr(module, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def read_token_file(path: str, options: CorpusOptions, seed: int, tokens: int | None,
                    default_tokens: int | None, tokenizer: TokenizerSearch,
                    context: int | None) -> TokenSet:
    """The token set of a file: `tokens` tokens (rounded up to whole sequences in equal shares
    of the splits; more than the file holds is an error), or when None, `default_tokens` or the
    whole file if it holds fewer (with a note), or the whole file when both are None.
    `context` is the model's longest sequence (None: unknown)."""
    import torch

    table = read_table(path, options.text_column)
    if table.num_rows == 0:  # before any check that would ask for a flag or a tokenizer
        raise FeaturestoreError(f"--tokens-from {path}: the file holds no rows; give a file of "
                                "text or token ids (input_ids)")
    splits_of_rows = split_column(table, path)
    notes = []
    if "input_ids" in table.column_names:
        if options.seq_len is not None:
            raise FeaturestoreError(
                f"--seq-len applies to text; {path} is pre-tokenized (input_ids), its sequences "
                "are used as they are")
        by_split, seq_len = pretokenized(table, splits_of_rows, path)
        if context is not None and seq_len > context:
            raise FeaturestoreError(
                f"--tokens-from {path}: its sequences have {seq_len} tokens but the model takes "
                f"at most {context}; pack the ids into shorter sequences")
        what = "input_ids"
    else:
        found = tokenizer.require(f"--tokens-from {path} (text)")
        if options.seq_len is None and context is None:
            notes.append(f"the model's config names no context length: sequences of "
                         f"{DEFAULT_SEQ_LEN} tokens (choose with --seq-len)")
        seq_len = choose_seq_len(options.seq_len, context)
        texts = text_column(table, options.text_column, path)
        by_split = pack(texts, splits_of_rows, found.tokenizer, seq_len, path)
        what = (f"text column={options.text_column} tokenizer={found.folder} "
                f"eos={found.tokenizer.eos_token!r}")
    splits = choose_splits(options.splits, sorted(by_split), path)
    rows, row_splits, sample_notes = sample(by_split, splits, seq_len, seed, tokens,
                                            default_tokens, path)
    source = (f"file {Path(path).resolve()} {what} seq_len={seq_len} "
              f"splits={','.join(splits)} seed={seed} sequences={len(rows)}")
    return TokenSet(torch.from_numpy(rows), row_splits, source, notes + sample_notes)


# --- reading ----------------------------------------------------------------------------------


def read_table(path: str, text_column: str) -> pa.Table:
    """The file as an Arrow table (a .txt file: one row per document in `text_column`)."""
    source = Path(path)
    if source.is_dir():
        return _datasets_table(source)
    if not source.is_file():
        raise FeaturestoreError(f"--tokens-from {path}: no such file or folder")
    suffix = source.suffix.lower()
    try:
        if suffix == ".txt":
            text = source.read_text(encoding="utf-8")
            documents = [d.strip() for d in re.split(r"\n\s*\n", text)]
            return pa.table({text_column: [d for d in documents if d]})
        if suffix == ".jsonl":
            import pyarrow.json

            return pyarrow.json.read_json(source)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            require_parquet(source, f"--tokens-from {path}")
            return pq.read_table(source)
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        raise FeaturestoreError(f"--tokens-from {path}: cannot read it ({error})") from None
    raise FeaturestoreError(f"--tokens-from {path}: expected {TEXT_FORMATS}")


def _datasets_table(folder: Path) -> pa.Table:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise FeaturestoreError(
            f"--tokens-from {folder}: not a datasets save_to_disk folder ({error}); expected "
            f"{TEXT_FORMATS}") from None
    if isinstance(loaded, datasets.Dataset):
        return loaded.data.table
    # A DatasetDict: its names are the splits.
    tables = []
    for name, dataset in loaded.items():
        table = dataset.data.table
        if "split" in table.column_names:
            raise FeaturestoreError(
                f"--tokens-from {folder}: a DatasetDict whose datasets also have a split "
                "column; keep one of the two")
        tables.append(table.append_column("split", pa.array([name] * len(table), pa.string())))
    return pa.concat_tables(tables)


def split_column(table: pa.Table, path: str) -> np.ndarray:
    """Each row's split: the `split` column, or DEFAULT_SPLIT for all rows."""
    if "split" not in table.column_names:
        return np.full(len(table), DEFAULT_SPLIT, dtype=object)
    column = table.column("split")
    if column.null_count:
        raise FeaturestoreError(f"--tokens-from {path}: {column.null_count} rows have no split; "
                                "give every row a split, or drop the split column")
    return np.asarray(column.cast(pa.string()).to_pylist(), dtype=object)


def text_column(table: pa.Table, name: str, path: str) -> list[str]:
    if name not in table.column_names:
        raise FeaturestoreError(
            f"--tokens-from {path}: no text column {name!r} and no input_ids (columns: "
            f"{', '.join(table.column_names)}); name the text column with --text-column")
    column = table.column(name)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise FeaturestoreError(
            f"--tokens-from {path}: column {name!r} holds {column.type}, not text; name the text "
            "column with --text-column")
    if column.null_count:
        raise FeaturestoreError(f"--tokens-from {path}: {column.null_count} rows of {name!r} are "
                                "null; drop them or give them text")
    return column.to_pylist()


def pretokenized(table: pa.Table, splits_of_rows: np.ndarray, path: str
                 ) -> tuple[dict[str, np.ndarray], int]:
    """(split -> token ids [n, length], length) of an input_ids column of equal-length lists."""
    ids = table.column("input_ids").combine_chunks()
    lengths = set(pa.compute.list_value_length(ids).to_pylist())
    if len(lengths) != 1:
        raise FeaturestoreError(
            f"--tokens-from {path}: input_ids have lengths {sorted(lengths)[:5]}; every sequence "
            "must have the same length (pack or truncate them first, or give text)")
    (length,) = lengths
    # a writable copy: Arrow's buffers are read-only
    rows = np.array(ids.flatten().to_numpy(), dtype=np.int64).reshape(-1, length)
    return {s: rows[splits_of_rows == s] for s in set(splits_of_rows)}, length


# --- text to sequences ------------------------------------------------------------------------


def choose_seq_len(seq_len: int | None, context: int | None) -> int:
    if seq_len is None:
        return DEFAULT_SEQ_LEN if context is None else min(context, DEFAULT_SEQ_LEN)
    if seq_len < 1:
        raise FeaturestoreError(f"--seq-len must be positive, got {seq_len}")
    if context is not None and seq_len > context:
        raise FeaturestoreError(
            f"--seq-len {seq_len} is longer than the model's context of {context} tokens; give "
            f"at most {context}")
    return seq_len


def pack(texts: list[str], splits_of_rows: np.ndarray, tokenizer, seq_len: int,
         path: str) -> dict[str, np.ndarray]:
    """split -> token ids [n, seq_len]: the split's documents tokenized, each followed by EOS,
    joined and cut into sequences (the last partial one dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FeaturestoreError(
            f"--tokens-from {path}: the tokenizer has no EOS token, which separates documents "
            "when they are packed into sequences; set one (tokenizer.eos_token = ..., then "
            "save_pretrained), or give pre-tokenized input_ids")
    # verbose=False: documents longer than the model's context are expected, they get cut
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    out = {}
    for split in sorted(set(splits_of_rows)):
        documents = [encoded[i] + [eos] for i in np.flatnonzero(splits_of_rows == split)
                     if encoded[i]]  # an empty text adds nothing, not a lone EOS
        stream = np.fromiter(itertools.chain.from_iterable(documents), dtype=np.int64)
        n = len(stream) // seq_len
        out[split] = stream[:n * seq_len].reshape(n, seq_len)
    return out


# --- sampling ---------------------------------------------------------------------------------


def choose_splits(wanted: tuple[str, ...] | None, available: list[str], path: str) -> list[str]:
    if wanted is None:
        return available
    if not wanted:
        raise FeaturestoreError("--splits: give at least one split")
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise FeaturestoreError(
            f"--splits: {path} has no split {', '.join(map(repr, unknown))}; its splits: "
            f"{', '.join(available)}")
    if len(set(wanted)) != len(wanted):
        raise FeaturestoreError(f"--splits: splits repeat in {','.join(wanted)}")
    return list(wanted)


def sample(by_split: dict[str, np.ndarray], splits: list[str], seq_len: int, seed: int,
           tokens: int | None, default_tokens: int | None, path: str
           ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(token ids [n, seq_len], each sequence's split, notes): equal shares of `splits`, drawn
    at random, interleaved split by split."""
    counts = {s: len(by_split[s]) for s in splits}
    smallest = min(splits, key=counts.__getitem__)
    most = counts[smallest] * len(splits)  # sequences in equal shares
    if most == 0:
        raise FeaturestoreError(
            f"--tokens-from {path}: split {smallest!r} has too little text for one sequence of "
            f"{seq_len} tokens; give more text or a smaller --seq-len")
    limit = (f"{path} holds at most {most * seq_len} tokens in equal shares of splits "
             f"{', '.join(splits)} (split {smallest!r} has {counts[smallest]} sequences of "
             f"{seq_len} tokens)" if len(splits) > 1 else
             f"{path} holds at most {most * seq_len} tokens ({most} sequences of {seq_len})")
    notes = []
    if tokens is not None:
        if tokens < 1:
            raise FeaturestoreError(f"--tokens must be positive, got {tokens}")
        wanted = math.ceil(tokens / seq_len)
        if wanted > most:
            raise FeaturestoreError(f"--tokens {tokens}: {limit}; lower --tokens to at most "
                                    f"{most * seq_len}")
    elif default_tokens is not None and math.ceil(default_tokens / seq_len) <= most:
        wanted = math.ceil(default_tokens / seq_len)
    else:
        wanted = most
        if default_tokens is not None:
            notes.append(f"{limit}, fewer than the default {default_tokens}: using all of them "
                         "(choose with --tokens)")
        left_out = sum(counts.values()) - most
        if left_out:
            notes.append(f"{left_out} sequences of the larger splits are left out to keep equal "
                         f"shares of the splits (split {smallest!r} has {counts[smallest]})")
    per_split = math.ceil(wanted / len(splits))
    picked = np.stack([
        by_split[s][_generator(seed, s).permutation(counts[s])[:per_split]] for s in splits])
    rows = picked.transpose(1, 0, 2).reshape(-1, seq_len)  # interleaved: a, b, c, a, b, c, ...
    return rows, np.tile(np.array(splits, dtype=object), per_split), notes


def _generator(seed: int, split: str) -> np.random.Generator:
    """The split's own generator: its sample does not depend on the other splits asked for."""
    return np.random.default_rng(zlib.crc32(f"{seed}:{split}".encode()))
