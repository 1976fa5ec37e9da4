"""Text in, decoded examples out, through the CLI: a tiny GPT-2 series trained on generated
English (tests/text_models.py), registered step by step, collected from a .txt file, fitted,
swept, analysed and reported; the examples' text checked against the tokenizer's own decode."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.registry import get_activation_set_row, open_activation_set
from featurestore.warehouse import Warehouse

from .conftest import RELAXED_FLAGS, query
from .text_models import build_text_models

RUN, STAGE, BASIS = "txt", "layer_1_post_mlp", "txt-l1"


def invoke(warehouse, *args):
    return CliRunner().invoke(cli, ["--warehouse", str(warehouse), "--threads", "1", *args])


def ok(warehouse, *args):
    result = invoke(warehouse, *args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def register(warehouse, models) -> None:
    for step, folder in models.folders.items():
        ok(warehouse, "register-model", "--run", RUN, "--path", str(folder), "--step", str(step))


def tokens_of(warehouse, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, splits) of every row of an activation set."""
    wh = Warehouse(warehouse)
    con = wh.connect()
    try:
        row = get_activation_set_row(con, name)
    finally:
        con.close()
    columns = open_activation_set(wh, row).token_columns()
    return np.asarray(columns.token_id), np.asarray(columns.split).astype(str)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_text_models(tmp_path_factory.mktemp("text_models"))


@pytest.fixture(scope="module")
def tokenizer(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.folders[0], local_files_only=True)


def test_text_to_decoded_examples(models, tokenizer, tmp_path):
    warehouse = tmp_path / "wh"
    register(warehouse, models)
    # No --tokens: the file is smaller than the default, so all of it is used, with a note.
    collected = ok(warehouse, "collect", "--run", RUN, "--stage", STAGE, "--tokens-from",
                   str(models.text_file), "--seq-len", "32", "--json", "--quiet")
    result = json.loads(collected.stdout)
    assert "fewer than the default 32768: using all of them" in collected.stderr
    assert result["token_strings"] == len(tokenizer) and result["steps"] == sorted(models.folders)
    (source,) = {s for (s,) in query(warehouse, "SELECT token_source FROM activation_sets")}
    assert source.startswith(f"file {models.text_file.resolve()} text column=text tokenizer=")
    assert "seq_len=32 splits=all seed=0" in source

    # token_strings: every id of the tokenizer, decoded on its own.
    strings = query(warehouse, "SELECT token_id, token_text, tokenizer FROM token_strings "
                               "WHERE run = ? ORDER BY token_id", [RUN])
    assert [text for _, text, _ in strings] == [
        tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in range(len(tokenizer))]
    assert {folder for _, _, folder in strings} == {str(models.folders[0])}
    again = ok(warehouse, "collect", "--run", RUN, "--stage", STAGE, "--tokens-from",
               str(models.text_file), "--seq-len", "32", "--json", "--quiet")
    assert json.loads(again.stdout)["token_strings"] == 0  # written once per run
    assert query(warehouse, "SELECT token_id, token_text, tokenizer FROM token_strings "
                            "ORDER BY token_id") == strings

    ok(warehouse, "shared-feature-fit", "--run", RUN, "--stage", STAGE, "--name", BASIS,
       "--dict-size", "64", "--k", "4", "--steps", "120", "--batch-size", "256",
       *RELAXED_FLAGS, "--quiet")
    ok(warehouse, "feature-trajectory-sweep", "--basis", BASIS, "--quiet")
    ok(warehouse, "feature-birth-analyze", "--basis", BASIS, "--persistence", "2",
       "--permutations", "20")
    report_dir = tmp_path / "report"
    ok(warehouse, "report", "--basis", BASIS, "--out", str(report_dir), "--json")

    examples = query(warehouse, "SELECT context_token_ids, position, context_start, token_text, "
                                "context_text FROM feature_examples WHERE basis = ?", [BASIS])
    assert len(examples) > 100
    for ids, position, start, token_text, context_text in examples:
        at = position - start
        decode = lambda part: tokenizer.decode(part, clean_up_tokenization_spaces=False)  # noqa: E731
        assert token_text == decode([ids[at]])
        assert context_text == (decode(ids[:at]) + "⟦" + decode([ids[at]]) + "⟧"
                                + decode(ids[at + 1:]))

    # The report and the graph show the same decoded text.
    shown = {context_text for *_, context_text in examples}
    markdown = (report_dir / "report.md").read_text()
    assert sum(context in markdown for context in shown) >= 5
    from featurestore.queries.graphs import build_graph

    con = Warehouse(warehouse).connect()
    try:
        graph = build_graph(con, BASIS)
    finally:
        con.close()
    labelled = [node for _, node in graph.nodes(data=True) if node.get("top_context")]
    assert labelled and all(node["top_context"] in shown for node in labelled)
    assert all(f'"{node["top_token_texts"][0]}"' in node["label"] for node in labelled)


