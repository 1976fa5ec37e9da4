"""`featurestore register-model`: a model's saved checkpoints as a run.

Two kinds of model:

- hf: local Hugging Face folders (save_pretrained layout) of a supported model_type;
- custom: any nn.Module, rebuilt by a factory function from a JSON config, with safetensors
  state dicts and an adapter file saying where the stages are (featurestore.custom_model).

One call registers one checkpoint or a whole series: --path and --weights take a glob
('ckpts/step_*'), and each match's step is the trailing number of its name (or --steps, in the
matches' name order). Everything is checked before anything is written, and the series is
written in one transaction; registering the same checkpoints again changes nothing, unless a
file changed since it was registered: that checkpoint is then registered anew, and its activation
sets and the bases fitted on them (with every row computed from those) are dropped in the same
commit. Files are used in place (their absolute paths are recorded), never fetched from a hub,
and only safetensors weights are read: nothing is unpickled.

With --eval-tokens-from each checkpoint's next-token loss and accuracy on a token file fill
checkpoints.heldout_loss / heldout_accuracy / split_metrics (ingest.evaluate_checkpoints).
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from featurestore import ranges
from featurestore.corpus import model_context
from featurestore.errors import CorruptCheckpointError, FeaturestoreError
from featurestore.file_formats import require_safetensors
from featurestore.ingest.evaluate_checkpoints import EvalTokens, metric_columns, next_token_metrics
from featurestore.results import Result
from featurestore.schema import package_version
from featurestore.scratch import newest_mtime
from featurestore.settings import check_name
from featurestore.token_text import TokenizerSearch
from featurestore.warehouse import Warehouse, bases_computed_from, drop_basis, records
from featurestore.writer import utc_now

if TYPE_CHECKING:
    import torch

_GLOB_CHARACTERS = re.compile(r"[*?[]")
_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")
_METRICS = ("heldout_loss", "heldout_accuracy", "split_metrics", "eval_tokens")


@dataclass
class RegisterModelResult(Result):
    run: str
    kind: str  # hf or custom
    model_family: str
    d_model: int
    n_layers: int
    created_run: bool
    tokenizer: str | None
    checkpoints: list[dict] = field(default_factory=list)  # step, path, heldout_loss/_accuracy

    def summary(self) -> str:
        lines = [f"registered {len(self.checkpoints)} checkpoint(s) of a {self.model_family} "
                 f"model as run {self.run} (d_model {self.d_model}, {self.n_layers} blocks)"]
        for checkpoint in self.checkpoints:
            loss = ("" if checkpoint["heldout_loss"] is None
                    else f"  loss {checkpoint['heldout_loss']:.4f}  "
                         f"accuracy {checkpoint['heldout_accuracy']:.4f}")
            lines.append(f"  step {checkpoint['step']:>8}  {checkpoint['path']}{loss}")
        return "\n".join(lines)


@dataclass
class _Model:
    """What the run row records, and how to open each checkpoint of the series as a module."""

    kind: str
    family: str
    d_model: int
    n_layers: int
    vocab_size: int
    model_config: dict
    open: Callable[[Path], torch.nn.Module]


def register_model(run: str, path: str | None = None, step: int | None = None, *,
                   steps: list[int] | None = None, factory: str | None = None,
                   config: str | None = None, weights: str | None = None,
                   adapter: str | None = None, stage_overrides: tuple[str, ...] = (),
                   tokenizer: str | None = None, eval_tokens_from: str | None = None,
                   eval_tokens: int | None = None,
                   warehouse: str | None = None) -> RegisterModelResult:
    """Register Hugging Face folders (`path`) or a custom model's weights files (`factory`,
    `config`, `weights`, `adapter`) as checkpoints of `run`; see the module doc."""
    check_name(run, "run name")
    _check_options(path, step, steps, factory, config, weights, adapter, stage_overrides,
                   eval_tokens_from, eval_tokens)
    if path is not None:
        series = checkpoint_series(path, "--path", step, steps, folders=True)
        model = _hf_model(series)
    else:
        series = checkpoint_series(weights, "--weights", step, steps, folders=False)
        model = _custom_model(factory, config, adapter, stage_overrides, series)
    tokenizer_dir = _check_tokenizer(tokenizer, model.vocab_size)
    tokens = None
    if eval_tokens_from is not None:
        first = series[0][1]
        search = TokenizerSearch(explicit=tokenizer_dir,
                                 model_folder=first if first.is_dir() else None)
        tokens = EvalTokens.read(eval_tokens_from, eval_tokens, "--eval-tokens-from", search,
                                 model_context(model.open(first)))
        tokens.check_vocabulary(model.vocab_size, "the model")

    wh = Warehouse(warehouse)
    with wh.writer(f"register-model {run}") as writer:
        run_row, known = _existing(wh, run)
        _check_same_model(run, run_row, model)
        for number, file in series:
            if number in known and known[number]["path"] != str(file):
                raise FeaturestoreError(
                    f"run {run!r} already has step {number} at {known[number]['path']}, not "
                    f"{file}; register the other files under a run name of their own")
        _forget_replaced(wh, writer, run, series, known)
        result = RegisterModelResult(run, model.kind, model.family, model.d_model,
                                     model.n_layers, created_run=run_row is None,
                                     tokenizer=tokenizer_dir)
        if run_row is None or (tokenizer_dir and tokenizer_dir != run_row["tokenizer"]):
            writer.put("runs", [_run_row(run, model, tokenizer_dir, run_row)])
        for number, file in series:
            row = known.get(number) or _checkpoint_row(run, number, file)
            if tokens is not None:
                row = row | metric_columns(next_token_metrics(model.open(file), tokens), tokens)
            if number not in known or tokens is not None:  # a checkpoint seen before stays as is
                writer.put("checkpoints", [row])
            result.checkpoints.append({"step": number, "path": str(file),
                                       "heldout_loss": row["heldout_loss"],
                                       "heldout_accuracy": row["heldout_accuracy"]})
    return result


def checkpoint_series(pattern: str, flag: str, step: int | None, steps: list[int] | None,
                      folders: bool) -> list[tuple[int, Path]]:
    """(step, absolute path) of every folder (or file) `pattern` names, in step order.

    A plain path is one checkpoint, at `step` (default 0). A glob is a series: each match's step
    is the trailing number of its name ('step_1000', 'ckpt-1000.safetensors'), or `steps` paired
    with the matches in name order (numbers in names compared as numbers).
    """
    what = "folder" if folders else "file"
    expanded = str(Path(pattern).expanduser())
    is_glob = bool(_GLOB_CHARACTERS.search(expanded))
    matches = [Path(p) for p in glob.glob(expanded)] if is_glob else [Path(expanded)]
    matches = sorted((p.resolve() for p in matches
                      if (p.is_dir() if folders else p.is_file())), key=_natural_key)
    if not matches:
        raise FeaturestoreError(f"{flag} {pattern}: no such {what}" + (
            f" matches the glob (quote it, so the shell passes it on: {flag} 'ckpts/step_*')"
            if is_glob else ""))
    names = ", ".join(p.name for p in matches[:6]) + (", ..." if len(matches) > 6 else "")
    if step is not None:
        if len(matches) > 1:
            raise FeaturestoreError(f"{flag} {pattern} matches {len(matches)} {what}s ({names}); "
                                    "--step is for one. Use --steps, or steps from the names")
        return [(step, matches[0])]
    if steps is not None:
        if len(steps) != len(matches):
            raise FeaturestoreError(
                f"--steps gives {len(steps)} steps but {flag} {pattern} matches {len(matches)} "
                f"{what}s ({names}); give one step per {what}, in name order")
        if len(set(steps)) != len(steps):
            raise FeaturestoreError(f"--steps: steps repeat in {steps}")
        return sorted(zip(steps, matches))
    if not is_glob:
        return [(0, matches[0])]
    parsed = {}
    for match in matches:
        name = match.name.removesuffix(".safetensors")
        found = _TRAILING_NUMBER.match(name)
        if found is None:
            raise FeaturestoreError(
                f"{flag} {pattern}: {match.name} has no trailing number to take its step from; "
                "name the checkpoints like step_1000, or give --steps")
        parsed[match] = (found.group(1), int(found.group(2)))
    prefixes = sorted({prefix for prefix, _ in parsed.values()})
    if len(prefixes) > 1:
        raise FeaturestoreError(
            f"{flag} {pattern} matches names that differ beyond their trailing number "
            f"({', '.join(repr(p) for p in prefixes[:4])}), so their numbers may not be steps "
            "of one series; narrow the glob or give --steps")
    by_step: dict[int, list[Path]] = {}
    for match, (_, number) in parsed.items():
        by_step.setdefault(number, []).append(match)
    repeated = {s: ps for s, ps in by_step.items() if len(ps) > 1}
    if repeated:
        s, ps = next(iter(sorted(repeated.items())))
        raise FeaturestoreError(f"{flag} {pattern}: step {s} appears more than once "
                                f"({', '.join(map(str, ps))}); narrow the glob or give --steps")
    return sorted((number, match) for match, (_, number) in parsed.items())


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def parse_step_list(text: str | None) -> list[int] | None:
    """'0,100,1000' -> [0, 100, 1000] (--steps)."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise FeaturestoreError(f"--steps {text!r}: give comma-separated step numbers, e.g. "
                                "0,100,1000")
    return [int(part) for part in parts]


