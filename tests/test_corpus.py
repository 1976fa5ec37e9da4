"""Token files (featurestore.corpus) and token text (featurestore.token_text), without models:
packing, balanced seeded sampling, pre-tokenized input, the errors, and token strings."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featurestore.corpus import CorpusOptions, read_token_file
from featurestore.errors import FeaturestoreError
from featurestore.token_text import TokenizerSearch, TokenStrings, token_texts

from .text_models import EOS, documents, train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(tokenizer folder, saved tokenizer, the documents, .txt file, .jsonl file with splits)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = documents(n_documents=90)
    tokenizer = train_tokenizer([text for _, text in docs])
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "corpus.txt").write_text("\n\n \n".join(text for _, text in docs) + "\n")
    (root / "corpus.jsonl").write_text("".join(
        json.dumps({"body": text, "split": topic}) + "\n" for topic, text in docs))
    return root / "tokenizer", tokenizer, docs, root / "corpus.txt", root / "corpus.jsonl"


def read(path, tokenizer_dir=None, tokens=None, default_tokens=None, seed=0, context=None,
         **options):
    return read_token_file(str(path), CorpusOptions(**options), seed, tokens, default_tokens,
                           TokenizerSearch(None if tokenizer_dir is None else str(tokenizer_dir)),
                           context)


def packed(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """The packing, computed independently: every document's ids and an EOS, cut."""
    stream = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    n = len(stream) // seq_len
    return np.array(stream[:n * seq_len]).reshape(n, seq_len)


def test_a_text_file_is_packed_documents_joined_by_eos(corpus):
    tokenizer_dir, tokenizer, docs, txt, _ = corpus
    result = read(txt, tokenizer_dir, context=64, seq_len=24)
    expected = packed(tokenizer, [text for _, text in docs], 24)
    # The whole file (no --tokens, no default): every packed sequence once, in a seeded order.
    assert sorted(map(tuple, result.tokens.numpy())) == sorted(map(tuple, expected))
    assert not np.array_equal(result.tokens.numpy(), expected)  # drawn at random, not in order
    assert set(result.splits) == {"all"}
    assert f"tokenizer={tokenizer_dir.resolve()}" in result.source
    assert "seq_len=24 splits=all seed=0" in result.source and f"eos='{EOS}'" in result.source
    columns = result.columns()
    assert len(columns) == result.tokens.numel() and columns.position.max() == 23


def test_seq_len_defaults_to_the_context_up_to_128_and_is_refused_beyond_it(corpus):
    tokenizer_dir, _, _, txt, _ = corpus
    assert read(txt, tokenizer_dir, context=40).tokens.shape[1] == 40
    assert read(txt, tokenizer_dir, context=4096).tokens.shape[1] == 128
    unknown = read(txt, tokenizer_dir, context=None)
    assert unknown.tokens.shape[1] == 128 and "names no context length" in unknown.notes[0]
    with pytest.raises(FeaturestoreError, match="--seq-len 65 is longer than the model's "
                                                "context of 64 tokens; give at most 64"):
        read(txt, tokenizer_dir, context=64, seq_len=65)


def test_sampling_is_balanced_seeded_and_interleaved(corpus):
    tokenizer_dir, tokenizer, docs, _, jsonl = corpus
    first = read(jsonl, tokenizer_dir, tokens=600, seed=0, text_column="body", seq_len=16)
    n = first.tokens.shape[0]
    assert n * 16 >= 600 and n == 3 * 13  # ceil(600 / 16) = 38 sequences, 13 per split
    assert Counter(first.splits) == {"cooking": 13, "travel": 13, "weather": 13}
    assert list(first.splits[:6]) == ["cooking", "travel", "weather"] * 2
    # Every sequence is one of its split's packed sequences.
    for split in ("cooking", "travel", "weather"):
        own = {tuple(r) for r in packed(tokenizer, [t for s, t in docs if s == split], 16)}
        assert {tuple(r) for r in first.tokens[first.splits == split].numpy()} <= own
    again = read(jsonl, tokenizer_dir, tokens=600, seed=0, text_column="body", seq_len=16)
    other = read(jsonl, tokenizer_dir, tokens=600, seed=1, text_column="body", seq_len=16)
    assert np.array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)
    # A split's sample does not depend on the other splits asked for.
    travel = read(jsonl, tokenizer_dir, tokens=208, seed=0, text_column="body", seq_len=16,
                  splits=("travel",))
    assert np.array_equal(travel.tokens, first.tokens[first.splits == "travel"])
    assert "splits=travel seed=0" in travel.source


def test_splits_are_checked_against_the_file(corpus):
    tokenizer_dir, _, _, txt, jsonl = corpus
    with pytest.raises(FeaturestoreError, match="has no split 'news'; its splits: cooking, "
                                                "travel, weather"):
        read(jsonl, tokenizer_dir, text_column="body", splits=("news", "travel"))
    with pytest.raises(FeaturestoreError, match="has no split 'bigram'; its splits: all"):
        read(txt, tokenizer_dir, splits=("bigram",))
    with pytest.raises(FeaturestoreError, match="no text column 'text' and no input_ids "
                                                r"\(columns: body, split\).*--text-column"):
        read(jsonl, tokenizer_dir)


