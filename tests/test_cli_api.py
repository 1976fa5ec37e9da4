"""The command line is a thin layer over the Python API: each command calls one API function,
and every option named like one of that function's parameters has the function's default, so
a notebook call with no arguments does what the command with no flags does.

The function a command calls is read from the command's source: the first call of a name the
command imports from featurestore.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap

import click
import pytest

from featurestore.cli import cli

# Commands that call a method of the Warehouse or the catalog rather than a function.
METHOD_COMMANDS = {"snapshots", "catalog backup"}


def commands(group: click.Group = cli, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


def api_function(command: click.Command):
    """The first function the command's callback calls that it imports from featurestore."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(command.callback)))
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featurestore"):
            imported.update({alias.asname or alias.name: (node.module, alias.name)
                             for alias in node.names})
    calls = sorted((node for node in ast.walk(tree) if isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name) and node.func.id in imported),
                   key=lambda node: (node.lineno, node.col_offset))
    for call in calls:
        module, name = imported[call.func.id]
        found = getattr(importlib.import_module(module), name)
        if inspect.isfunction(found):
            return found
    return None


def cli_default(option: click.Option):
    """The option's default as the command passes it on: converted by its type, unset as None."""
    default = option.default
    if default is None or repr(default) == "Sentinel.UNSET":
        return () if option.multiple else (False if option.is_flag else None)
    if isinstance(default, str) and not isinstance(option.type, click.types.StringParamType):
        return option.type.convert(default, option, None)
    return tuple(default) if option.multiple else default


@pytest.mark.parametrize("name, command", list(commands()), ids=[n for n, _ in commands()])
def test_options_have_the_api_defaults(name, command):
    function = api_function(command)
    if function is None:
        assert name in METHOD_COMMANDS, f"{name}: calls no featurestore function"
        return
    parameters = inspect.signature(function).parameters
    for option in command.params:
        if not isinstance(option, click.Option) or option.name not in parameters:
            continue
        api = parameters[option.name].default
        if api is inspect.Parameter.empty:
            continue
        api = tuple(api) if isinstance(api, list | tuple) else api
        assert cli_default(option) == api, (
            f"{name} --{option.name.replace('_', '-')}: the command's default "
            f"{cli_default(option)!r} is not {function.__name__}'s {api!r}")


def test_the_check_sees_a_default_that_drifted():
    @click.command()
    @click.option("--top", type=int, default=10)
    def drifted(top):
        from featurestore.ingest.feature_compare import compare_features

        compare_features("basis", 0, 1, top=top)

    function = api_function(drifted)
    assert function.__name__ == "compare_features"
    (option,) = drifted.params
    assert cli_default(option) != inspect.signature(function).parameters["top"].default


def named_default(command: str, option: str) -> float:
    """The number a help text gives as an option's default ("... [default: 1e-3].")."""
    found = next(c for n, c in commands() if n == command)
    (param,) = [p for p in found.params if p.name == option]
    match = re.search(r"\[default: ([0-9][0-9.e+-]*)", param.help)
    assert match, f"{command} --{option}: its help names no numeric default"
    return float(match.group(1))


def test_defaults_named_in_help_are_the_configs():
    # Options whose API default is None (filled in from a config, or depending on other options)
    # name the config's value in their help: the help must follow the config.
    from featurestore.crosscoder import CrossCoderConfig
    from featurestore.crosscoder_training import TrainerConfig
    from featurestore.ingest.collect import DEFAULT_TOKENS
    from featurestore.model import ModelConfig
    from featurestore.training import TrainConfig

    trainer = TrainerConfig()
    expected = {
        ("train-model", "steps"): TrainConfig().steps,
        ("train-model", "d_model"): ModelConfig.d_model,
        ("collect", "tokens"): DEFAULT_TOKENS,
        ("train-crosscoder", "steps"): trainer.steps,
        ("train-crosscoder", "lr"): trainer.lr,
        ("shared-feature-fit", "lr"): trainer.lr,
    }
    for command in ("train-crosscoder", "shared-feature-fit"):
        expected |= {
            (command, "l1_coeff"): trainer.l1_coeff,
            (command, "l0_coeff"): trainer.l0_coeff,
            (command, "norm_loss_fraction"): trainer.norm_loss_fraction,
            (command, "jumprelu_bandwidth"): CrossCoderConfig.jumprelu_bandwidth,
        }
    for (command, option), value in expected.items():
        assert named_default(command, option) == pytest.approx(value), (command, option)