def _check_options(path, step, steps, factory, config, weights, adapter, stage_overrides,
                   eval_tokens_from, eval_tokens) -> None:
    custom = {"--factory": factory, "--config": config, "--weights": weights,
              "--adapter": adapter, "--stage": stage_overrides or None}
    given = [flag for flag, value in custom.items() if value is not None]
    if path is not None and given:
        raise FeaturestoreError(f"--path is a Hugging Face folder; {', '.join(given)} are for "
                                "custom models (--factory, --weights, --adapter). Give one kind")
    if path is None:
        missing = [flag for flag in ("--factory", "--weights", "--adapter")
                   if custom[flag] is None]
        if len(missing) == 3:
            raise FeaturestoreError("give --path (Hugging Face folders) or --factory, --weights "
                                    "and --adapter (any nn.Module)")
        if missing:
            raise FeaturestoreError(f"a custom model also needs {', '.join(missing)}")
    if step is not None and steps is not None:
        raise FeaturestoreError("give --step (one checkpoint) or --steps (a series), not both")
    if step is not None:
        ranges.STEP.check(step, "--step")
    for number in steps or ():
        ranges.STEP.check(number, "--steps")
    if eval_tokens is not None and eval_tokens_from is None:
        raise FeaturestoreError("--eval-tokens needs --eval-tokens-from PATH")
    if eval_tokens is not None and eval_tokens < 1:
        raise FeaturestoreError(f"--eval-tokens must be positive, got {eval_tokens}")