def test_file_size_default_and_explicit_tokens(corpus):
    tokenizer_dir, _, _, _, jsonl = corpus
    whole = read(jsonl, tokenizer_dir, default_tokens=10**6, text_column="body", seq_len=16)
    smallest = min(Counter(whole.splits).values())
    assert Counter(whole.splits) == dict.fromkeys(("cooking", "travel", "weather"), smallest)
    assert f"holds at most {3 * smallest * 16} tokens in equal shares" in whole.notes[0]
    assert "fewer than the default 1000000: using all of them" in whole.notes[0]
    small = read(jsonl, tokenizer_dir, default_tokens=480, text_column="body", seq_len=16)
    assert small.tokens.shape == (30, 16) and small.notes == []
    with pytest.raises(FeaturestoreError, match=f"--tokens 1000000: .* lower --tokens to at most "
                                                f"{3 * smallest * 16}"):
        read(jsonl, tokenizer_dir, tokens=10**6, text_column="body", seq_len=16)


def test_pretokenized_files_are_sampled_the_same_way(tmp_path):
    ids = np.arange(40 * 8).reshape(40, 8)
    splits = ["a"] * 10 + ["b"] * 30
    pq.write_table(pa.table({"input_ids": ids.tolist(), "split": splits}), tmp_path / "ids.parquet")
    result = read(tmp_path / "ids.parquet", tokens=64, context=8)
    assert Counter(result.splits) == {"a": 4, "b": 4}
    for row, split in zip(result.tokens.numpy(), result.splits):
        assert splits[row[0] // 8] == split and np.array_equal(row, ids[row[0] // 8])
    assert "input_ids seq_len=8 splits=a,b seed=0" in result.source
    note = read(tmp_path / "ids.parquet", context=8).notes
    assert "20 sequences of the larger splits are left out" in note[0]
    with pytest.raises(FeaturestoreError, match="--seq-len applies to text"):
        read(tmp_path / "ids.parquet", seq_len=4)
    with pytest.raises(FeaturestoreError, match="sequences have 8 tokens but the model takes "
                                                "at most 4"):
        read(tmp_path / "ids.parquet", context=4)
    with pytest.raises(FeaturestoreError, match="lower --tokens to at most 160"):
        read(tmp_path / "ids.parquet", tokens=161)


def test_text_needs_a_tokenizer_with_an_eos(corpus, tmp_path):
    _, tokenizer, _, txt, _ = corpus
    with pytest.raises(FeaturestoreError, match="needs the model's tokenizer and none was found"
                                                ".*Pass --tokenizer DIR"):
        read_token_file(str(txt), CorpusOptions(), 0, None, None,
                        TokenizerSearch(None, None, tmp_path), 64)
    from transformers import PreTrainedTokenizerFast

    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    no_eos.save_pretrained(tmp_path / "no_eos")
    with pytest.raises(FeaturestoreError, match="the tokenizer has no EOS token"):
        read(txt, tmp_path / "no_eos", context=64)
    with pytest.raises(FeaturestoreError, match="--tokenizer .* no tokenizer loads from it"):
        read(txt, tmp_path, context=64)


def test_token_strings_keep_leading_spaces_for_byte_level_and_sentencepiece_decoders(corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, byte_level, docs, _, _ = corpus
    texts = token_texts(byte_level)
    assert len(texts) == len(byte_level)
    for token_id in range(len(byte_level)):  # the GPT-2 byte-level alphabet maps Ġ to a space
        token = byte_level.convert_ids_to_tokens(token_id)
        assert texts[token_id] == (EOS if token == EOS else
                                   byte_level.convert_tokens_to_string([token]))
    assert " the" in texts

    # Metaspace (Llama-style) decoders drop the first token's leading space when decoding [id].
    spm = Tokenizer(models.BPE())
    spm.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    spm.decoder = decoders.Metaspace(prepend_scheme="first")
    spm.train_from_iterator([t for _, t in docs], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=spm, eos_token="</s>")
    spm_texts = token_texts(wrapped)
    the = wrapped.convert_tokens_to_ids("▁the")
    assert wrapped.decode([the]) == "the" and spm_texts[the] == " the"
    assert spm_texts == [t if t == "</s>" else t.replace("▁", " ")
                         for t in wrapped.convert_ids_to_tokens(list(range(len(wrapped))))]


def test_a_decoded_context_marks_the_activating_token():
    strings = TokenStrings({1: "The", 2: " cat", 3: " sat", 4: "."})
    assert strings.context([1, 2, 3, 4], 2) == "The cat⟦ sat⟧."
    assert strings.context([1, 9], 0) == "⟦The⟧⟨9⟩"
    rows = [{"position": 5, "context_start": 3, "context_token_ids": [1, 2, 3, 4]}]
    strings.decode_examples(rows)
    assert rows[0]["token_text"] == " sat" and rows[0]["context_text"] == "The cat⟦ sat⟧."
