"""Token ids as text: finding a run's tokenizer, its token_strings rows, decoded example contexts.

Where a run's tokenizer is looked for, in this order (`TokenizerSearch`): the folder given with
--tokenizer, the folder registered with the run (runs.tokenizer), then the checkpoint folder
itself (Hugging Face runs keep their tokenizer beside the weights). Tokenizers are loaded offline
(local_files_only); nothing is downloaded.

`token_strings` holds every token id of a run with its text, decoded on its own as it appears in
running text (a leading space is kept), so any token column of the warehouse can be joined to
text. Demo runs have no tokenizer: their strings are the task vocabulary's names, each with a
leading space, so a demo context reads " <induction> s3 s7 s3".

A decoded context is the token strings of its ids concatenated, with the activating token marked
as ⟦token⟧. An id the strings do not cover (a model vocabulary padded beyond its tokenizer) is
shown as ⟨id⟩.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from featurestore.errors import FeaturestoreError
from featurestore.registry import Run

# Files any saved tokenizer has at least one of (fast, slow BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
DEMO_TOKENIZER = "demo task vocabulary"  # token_strings.tokenizer of demo runs
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"


@dataclass(frozen=True)
class FoundTokenizer:
    tokenizer: Any  # a transformers tokenizer
    folder: str  # the absolute folder it was loaded from


class TokenizerSearch:
    """Where a model's tokenizer may be, tried in order: `explicit` (--tokenizer), `registered`
    (runs.tokenizer), then `model_folder` if it holds tokenizer files. The search runs once."""

    def __init__(self, explicit: str | None = None, registered: str | None = None,
                 model_folder: Path | None = None):
        self.explicit = explicit
        self.registered = registered
        self.model_folder = model_folder
        self._searched = False
        self._found: FoundTokenizer | None = None

    def find(self) -> FoundTokenizer | None:
        """The tokenizer, or None when no --tokenizer, registered folder or tokenizer files in
        the model folder exist. A folder that is named but does not load is an error."""
        if not self._searched:
            self._found = self._search()
            self._searched = True
        return self._found

    def require(self, purpose: str) -> FoundTokenizer:
        found = self.find()
        if found is None:
            where = (f"{self.model_folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})"
                     if self.model_folder is not None else "there is no model folder to look in")
            raise FeaturestoreError(
                f"{purpose} needs the model's tokenizer and none was found: no --tokenizer was "
                f"given, the run has no registered tokenizer, and {where}. Pass --tokenizer DIR, "
                "a folder written by tokenizer.save_pretrained.")
        return found

    def _search(self) -> FoundTokenizer | None:
        if self.explicit is not None:
            return load_tokenizer(self.explicit, "--tokenizer")
        if self.registered is not None:
            return load_tokenizer(self.registered, "the run's tokenizer (runs.tokenizer)")
        folder = self.model_folder
        if folder is not None and folder.is_dir() and any(
                (folder / name).is_file() for name in TOKENIZER_FILES):
            return load_tokenizer(folder, "the tokenizer in the model folder")
        return None


def load_tokenizer(folder: str | os.PathLike, what: str) -> FoundTokenizer:
    """A transformers tokenizer from a local folder (AutoTokenizer, local files only)."""
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise FeaturestoreError(
            f"{what} {path} is not a folder; pass a folder written by tokenizer.save_pretrained")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FeaturestoreError(
            f"{what} {path}: no tokenizer loads from it ({error}); pass a folder written by "
            "tokenizer.save_pretrained") from None
    return FoundTokenizer(tokenizer, str(path))


def token_texts(tokenizer) -> list[str]:
    """The text of every token id of `tokenizer` (len(tokenizer) of them), leading space kept.

    Decoding [id] alone is not enough: SentencePiece-style decoders (Llama, Mistral) drop the
    leading space of a text's first token. So each id is decoded after an anchor token (the EOS,
    else id 0), and the anchor's own text is cut off.
    """
    anchor = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    options = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    head = tokenizer.decode([anchor], **options)
    texts = tokenizer.batch_decode([[anchor, i] for i in range(len(tokenizer))], **options)
    changed = [i for i, text in enumerate(texts) if not text.startswith(head)]
    if changed:
        raise FeaturestoreError(
            f"the tokenizer decodes token {anchor} ({head!r}) differently when token "
            f"{changed[0]} follows it, so token strings cannot be cut out of its decodes")
    return [text[len(head):] for text in texts]


def has_token_strings(con: duckdb.DuckDBPyConnection, run: str) -> bool:
    return con.execute("SELECT count(*) FROM token_strings WHERE run = ?", [run]).fetchone()[0] > 0


def token_string_rows(run: Run, search: TokenizerSearch) -> list[dict] | None:
    """token_strings rows of a run: its demo vocabulary's names, or its tokenizer's decodes;
    None for a run whose tokenizer is not found."""
    if run.model_family == "demo":
        from featurestore.tasks import task_from_config

        task = task_from_config(run.task_config)
        texts, source = [" " + name for name in task.token_names()], DEMO_TOKENIZER
    else:
        found = search.find()
        if found is None:
            return None
        texts, source = token_texts(found.tokenizer), found.folder
    return [{"run": run.run, "token_id": i, "token_text": text, "tokenizer": source}
            for i, text in enumerate(texts)]


def missing_token_strings(con: duckdb.DuckDBPyConnection, models: list[tuple[Run, Path | None]],
                          tokenizer: str | None = None) -> list[dict]:
    """token_strings rows of every run in `models` ((run, its checkpoint folder) pairs) that has
    none yet and whose tokenizer is found (`tokenizer`: --tokenizer, tried first)."""
    rows, done = [], set()
    for run, folder in models:
        if run.run in done or has_token_strings(con, run.run):
            continue
        done.add(run.run)
        rows += token_string_rows(run, TokenizerSearch(tokenizer, run.tokenizer, folder)) or []
    return rows


class TokenStrings:
    """A run's token strings, for decoding token ids."""

    def __init__(self, texts: dict[int, str]):
        self.texts = texts

    @classmethod
    def load(cls, con: duckdb.DuckDBPyConnection, run: str | None) -> TokenStrings | None:
        """The run's strings from token_strings; None when it has none (or no run is given)."""
        if run is None:
            return None
        rows = con.execute("SELECT token_id, token_text FROM token_strings WHERE run = ?",
                           [run]).fetchall()
        return cls(dict(rows)) if rows else None

    def text(self, token_id: int) -> str:
        return self.texts.get(int(token_id), f"⟨{int(token_id)}⟩")

    def context(self, token_ids: list[int], at: int) -> str:
        """The ids decoded, the one at index `at` marked as ⟦token⟧."""
        return ("".join(self.text(t) for t in token_ids[:at])
                + MARK_OPEN + self.text(token_ids[at]) + MARK_CLOSE
                + "".join(self.text(t) for t in token_ids[at + 1:]))

    def decode_examples(self, rows: list[dict]) -> None:
        """Fill token_text and context_text of feature_examples rows (in place)."""
        for row in rows:
            at = row["position"] - row["context_start"]
            row["token_text"] = self.text(row["context_token_ids"][at])
            row["context_text"] = self.context(row["context_token_ids"], at)