def _hf_model(series: list[tuple[int, Path]]) -> _Model:
    """The series' shared config; every folder must be the same kind of model."""
    from featurestore.stages import HF_MODEL_TYPES, hf_config, hf_reader

    configs = {}
    for _, directory in series:
        configs[directory] = hf_config(directory)
        weights = sorted(directory.glob("*.safetensors"))
        if not weights:
            raise FeaturestoreError(
                f"{directory} has no .safetensors weights; featurestore never unpickles "
                "weights. Re-save the model with save_pretrained(path, safe_serialization=True).")
        for file in weights:  # refused now, not when a later job loads it
            require_safetensors(file, str(file), CorruptCheckpointError)
    first_dir, first = series[0][1], configs[series[0][1]]

    def shape(config) -> tuple:
        return (config.model_type, config.hidden_size, config.num_hidden_layers,
                config.vocab_size)

    for directory, config in configs.items():
        if shape(config) != shape(first):
            raise FeaturestoreError(
                f"{directory} is a {config.model_type} model of d_model {config.hidden_size}, "
                f"{config.num_hidden_layers} blocks, vocabulary {config.vocab_size}, unlike "
                f"{first_dir} ({first.model_type}, {first.hidden_size}, "
                f"{first.num_hidden_layers}, {first.vocab_size}): the checkpoints of one run "
                "must share an architecture")
    return _Model("hf", HF_MODEL_TYPES[first.model_type], first.hidden_size,
                  first.num_hidden_layers, first.vocab_size, first.to_dict(),
                  open=lambda directory: hf_reader(directory).module)


