"""The command line through click's CliRunner: help, formats, JSON, and clean errors."""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from featurestore.cli import cli

from .conftest import TINY_RUN, TINY_TOKENS


def run(args, warehouse=None, **kwargs):
    prefix = ["--warehouse", str(warehouse)] if warehouse else []
    return CliRunner().invoke(cli, [*prefix, *args], catch_exceptions=False, **kwargs)


def all_commands():
    names = []
    for name, command in cli.commands.items():
        subcommands = getattr(command, "commands", None)
        names += [[name, sub] for sub in subcommands] if subcommands else [[name]]
    return names


def examples(help_text: str) -> list[list[str]]:
    """The example command lines of a help text (the block after "Example(s):"), as argv lists
    without the leading `featurestore`: continued lines joined, and what the shell itself does
    (comments, redirections, pipes, $(...)) left out."""
    block = help_text.split("Example", 1)[1].split("\n\n", 1)[0]
    commands: list[str] = []
    for line in block.splitlines()[1:]:  # a line not starting a command continues the last
        line = line.strip().removesuffix("\\")
        if line.startswith("featurestore ") or not commands:
            commands.append(line)
        else:
            commands[-1] += " " + line
    return [shlex.split(re.split(r"\s(?:#|>|\|)\s|\$\(", c)[0])[1:] for c in commands
            if c.startswith("featurestore ")]


def parse_only(argv: list[str]) -> None:
    """Parse argv as the CLI would, option names and types included, without running it. A
    path the example names but this machine lacks is no parse error."""
    context = cli.make_context("featurestore", list(argv))
    command = cli
    try:
        with context:
            while isinstance(command, click.Group):
                rest = context.protected_args + context.args
                name, command, rest = command.resolve_command(context, rest)
                context = command.make_context(name, rest, parent=context)
    except click.BadParameter as error:
        if "does not exist" not in str(error):
            raise


@pytest.mark.parametrize("command", all_commands(), ids=" ".join)
def test_every_command_has_help_with_examples_that_parse(command):
    result = run([*command, "--help"])
    assert result.exit_code == 0
    found = examples(result.output)
    # At least one example runs this very command (after any global options); all parse.
    assert any(command[-1] in argv for argv in found), result.output
    for argv in found:
        parse_only(argv)


def test_the_readme_lists_every_command():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for cell in re.findall(r"^\| `featurestore ([^`]+)`(?: / `featurestore ([^`]+)`)?", table,
                           re.M):
        for text in filter(None, cell):
            words = [w for w in text.split() if re.fullmatch(r"[a-z][a-z-]*", w)]
            listed.add(" ".join(words[:2]) if words[0] in cli.commands and isinstance(
                cli.commands[words[0]], click.Group) else words[0])
    assert listed == {" ".join(c) for c in all_commands()}


def test_help_does_not_import_torch():
    code = "import sys; from featurestore.cli import cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tables_and_describe(trained_warehouse):
    result = run(["tables", "--json"], trained_warehouse)
    assert result.exit_code == 0
    tables = {t["name"]: t for t in json.loads(result.output)}
    assert tables["activation_sets"]["rows"] == 6 and tables["activation_sets"]["kind"] == "table"
    assert tables["run_summary"]["kind"] == "view" and tables["runs"]["description"]

    text = run(["describe", "activation_sets"], trained_warehouse)
    assert "norm_scale" in text.output and "sqrt(d_model)" in text.output
    columns = json.loads(run(["describe", "runs", "--json"], trained_warehouse).output)
    assert columns[0] == {"column": "run", "type": "VARCHAR",
                          "description": columns[0]["description"]}