def test_a_buffer_run_too_short_to_train_is_refused_and_epochs_replay_it(models, tmp_path):
    warehouse = tmp_path / "wh"
    register(warehouse, models)
    train = ["train-crosscoder", "--name", "short", "--tokens-from", str(models.jsonl_file),
             "--seq-len", "16", "--tokens", "640", "--batch-size", "32", "--pool-batches", "4",
             "--source", f"a={RUN}@0:{STAGE}", "--source", f"b={RUN}@LAST:{STAGE}",
             "--dict-size", "64", "--k", "4", "--min-explained-variance", "-10",
             "--max-active-fraction", "1", "--max-dead-fraction", "1", "--json", "--quiet"]
    refused = invoke(warehouse, *train)
    assert refused.exit_code != 0
    # 640 tokens // 32 per batch = 20 steps; five passes give the 100 a run needs.
    assert "gives 20 steps, fewer than the 100" in refused.output
    assert "--epochs 5" in refused.output
    assert query(warehouse, "SELECT count(*) FROM bases") == [(0,)]

    replayed = ok(warehouse, *train, "--epochs", "5")
    assert json.loads(replayed.stdout)["steps"] == 100
    (config,) = query(warehouse, "SELECT trainer_config FROM bases WHERE name = 'short'")
    assert "epochs=5" in json.loads(config[0])["data"]["tokens"]


def test_splits_sampling_and_token_counts_through_the_cli(models, tmp_path):
    warehouse = tmp_path / "wh"
    register(warehouse, models)
    jsonl = str(models.jsonl_file)

    def collect(*args):
        return invoke(warehouse, "collect", "--run", RUN, "--stage", STAGE, "--checkpoints",
                      "0", "--tokens-from", jsonl, "--seq-len", "16", "--quiet", *args)

    assert collect("--tokens", "960", "--seed", "3").exit_code == 0
    first, splits = tokens_of(warehouse, f"{RUN}@0:{STAGE}")
    assert Counter(splits) == {split: 320 for split in models.splits}  # 20 sequences of each
    assert collect("--tokens", "960", "--seed", "3").exit_code == 0
    assert np.array_equal(tokens_of(warehouse, f"{RUN}@0:{STAGE}")[0], first)
    assert collect("--tokens", "960", "--seed", "4").exit_code == 0
    assert not np.array_equal(tokens_of(warehouse, f"{RUN}@0:{STAGE}")[0], first)

    assert collect("--tokens", "320", "--splits", "travel").exit_code == 0
    assert set(tokens_of(warehouse, f"{RUN}@0:{STAGE}")[1]) == {"travel"}
    unknown = collect("--splits", "travel,bigram")
    assert unknown.exit_code != 0
    assert "has no split 'bigram'; its splits: cooking, travel, weather" in unknown.output
    too_many = collect("--tokens", "1000000")
    assert too_many.exit_code != 0 and "lower --tokens to at most" in too_many.output
    demo_only = invoke(warehouse, "collect", "--run", RUN, "--stage", STAGE, "--seq-len", "8")
    assert demo_only.exit_code != 0 and "--seq-len applies to a token file" in demo_only.output


def test_training_from_models_on_text_writes_token_strings(models, tokenizer, tmp_path):
    warehouse = tmp_path / "wh"
    register(warehouse, models)
    result = ok(warehouse, "train-crosscoder", "--name", "text-diff", "--tokens-from",
                str(models.jsonl_file), "--splits", "cooking,travel", "--seq-len", "16",
                "--tokens", "3200", "--batch-size", "32", "--pool-batches", "4",
                "--source", f"a={RUN}@0:{STAGE}", "--source", f"b={RUN}@LAST:{STAGE}",
                "--dict-size", "64", "--k", "4", "--min-explained-variance", "-10",
                "--max-active-fraction", "1", "--max-dead-fraction", "1", "--json", "--quiet")
    assert json.loads(result.stdout)["steps"] == 100
    (config,) = query(warehouse, "SELECT trainer_config FROM bases WHERE name = 'text-diff'")
    data = json.loads(config[0])["data"]["tokens"]
    assert "seq_len=16 splits=cooking,travel seed=0" in data and "tokenizer=" in data
    # The run had no token strings (nothing was collected): training from it writes them.
    assert query(warehouse, "SELECT count(*) FROM token_strings WHERE run = ?", [RUN]) == [
        (len(tokenizer),)]