def _custom_model(factory: str, config: str | None, adapter: str, stage_overrides,
                  series: list[tuple[int, Path]]) -> _Model:
    """Build the module, check the adapter and a forward pass on the first weights file, and
    check that every other weights file loads."""
    from featurestore.custom_model import (
        Adapter,
        CustomModel,
        apply_stage_overrides,
        check_model,
        load_weights,
        normalise_factory,
        read_json_file,
    )

    config_dict = {} if config is None else read_json_file(config, "--config")
    if not isinstance(config_dict, dict):
        raise FeaturestoreError(f"--config {config}: must be a JSON object (the factory's "
                                "keyword settings)")
    adapter_dict = apply_stage_overrides(read_json_file(adapter, "--adapter"), stage_overrides)
    custom = CustomModel(normalise_factory(factory), config_dict,
                         Adapter.from_dict(adapter_dict, f"--adapter {adapter}"))
    module = custom.build()
    for n, (_, file) in enumerate(series):
        require_safetensors(file, f"--weights {file}", CorruptCheckpointError)
        load_weights(module, file)
        if n == 0:
            checked = check_model(custom, module)
    return _Model("custom", "custom", checked.d_model, custom.adapter.n_layers,
                  checked.vocab_size, custom.to_json(),
                  open=lambda file: custom.load(file, module))


def _check_tokenizer(tokenizer: str | None, vocab_size: int) -> str | None:
    """The tokenizer folder's absolute path, once transformers loads it from local files."""
    if tokenizer is None:
        return None
    from featurestore.token_text import load_tokenizer

    found = load_tokenizer(tokenizer, "--tokenizer")
    if len(found.tokenizer) > vocab_size:
        raise FeaturestoreError(f"--tokenizer {found.folder} has {len(found.tokenizer)} tokens, "
                                f"more than the model's vocabulary of {vocab_size}")
    return found.folder


def _existing(wh: Warehouse, run: str) -> tuple[dict | None, dict[int, dict]]:
    """The run's row (None if new) and its checkpoint rows by step."""
    if not wh.exists():
        return None, {}
    with wh.connect() as con:
        runs = records(con, "SELECT * FROM runs WHERE run = ?", [run])
        checkpoints = records(con, "SELECT * FROM checkpoints WHERE run = ?", [run])
    return (runs[0] if runs else None), {row["step"]: row for row in checkpoints}


def _forget_replaced(wh: Warehouse, writer, run: str, series: list[tuple[int, Path]],
                     known: dict[int, dict]) -> None:
    """Checkpoints whose files changed since they were registered hold other weights now: they
    are registered again (removed from `known`), and their activation sets, the bases fitted on
    them and every row computed from those go in the same commit, so nothing of the old weights
    is read as the new ones'."""
    replaced = [number for number, file in series if number in known
                and newest_mtime(file) > known[number]["created_at"].timestamp()]
    if not replaced:
        return
    for number in replaced:
        del known[number]
        writer.put("activation_sets", [], replace_where={"run": run, "step": number})
    with wh.connect() as con:
        stale = bases_computed_from(con, run, replaced)
    for basis in stale:
        drop_basis(writer, basis)


def _check_same_model(run: str, row: dict | None, model: _Model) -> None:
    if row is None:
        return
    if (row["kind"], row["model_family"], row["d_model"]) != (model.kind, model.family,
                                                               model.d_model):
        raise FeaturestoreError(
            f"run {run!r} already exists as a {row['kind']} run ({row['model_family']}, "
            f"d_model {row['d_model']}); these checkpoints are {model.kind} ({model.family}, "
            f"d_model {model.d_model}). Register them under another run name.")
    if model.kind == "custom" and json.loads(row["model_config"]) != model.model_config:
        raise FeaturestoreError(
            f"run {run!r} is already registered with another factory, config or adapter "
            f"({row['model_config']}); its activation sets were read through that one. "
            "Register these checkpoints under another run name.")


def _run_row(run: str, model: _Model, tokenizer: str | None, existing: dict | None) -> dict:
    if existing is not None:  # only the tokenizer changes
        return existing | {"tokenizer": tokenizer}
    return {
        "run": run, "kind": model.kind, "model_family": model.family, "parent_run": None,
        "parent_step": None, "seed": None, "steps": None, "d_model": model.d_model,
        "n_layers": model.n_layers, "model_config": json.dumps(model.model_config),
        "task_config": None, "train_config": None, "tokenizer": tokenizer,
        "featurestore_version": package_version(), "created_at": utc_now(),
    }


def _checkpoint_row(run: str, step: int, path: Path) -> dict:
    return {"run": run, "step": step, "tokens_seen": None, "path": str(path),
            "train_loss": None, "train_accuracy": None, **dict.fromkeys(_METRICS),
            "created_at": utc_now()}