def test_sql_formats_agree(trained_warehouse):
    query = "SELECT name, n_tokens, norm_scale FROM activation_sets ORDER BY name"
    as_json = json.loads(run(["sql", query, "--format", "json"], trained_warehouse).output)
    as_csv = list(csv.DictReader(io.StringIO(run(["sql", query, "--format", "csv"],
                                                 trained_warehouse).output)))
    parquet = run(["sql", query, "--format", "parquet"], trained_warehouse)
    as_parquet = pq.read_table(io.BytesIO(parquet.stdout_bytes)).to_pylist()
    table = run(["sql", query], trained_warehouse).output

    assert len(as_json) == len(as_csv) == len(as_parquet) == 6
    assert [r["name"] for r in as_json] == [r["name"] for r in as_csv] == [
        r["name"] for r in as_parquet]
    assert all(r["n_tokens"] == TINY_TOKENS for r in as_json)
    assert as_parquet[0]["norm_scale"] == pytest.approx(as_json[0]["norm_scale"])
    assert "(6 rows)" in table and as_json[0]["name"] in table


def test_sql_sees_views_macros_and_udfs(trained_warehouse):
    query = ("SELECT DISTINCT stage_layer(stage) AS layer FROM activation_sets "
             "ORDER BY layer NULLS LAST")
    assert json.loads(run(["sql", query, "--format", "json"], trained_warehouse).output) == [
        {"layer": 2}, {"layer": None}]
    rows = json.loads(run(["sql", "SELECT run, n_checkpoints FROM run_summary", "--format",
                           "json"], trained_warehouse).output)
    assert rows[0]["run"] == TINY_RUN and rows[0]["n_checkpoints"] >= 12


def test_sql_errors_are_one_line_not_a_traceback(trained_warehouse):
    result = run(["sql", "SELECT nope FROM runs"], trained_warehouse)
    assert result.exit_code == 1
    assert "SQL error" in result.output and "Traceback" not in result.output


def test_bad_input_exits_non_zero_with_the_fix(trained_warehouse, tmp_path):
    unknown_stage = run(["collect", "--run", TINY_RUN, "--stage", "layer_2_postmlp", "--quiet"],
                        trained_warehouse)
    assert unknown_stage.exit_code == 1
    assert "unknown stage 'layer_2_postmlp'" in unknown_stage.output
    assert "layer_2_post_mlp" in unknown_stage.output

    bad_name = run(["train-model", "--run", "../up", "--steps", "1"], tmp_path / "wh")
    assert bad_name.exit_code == 1 and "invalid run name '../up'" in bad_name.output

    missing = run(["tables"], tmp_path / "empty")
    assert missing.exit_code == 1 and "no warehouse at" in missing.output


def test_stages_lists_the_runs_stage_names(trained_warehouse):
    names = json.loads(run(["stages", "--run", TINY_RUN, "--json"], trained_warehouse).output)
    assert names[0] == "embed" and names[-1] == "final_norm" and "layer_2_post_mlp" in names


def test_train_collect_and_list_the_snapshots_from_the_command_line(tmp_path):
    wh = tmp_path / "wh"
    trained = run(["--threads", "1", "train-model", "--run", "cli", "--steps", "3", "--json",
                   "--quiet"], wh)
    assert trained.exit_code == 0
    assert json.loads(trained.output)["checkpoint_steps"] == [0, 1, 2, 3]
    collected = run(["collect", "--run", "cli", "--stage", "embed", "--checkpoints", "LAST",
                     "--tokens", "64", "--json", "--quiet"], wh)
    assert json.loads(collected.output)["sets"][0]["name"] == "cli@3:embed"
    snapshots = json.loads(run(["snapshots", "--json"], wh).output)
    assert [s["job"] for s in snapshots] == ["collect cli", "train-model cli", None]
    # token_strings: collect decoded the demo run's vocabulary once, for its examples.
    assert sorted(snapshots[0]["changes"]["tables_inserted_into"]) == [
        "activation_sets", "token_strings"]
    listed = run(["snapshots"], wh).output
    assert "collect cli" in listed and "activation_sets, token_strings" in listed
    dry = json.loads(run(["compact", "--older-than", "0", "--dry-run", "--json"], wh).output)
    assert dry["dry_run"] and dry["snapshots_kept"] == 1  # nothing deleted by a dry run
    assert "cli@3:embed" in run(["sql", "SELECT name FROM activation_sets"], wh).output
    bad = run(["compact", "--older-than", "soon"], wh)
    assert bad.exit_code != 0 and "--older-than 'soon'" in bad.output
