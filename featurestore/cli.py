"""The `featurestore` command line: a thin layer over the Python API.

Each command calls one function a notebook can call with the same arguments. Data goes to stdout,
logs and progress bars to stderr; `--json` prints a machine-readable result. Heavy libraries
(torch, nnsight, datasets) are imported inside the commands that need them, so `--help` is quick.
"""

from __future__ import annotations

import csv
import json
import shlex
import sys

import click

from featurestore import cli_types
from featurestore.birth_rules import DEFAULT_METRIC, DEFAULT_PRESENCE, METRICS, PRESENCE
from featurestore.dictionary_kinds import (
    ARCHS,
    BASIS_KINDS,
    DEFAULT_ARCH,
    EXPORT_FORMATS,
    IMPORT_FORMATS,
)
from featurestore.errors import FeaturestoreError
from featurestore.grokking import BASIS_FIT_STEPS, DENSE_EVERY, GrokkingConfig
from featurestore.ingest.collect import DEFAULT_TOKENS
from featurestore.ingest.feature_compare import DEFAULT_RANK_BY, RANK_BY
from featurestore.ingest.feature_patch import DEFAULT_FEATURES, MODES
from featurestore.ingest.shared_feature_fit import DEFAULT_WEIGHTING, WEIGHTINGS
from featurestore.ingest.train_model import DEFAULT_FINETUNE_STEPS
from featurestore.lake import CATALOG_ENV
from featurestore.queries.artifacts import DEFAULT_OUT
from featurestore.ranges import MAX_INT64
from featurestore.settings import THREADS_ENV, WAREHOUSE_ENV
from featurestore.text_table import format_cell, format_table, json_default


class _Group(click.Group):
    """Turns FeaturestoreError, and errors of the machine (a full disk, no memory, no
    permission: featurestore.resource_errors), into one line and exit status 1, without a
    traceback. Any other error is a bug and keeps its traceback.

    The line and the status say what was committed. A failure before any commit leaves the
    warehouse unchanged. A failure after this command's job committed, while printing its
    result, is not the job's: the command succeeds, with a warning."""

    def invoke(self, ctx):
        from featurestore.resource_errors import resource_problem

        commits = len(_committed_jobs())
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:
            problem = resource_problem(error)
            if problem is None:
                if isinstance(error, FeaturestoreError):
                    raise click.ClickException(str(error)) from None
                if damaged := _damaged_table_file(error):
                    raise click.ClickException(damaged) from None
                raise
            committed = _committed_jobs()[commits:]
            printing = _raised_by_the_cli(error)
            if printing:
                _discard_output()
            if committed and printing:
                click.echo(f"featurestore: warning: {'; '.join(committed)} committed, but its "
                           f"result could not be shown: {problem.describe()}", err=True)
                return None
            kept = ("the warehouse is unchanged: nothing was committed" if not committed else
                    f"the warehouse keeps what {'; '.join(committed)} committed, and nothing "
                    "after it")
            raise click.ClickException(f"{problem.describe()}; {kept}. {problem.fix}.") from None


def _discard_output() -> None:
    """Send what is left of the result to /dev/null: stdout's buffer still holds what could not
    be written, and flushing it again at exit would fail the command after all."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (a test runner's capture)
        pass


def _committed_jobs() -> list[str]:
    """The jobs this process committed (none if it never imported the warehouse module)."""
    warehouse = sys.modules.get("featurestore.warehouse")
    return warehouse.committed_jobs() if warehouse is not None else []


def _raised_by_the_cli(error: BaseException) -> bool:
    """Whether `error` came from this module's own code (printing a result), not from a job:
    the innermost featurestore frame of its traceback is in featurestore.cli."""
    innermost = None
    traceback = error.__traceback__
    while traceback is not None:
        module = traceback.tb_frame.f_globals.get("__name__", "")
        if module in ("featurestore", __name__) or module.startswith("featurestore."):
            innermost = module
        traceback = traceback.tb_next
    return innermost == __name__


def _damaged_table_file(error: Exception) -> str | None:
    """A DuckDB error on reading a damaged table file, as one line saying what to do."""
    from featurestore.writer import damage_hint

    if type(error).__module__.split(".")[0] not in ("duckdb", "_duckdb"):
        return None
    hint = damage_hint(str(error))
    return f"{str(error).strip().splitlines()[0]}.{hint}" if hint else None


def _emit(result, as_json: bool) -> None:
    """Print a command's result: its JSON with --json, else the text it renders itself (the
    same as `print(result.summary())` in a notebook)."""
    if as_json:
        _emit_json(result.to_dict())
    else:
        click.echo(result.summary())


def _emit_json(value) -> None:
    click.echo(json.dumps(value, indent=2, default=json_default))


def _threads(ctx: click.Context) -> None:
    from featurestore.settings import set_torch_threads

    set_torch_threads(ctx.obj["threads"])


def _warehouse(ctx: click.Context) -> str | None:
    return ctx.obj["warehouse"]


# The two flags most commands share: machine-readable output, and silence on stderr.
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON (for scripts).")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


def _arch_options(command):
    """The settings that belong to some architectures, the same in every command that trains a
    dictionary (each is ignored by the architectures it does not name)."""
    options = [
        click.option("--arch", type=click.Choice(ARCHS), default=DEFAULT_ARCH,
                     show_default=True,
                     help="batchtopk: the k x batch-size largest activations of each batch, a "
                          "learned threshold after training; topk: each token's k largest; "
                          "jumprelu: a learned threshold per latent and an L0 penalty "
                          "(--l0-coeff); matryoshka: batchtopk over nested groups of latents "
                          "(--group-sizes); vanilla: ReLU and an L1 penalty (--l1-coeff)."),
        click.option("--l1-coeff", type=cli_types.NON_NEGATIVE,
                     help="Vanilla: final sparsity coefficient [default: 1]."),
        click.option("--l0-coeff", type=cli_types.NON_NEGATIVE,
                     help="jumprelu: final coefficient of the L0 penalty, the squared error (in "
                          "normalised units, a token's squared norm about d_model) an active "
                          "latent must remove [default: 1]."),
        click.option("--jumprelu-bandwidth", type=cli_types.POSITIVE,
                     help="jumprelu: width of the window of pre-activations around a threshold "
                          "whose tokens move it (normalised units) [default: 0.1]."),
        click.option("--group-sizes", metavar="N,N,...",
                     help="matryoshka: sizes of the nested groups of latents, in order, summing "
                          "to --dict-size, e.g. 64,128,256,576 [default: five groups doubling "
                          "in size]."),
        click.option("--norm-loss-fraction", type=cli_types.FRACTION,
                     help="batchtopk, topk: the last share of the steps trained on each "
                          "source's error norm instead of its square, which sharpens the "
                          "learned directions; 0 keeps the squared error [default: 0.2]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _fit_bound_options(command):
    """The quality bounds of featurestore.fit_quality: the same flags and defaults in every
    command that fits a dictionary."""
    from featurestore.fit_quality import FitBounds

    defaults = FitBounds()
    options = [
        click.option("--min-explained-variance", type=cli_types.ANY,
                     default=defaults.min_explained_variance, show_default=True,
                     help="Register nothing unless every fitted source reaches this."),
        click.option("--max-active-fraction", type=cli_types.ANY,
                     default=defaults.max_active_fraction, show_default=True,
                     help="Register nothing if the mean share of active features per token "
                          "is above this."),
        click.option("--max-dead-fraction", type=cli_types.ANY,
                     default=defaults.max_dead_fraction, show_default=True,
                     help="Register nothing if more features than this never fire."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.option("--warehouse", type=click.Path(file_okay=False), envvar=WAREHOUSE_ENV,
              help=f"Warehouse directory [env {WAREHOUSE_ENV}; default ./warehouse].")
@click.option("--catalog", envvar=CATALOG_ENV, metavar="CATALOG",
              help=f"Where the warehouse's DuckLake catalog lives: 'postgres:dbname=NAME "
                   f"host=HOST' or 'postgresql://USER@HOST/NAME' for many machines [env "
                   f"{CATALOG_ENV}; default catalog.sqlite in the warehouse].")
@click.option("--threads", type=cli_types.PARALLEL, envvar=THREADS_ENV,
              help=f"Torch CPU threads [env {THREADS_ENV}; default min(cores, 4)].")
@click.version_option(package_name="featurestore")
@click.pass_context
def cli(ctx: click.Context, warehouse: str | None, catalog: str | None,
        threads: int | None) -> None:
    """featurestore: how learned features form during training, queryable with SQL.

    \b
    Quick start:
      featurestore demo                        # the whole pipeline on a model it trains
      featurestore tables                      # what the warehouse holds
      featurestore sql "SELECT * FROM run_summary"
    """
    import os

    if catalog:  # every Warehouse of this process, and the workers it spawns, use it
        from featurestore.lake import catalog_location
        from featurestore.settings import resolve_warehouse

        catalog_location(resolve_warehouse(warehouse), catalog)  # a bad value fails here
        os.environ[CATALOG_ENV] = catalog
    ctx.obj = {"warehouse": warehouse, "threads": threads}


# --- jobs that write ----------------------------------------------------------------------------


@cli.command("train-model")
@click.option("--run", required=True, help="Name of the new run (letters, digits, . _ -).")
@click.option("--steps", type=cli_types.COUNT, help="Optimiser steps [default: 1800].")
@click.option("--seed", type=cli_types.SEED, default=0, show_default=True,
              help="Seed for weights and data.")
@click.option("--d-model", type=click.IntRange(8, MAX_INT64), help="Residual width [default: 64].")
@json_option
@quiet_option
@click.pass_context
def train_model_command(ctx, run, steps, seed, d_model, as_json, quiet):
    """Train the built-in demo transformer and register its checkpoints.

    The model (4 pre-LayerNorm blocks) learns a synthetic task whose parts (bigram statistics,
    modular addition, induction) are learned at different times. Checkpoints are saved at
    log-spaced steps under warehouse/runs/RUN/checkpoints/ with per-split loss and accuracy in
    the `checkpoints` table. Re-running replaces the run.

    \b
    Examples:
      featurestore train-model --run demo
      featurestore train-model --run small --steps 300 --seed 1 --json
    """
    from featurestore.ingest.train_model import train_model

    _threads(ctx)
    result = train_model(run, steps=steps, seed=seed, d_model=d_model,
                         warehouse=_warehouse(ctx), progress=not quiet)
    _emit(result, as_json)


@cli.command("finetune")
@click.option("--run", required=True, help="Name of the fine-tuned run.")
@click.option("--from", "from_checkpoint", required=True, metavar="RUN[@STEP]",
              help="Checkpoint to start from; STEP defaults to the run's last (LAST).")
@click.option("--steps", type=cli_types.COUNT, default=DEFAULT_FINETUNE_STEPS, show_default=True)
@click.option("--seed", type=cli_types.SEED, default=0, show_default=True)
@json_option
@quiet_option
@click.pass_context
def finetune_command(ctx, run, from_checkpoint, steps, seed, as_json, quiet):
    """Continue a checkpoint on a shifted task mix: the base / fine-tuned pair to compare.

    The fine-tune mix puts most weight on the `reverse` sub-task, which the base mix lacks.

    \b
    Examples:
      featurestore finetune --run demo-ft --from demo
      featurestore finetune --run demo-ft2 --from demo@1000 --steps 200
    """
    from featurestore.ingest.train_model import finetune

    _threads(ctx)
    result = finetune(run, from_checkpoint, steps=steps, seed=seed, warehouse=_warehouse(ctx),
                      progress=not quiet)
    _emit(result, as_json)


def _token_file_options(command):
    """--text-column, --tokenizer and --seq-len: how a --tokens-from file of text is read."""
    for option in reversed([
        click.option("--text-column", default="text", show_default=True,
                     help="The text column of a .jsonl, .parquet or datasets file (a file with "
                          "an input_ids column is pre-tokenized and used as it is)."),
        click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
                     help="Tokenizer folder (save_pretrained) for text [default: the run's "
                          "registered tokenizer, else the one in the checkpoint folder]."),
        click.option("--seq-len", type=cli_types.COUNT,
                     help="Tokens per packed text sequence, at most the model's context "
                          "[default: the model's context, at most 128]."),
    ]):
        command = option(command)
    return command


def _split_list(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


def _echo_notes(notes: list[str]) -> None:
    for note in notes:
        click.echo(f"note: {note}", err=True)


@cli.command("collect")
@click.option("--run", required=True, help="Run whose checkpoints to read.")
@click.option("--stage", "stages", multiple=True, required=True,
              help="Stage to read, e.g. layer_2_post_mlp or final_norm; repeat for several.")
@click.option("--checkpoints", default="all", show_default=True,
              help="'all' or comma-separated steps (LAST = the last checkpoint).")
@click.option("--tokens", type=cli_types.COUNT,
              help="Tokens per checkpoint, rounded up to whole sequences in equal shares of the "
                   "splits [default: 32768, or all of a --tokens-from file that holds fewer].")
@click.option("--splits",
              help="Comma-separated splits to draw the sequences from, in equal shares "
                   "[default: the demo task's bigram,modular,induction,reverse; with "
                   "--tokens-from, every split of the file].")
@click.option("--seed", type=cli_types.SEED, default=0, show_default=True,
              help="Seed of the token set (which sequences are drawn).")
@click.option("--tokens-from", type=click.Path(exists=True),
              help="A file to draw the tokens from instead of the demo task (required for runs "
                   "with no task): text (.txt with blank lines between documents, or a .jsonl, "
                   ".parquet or datasets folder with a --text-column), tokenized with the run's "
                   "tokenizer and packed into --seq-len sequences; or token ids (an input_ids "
                   "column of equal-length lists). A split column names each row's split.")
@_token_file_options
@click.option("--include-first-position", is_flag=True,
              help="Use position 0 when estimating the norm scale (left out by default).")
@json_option
@quiet_option
@click.pass_context
def collect_command(ctx, run, stages, checkpoints, tokens, splits, seed, tokens_from,
                    text_column, tokenizer, seq_len, include_first_position, as_json, quiet):
    """Read checkpoints at named stages through nnsight and store activation sets.

    Every checkpoint sees the same tokens, so the sets are aligned row for row. Each set is a
    Hugging Face datasets folder under warehouse/activations/RUN/STAGE/, registered in
    `activation_sets` with its norm scale and token source. List a run's stages with
    `featurestore stages`. The run's first collection also writes its token_strings (every
    token id as text), from its tokenizer or the demo vocabulary.

    With --tokens-from, sequences are drawn at random (seeded by --seed) in equal shares of
    --splits; documents of a text file are joined with the tokenizer's EOS token and packed.

    \b
    Examples:
      featurestore collect --run demo --stage layer_2_post_mlp --stage final_norm
      featurestore collect --run demo --stage final_norm --checkpoints 0,100,LAST --tokens 8192
      featurestore collect --run pythia --stage layer_3_post_mlp --tokens-from corpus.txt
      featurestore collect --run pythia --stage layer_3_post_mlp --tokens-from web.jsonl \\
          --text-column body --splits news,forum --seq-len 256 --tokens 65536 --seed 1
      featurestore collect --run mymodel --stage layer_1_post_mlp --tokens-from docs.parquet \\
          --tokenizer ~/tokenizers/mine
      featurestore collect --run pythia --stage layer_3_post_mlp --tokens-from tokens.parquet
    """
    from featurestore.ingest.collect import collect

    _threads(ctx)
    result = collect(run, list(stages), checkpoints=checkpoints, tokens=tokens,
                     splits=_split_list(splits), seed=seed, tokens_from=tokens_from,
                     text_column=text_column, tokenizer=tokenizer, seq_len=seq_len,
                     include_first_position=include_first_position,
                     warehouse=_warehouse(ctx), progress=not quiet)
    _echo_notes(result.notes)
    _emit(result, as_json)


@cli.command("register-activations")
@click.option("--path", required=True, type=click.Path(exists=True),
              help="A datasets save_to_disk folder, a .parquet file, an .npz file, or an .npy "
                   "file with --token-ids.")
@click.option("--token-ids", type=click.Path(exists=True, dir_okay=False),
              help="With an .npy of activations [n_sequences, seq_len, d_model]: the .npy of "
                   "their token ids [n_sequences, seq_len].")
@click.option("--name", help="Register under this name, tied to no checkpoint.")
@click.option("--run", help="Run the activations belong to (created as external if new).")
@click.option("--step", type=cli_types.STEP, help="Checkpoint step.")
@click.option("--stage", help="Stage name the activations were read at.")
@click.option("--include-first-position", is_flag=True,
              help="Use position 0 when estimating the norm scale (left out by default).")
@json_option
@click.pass_context
def register_command(ctx, path, token_ids, name, run, step, stage, include_first_position,
                     as_json):
    """Register activations collected elsewhere as an activation set.

    Columns: activations (a list of length d_model per row), sequence_id, position, token_id,
    split. A fixed-length float32 list is used in place, not copied. Any other form is converted
    once into an activation set inside the warehouse, the input left untouched: float16 or
    float64 values, variable-length lists of one width (Dataset.from_dict with .tolist(), polars),
    or an .npz with activations [n_sequences, seq_len, d_model] and token_ids [n_sequences,
    seq_len] (optionally split [n_sequences]), or the same two arrays as .npy files (--path and
    --token-ids). The whole set is checked (widths, finite values) before anything is
    registered.

    \b
    Examples:
      featurestore register-activations --path acts/ --run mymodel --step 1000 \
          --stage layer_6_post_mlp
      featurestore register-activations --path acts.parquet --name probe-set
      featurestore register-activations --path acts.npz --name probe-set   # np.savez(...)
      featurestore register-activations --path acts.npy --token-ids ids.npy --name probe-set
    """
    from featurestore.ingest.register import register_activations

    result = register_activations(path, name=name, run=run, step=step, stage=stage,
                                  include_first_position=include_first_position,
                                  token_ids=token_ids, warehouse=_warehouse(ctx))
    _emit(result, as_json)


@cli.command("register-model")
@click.option("--run", required=True, help="Run name for the model (created if new).")
@click.option("--path", metavar="DIR|GLOB",
              help="Hugging Face model folders (save_pretrained, safetensors weights): one "
                   "folder, or a quoted glob of a checkpoint series ('ckpts/step_*').")
@click.option("--factory", metavar="MODULE:FUNCTION",
              help="Custom model: package.module:function or path/to/model.py:function, "
                   "called with the --config object, returning the nn.Module.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False),
              help="Custom model: JSON object the factory is called with [default: {}].")
@click.option("--weights", metavar="FILE|GLOB",
              help="Custom model: safetensors state dict(s), one file or a quoted glob.")
@click.option("--adapter", type=click.Path(exists=True, dir_okay=False),
              help="Custom model: JSON file naming the modules of the stages (README: 'Your own "
                   "model').")
@click.option("--stage", "stage_overrides", multiple=True, metavar="NAME=MODULE[:PORT]",
              help="Custom model: override an adapter site (embed, post_attn, mlp_hidden, "
                   "final_norm), e.g. final_norm=norm:output; repeatable.")
@click.option("--step", type=cli_types.STEP,
              help="Step of a single folder or file [default: 0].")
@click.option("--steps", "steps_text", metavar="S1,S2,...",
              help="Steps of the glob's matches in name order [default: each name's trailing "
                   "number].")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
              help="A local tokenizer folder for the run (tokenizer.save_pretrained).")
@click.option("--eval-tokens-from", type=click.Path(exists=True),
              help="Evaluate every checkpoint's next-token loss and accuracy on this token file "
                   "(text or input_ids, as collect's --tokens-from; optional split column).")
@click.option("--eval-tokens", type=cli_types.COUNT,
              help="Evaluate on this many tokens, in equal shares of the file's splits "
                   "[default: as many as equal shares allow].")
@json_option
@click.pass_context
def register_model_command(ctx, run, path, factory, config, weights, adapter, stage_overrides,
                           step, steps_text, tokenizer, eval_tokens_from, eval_tokens, as_json):
    """Register a model's checkpoints as a run: Hugging Face folders or any nn.Module.

    Hugging Face folders: GPT-2, GPT-NeoX/Pythia and Llama-style models (Llama, Mistral, Qwen2).
    Any other model: --factory builds it from --config, --weights are its safetensors state
    dicts, and --adapter says where its stages are. A glob registers a series in one go, each
    step from the trailing number of the name. Everything is checked before anything is written;
    files are used in place and nothing is downloaded. Collect from the run with --tokens-from.

    \b
    Examples:
      featurestore register-model --run pythia --path ~/models/pythia-70m-step1000 --step 1000
      featurestore register-model --run pythia --path '~/models/pythia-70m/step*' \\
          --eval-tokens-from tokens.parquet
      featurestore register-model --run mine --factory model.py:build --config config.json \\
          --weights 'ckpts/step_*.safetensors' --adapter adapter.json
    """
    from featurestore.ingest.register_model import parse_step_list, register_model

    _threads(ctx)
    result = register_model(
        run, path, step, steps=parse_step_list(steps_text), factory=factory, config=config,
        weights=weights, adapter=adapter, stage_overrides=stage_overrides, tokenizer=tokenizer,
        eval_tokens_from=eval_tokens_from, eval_tokens=eval_tokens, warehouse=_warehouse(ctx))
    _emit(result, as_json)


@cli.command("evaluate-checkpoints")
@click.option("--run", required=True, help="A registered model run (hf or custom).")
@click.option("--tokens-from", required=True, type=click.Path(exists=True),
              help="Token file as collect reads it: text (.txt, .jsonl, .parquet, datasets "
                   "folder) or input_ids, with an optional split column.")
@click.option("--tokens", type=cli_types.COUNT,
              help="Evaluate on this many tokens, in equal shares of the file's splits "
                   "[default: as many as equal shares allow].")
@click.option("--checkpoints", default="all", show_default=True,
              help="'all' or comma-separated steps (LAST for the last).")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False),
              help="Tokenizer folder for a text file [default: the run's registered one, or "
                   "the model folder's].")
@json_option
@click.pass_context
def evaluate_checkpoints_command(ctx, run, tokens_from, tokens, checkpoints, tokenizer, as_json):
    """Next-token loss and accuracy of a registered model's checkpoints on a token file.

    Fills checkpoints.heldout_loss, heldout_accuracy and split_metrics ('heldout': every
    sequence; one row per split of the file), so checkpoint_metrics has the run's learning
    curve. Runs trained here already have their task's metrics and are refused.

    \b
    Examples:
      featurestore evaluate-checkpoints --run pythia --tokens-from tokens.parquet
      featurestore sql "SELECT step, split, loss FROM checkpoint_metrics WHERE run = 'pythia'"
    """
    from featurestore.ingest.evaluate_checkpoints import evaluate_checkpoints

    _threads(ctx)
    result = evaluate_checkpoints(run, tokens_from, tokens=tokens, checkpoints=checkpoints,
                                  tokenizer=tokenizer, warehouse=_warehouse(ctx))
    _emit(result, as_json)


@cli.command("train-crosscoder")
@click.option("--name", required=True, help="Name of the basis to create (or replace).")
@click.option("--source", "sources", multiple=True, required=True, metavar="LABEL=SOURCE",
              help="A source, repeated in order (two for a model diff): an activation set "
                   "(a registered name or a path) or, with --tokens-from, a model: "
                   "RUN@STEP:STAGE (STEP a number or LAST) or hf:DIR:STAGE.")
@click.option("--tokens-from", metavar="demo|PATH",
              help="Train straight from the --source models, on these tokens: demo (the demo "
                   "task's generator) or a file as collect reads it: text (.txt, .jsonl, "
                   ".parquet or a datasets folder), tokenized with the first source's tokenizer, "
                   "or token ids (input_ids). No activation files are written.")
@_token_file_options
@click.option("--splits",
              help="With a --tokens-from file: comma-separated splits to draw sequences from, "
                   "in equal shares [default: every split of the file].")
@click.option("--epochs", type=cli_types.COUNT, default=1, show_default=True,
              help="With --tokens-from: read the token stream this many times, each pass after "
                   "the first in a new seeded order of its sequences (for small corpora).")
@click.option("--pool-batches", type=cli_types.COUNT, default=32, show_default=True,
              help="With --tokens-from: the shuffle pool, in batches (memory: pool-batches x "
                   "batch-size x sources x d_model x 4 bytes).")
@click.option("--k", type=cli_types.COUNT, default=32, show_default=True,
              help="batchtopk, matryoshka: active latents per token on average; topk: per token.")
@click.option("--aux-k", type=cli_types.NON_NEGATIVE_COUNT,
              help="AuxK dead latents per token (0: off) [default: 2k for batchtopk, topk and "
                   "matryoshka, 0 for vanilla and jumprelu].")
@click.option("--aux-coeff", type=cli_types.NON_NEGATIVE, default=1 / 32, show_default=True)
@click.option("--dict-size", type=cli_types.COUNT, help="Latents [default: 16 x d_model].")
@click.option("--steps", type=cli_types.COUNT, help="Optimiser steps [default: 2000].")
@click.option("--tokens", type=cli_types.COUNT,
              help="Training tokens (instead of steps); with --tokens-from, the length of the "
                   "token stream, each token used once.")
@click.option("--batch-size", type=cli_types.COUNT, default=1024, show_default=True)
@click.option("--lr", type=cli_types.POSITIVE, help="Peak learning rate [default: 1e-3].")
@click.option("--betas", type=(cli_types.BETA, cli_types.BETA), default=(0.9, 0.999),
              show_default=True, help="Adam betas, each in [0, 1).")
@_arch_options
@click.option("--k-anneal-from", type=cli_types.NON_NEGATIVE_COUNT, default=0, show_default=True,
              help="batchtopk, topk, matryoshka: start at this k and anneal to --k over the "
                   "first 10% (0: off).")
@click.option("--shared-latents", "n_shared", type=cli_types.NON_NEGATIVE_COUNT, default=0,
              show_default=True, help="Designated shared latents (one decoder, lower penalty).")
@click.option("--log-every", type=cli_types.COUNT, default=50, show_default=True)
@click.option("--save-every", type=cli_types.COUNT, default=500, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted training of NAME exactly.")
@click.option("--seed", type=cli_types.SEED, default=0, show_default=True)
@click.option("--wandb", is_flag=True, help="Also log to wandb (offline unless WANDB_MODE is set).")
@_fit_bound_options
@json_option
@quiet_option
@click.pass_context
def train_crosscoder_command(ctx, name, sources, tokens_from, text_column, tokenizer, seq_len,
                             splits, epochs, pool_batches, arch, k, aux_k, aux_coeff, dict_size,
                             steps, tokens, batch_size, lr, betas, l1_coeff, l0_coeff,
                             norm_loss_fraction,
                             jumprelu_bandwidth, group_sizes, k_anneal_from, n_shared,
                             log_every, save_every, resume, seed, wandb,
                             min_explained_variance, max_active_fraction, max_dead_fraction,
                             as_json, quiet):
    """Train a crosscoder on aligned activation sets, or straight from models, and register it.

    One shared sparse dictionary over several sources (a base model and its fine-tune, or
    checkpoints); with one source it is an SAE. Registers `bases`, `features`,
    `decoder_directions` and `training_metrics`; see the model_diff views. A fit that misses a
    quality bound registers nothing and is kept in <warehouse>/rejected/NAME/; --resume with a
    relaxed bound registers it without training again.

    With --tokens-from, every source is a model run through nnsight on the same token batches
    while training: an activation buffer keeps --pool-batches batches, shuffles them and
    refills half when half is used; --epochs replays a small corpus. Nothing is written but the
    basis. Sets and models do not mix. A run whose steps follow from --tokens (no --steps) needs
    at least 100 of them.

    \b
    Examples:
      featurestore train-crosscoder --name diff \\
          --source base=demo@1800:layer_2_post_mlp --source ft=demo-ft@500:layer_2_post_mlp
      featurestore train-crosscoder --name diff --source ... --resume
      featurestore train-crosscoder --name sae --source x=acts/ --arch vanilla --l1-coeff 2
      featurestore train-crosscoder --name jr --source x=acts/ --arch jumprelu --l0-coeff 3
      featurestore train-crosscoder --name nested --source x=acts/ --arch matryoshka \\
          --dict-size 1024 --group-sizes 64,128,256,576
      featurestore train-crosscoder --name diff --tokens-from demo --tokens 2000000 \\
          --source base=demo@LAST:layer_2_post_mlp --source ft=demo-ft@LAST:layer_2_post_mlp
      featurestore train-crosscoder --name gpt2-sae --tokens-from tokens.parquet \\
          --source x=hf:~/models/gpt2:layer_6_post_mlp
      featurestore train-crosscoder --name small-sae --tokens-from tokens.parquet --epochs 4 \\
          --source x=hf:~/models/gpt2:layer_6_post_mlp --min-explained-variance 0.7
      featurestore train-crosscoder --name text-sae --tokens-from corpus.txt --tokens 1000000 \\
          --seq-len 128 --source x=pythia@LAST:layer_3_post_mlp
      featurestore train-crosscoder --name web-diff --tokens-from web.jsonl --splits news \\
          --source base=pythia@1000:layer_3_post_mlp --source ft=pythia@LAST:layer_3_post_mlp
    """
    from featurestore.ingest.train_crosscoder import parse_group_sizes, train_crosscoder_job

    _threads(ctx)
    result = train_crosscoder_job(
        name, list(sources), arch=arch, k=k, aux_k=aux_k, aux_coeff=aux_coeff,
        dict_size=dict_size, steps=steps, tokens=tokens, batch_size=batch_size, lr=lr,
        betas=betas, l1_coeff=l1_coeff, l0_coeff=l0_coeff, jumprelu_bandwidth=jumprelu_bandwidth,
        norm_loss_fraction=norm_loss_fraction,
        group_sizes=parse_group_sizes(group_sizes), k_anneal_from=k_anneal_from, n_shared=n_shared,
        log_every=log_every, save_every=save_every, resume=resume, seed=seed,
        tokens_from=tokens_from, pool_batches=pool_batches, epochs=epochs,
        text_column=text_column, tokenizer=tokenizer, seq_len=seq_len, splits=_split_list(splits),
        min_explained_variance=min_explained_variance, max_active_fraction=max_active_fraction,
        max_dead_fraction=max_dead_fraction, wandb=wandb, warehouse=_warehouse(ctx),
        progress=not quiet)
    _echo_notes(result.notes)
    _emit(result, as_json)


# --- shared feature bases and their dynamics ------------------------------------------------------

@cli.command("shared-feature-fit")
@click.option("--run", required=True, help="Run whose checkpoints to pool.")
@click.option("--stage", required=True, help="Stage to fit, e.g. layer_2_post_mlp.")
@click.option("--checkpoints", default="all", show_default=True, metavar="all|STEP,...",
              help="Checkpoints to pool (at least 3, one run; LAST = the last).")
@click.option("--name", required=True, help="Name of the basis to create (or replace).")
@click.option("--kind", type=click.Choice(BASIS_KINDS), default="pooled",
              show_default=True, help="pooled: one SAE on all checkpoints; crosscoder: one "
                                      "decoder slice per checkpoint.")
@click.option("--k", type=cli_types.COUNT, default=32, show_default=True,
              help="batchtopk, matryoshka: active features per token on average; topk: per "
                   "token.")
@click.option("--dict-size", type=cli_types.COUNT, help="Features [default: 16 x d_model].")
@click.option("--steps", type=cli_types.COUNT, default=2000, show_default=True)
@click.option("--batch-size", type=cli_types.COUNT, default=1024, show_default=True)
@click.option("--lr", type=cli_types.POSITIVE, help="Peak learning rate [default: 1e-3].")
@_arch_options
@click.option("--seeds", type=cli_types.COUNT, default=1, show_default=True,
              help="Fit N bases with seeds SEED.. and record how many features they share.")
@click.option("--seed", type=cli_types.SEED, default=0, show_default=True)
@click.option("--weighting", type=click.Choice(WEIGHTINGS), default=DEFAULT_WEIGHTING,
              show_default=True,
              help="Pooled: tokens each checkpoint adds to the fit. novelty: in proportion to "
                   "how far its activations moved since the checkpoint before (a log-spaced "
                   "series crowds barely trained checkpoints at the start); equal: all.")
@click.option("--init-weight", type=cli_types.FRACTION, default=1.0, show_default=True,
              help="Pooled: multiplies the step-0 (random init) checkpoint's weight; 0 leaves "
                   "it out of the fit, but it is still encoded and swept.")
@_fit_bound_options
@json_option
@quiet_option
@click.pass_context
def shared_feature_fit_command(ctx, run, stage, checkpoints, name, kind, arch, k, dict_size,
                               steps, batch_size, lr, l1_coeff, l0_coeff, jumprelu_bandwidth,
                               norm_loss_fraction,
                               group_sizes, seeds, seed, weighting,
                               init_weight,
                               min_explained_variance, max_active_fraction, max_dead_fraction,
                               as_json, quiet):
    """Fit one shared feature basis for a stage on activations pooled from many checkpoints.

    Every feature gets one id at every checkpoint. The fit-quality report (explained variance
    per checkpoint, L0, active and dead fraction) is stored with the basis; a fit that misses a
    bound fails, says which and by how much, registers nothing and is kept in
    <warehouse>/rejected/NAME/ for inspection.

    \b
    Examples:
      featurestore shared-feature-fit --run demo --stage layer_2_post_mlp --name demo-l2
      featurestore shared-feature-fit --run demo --stage final_norm --name demo-fn \\
          --checkpoints 0,100,400,LAST --kind crosscoder --seeds 3
      featurestore shared-feature-fit --run demo --stage layer_2_post_mlp --name demo-nested \\
          --arch matryoshka --dict-size 1024 --group-sizes 64,128,256,576
    """
    from featurestore.ingest.shared_feature_fit import shared_feature_fit
    from featurestore.ingest.train_crosscoder import parse_group_sizes

    _threads(ctx)
    result = shared_feature_fit(
        run, stage, name, checkpoints=checkpoints, kind=kind, arch=arch, k=k,
        dict_size=dict_size, steps=steps, batch_size=batch_size, lr=lr, l1_coeff=l1_coeff,
        l0_coeff=l0_coeff, jumprelu_bandwidth=jumprelu_bandwidth,
        norm_loss_fraction=norm_loss_fraction,
        group_sizes=parse_group_sizes(group_sizes), seeds=seeds, seed=seed, weighting=weighting,
        init_weight=init_weight,
        min_explained_variance=min_explained_variance,
        max_active_fraction=max_active_fraction, max_dead_fraction=max_dead_fraction,
        warehouse=_warehouse(ctx), progress=not quiet)
    _emit(result, as_json)
    if not as_json:  # --json carries them in its `warnings`
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)


@cli.command("import-dictionary")
@click.option("--format", "format_", required=True,
              type=click.Choice(IMPORT_FORMATS),
              help="The tool that saved the dictionary.")
@click.option("--path", required=True, type=click.Path(exists=True),
              help="Its folder (SAELens: cfg.json + sae_weights.safetensors; sparsify: cfg.json "
                   "+ sae.safetensors; dictionary_learning: ae.pt or model_final.pt, with the "
                   "config.json beside it), or the dictionary_learning weights file.")
@click.option("--name", required=True, help="Name of the basis to create (or replace).")
@click.option("--run", help="Run whose checkpoints the dictionary reads (with --stage).")
@click.option("--stage", help="Stage it was trained on, e.g. layer_2_post_mlp (with --run).")
@click.option("--checkpoints", metavar="all|STEP,...",
              help="With --run: the checkpoints (at least 3; a crosscoder over N sources takes "
                   "N) [default: every checkpoint the stage was collected at].")
@click.option("--source", "sources", multiple=True, metavar="LABEL=SET",
              help="Instead of --run: one activation set per source, in the dictionary's order "
                   "(as train-crosscoder takes them; two sources give a model diff).")
@json_option
@click.pass_context
def import_dictionary_command(ctx, format_, path, name, run, stage, checkpoints, sources,
                              as_json):
    """Register an SAE or crosscoder trained with SAELens, sparsify or dictionary_learning.

    The dictionary's own files are read (safetensors, or .pt state dicts loaded with
    weights_only=True) and its encoder (input normalisation, decoder-bias subtraction, ReLU,
    TopK, JumpReLU or BatchTopK threshold) is folded exactly into a featurestore basis, so the
    sweep, births, compare, patch, lineage, exports and model diff work on it. Its fit on the
    activations is recorded in bases.fit_quality.

    \b
    Examples:
      featurestore import-dictionary --format saelens --path ./my-sae \\
          --name my-sae --run demo --stage layer_2_post_mlp
      featurestore import-dictionary --format dictionary_learning --path ./crosscoder \\
          --name diff --source base=demo@1800:layer_2_post_mlp \\
          --source chat=demo-ft@300:layer_2_post_mlp --json
    """
    from featurestore.ingest.import_dictionary import import_dictionary

    _threads(ctx)
    result = import_dictionary(format_, path, name, run=run, stage=stage,
                               checkpoints=checkpoints, sources=list(sources),
                               warehouse=_warehouse(ctx))
    _emit(result, as_json)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command("export-dictionary")
@click.option("--basis", required=True, help="A one-source basis (pooled, or an SAE).")
@click.option("--format", "format_", required=True, type=click.Choice(EXPORT_FORMATS),
              help="saelens: any architecture; sparsify: TopK bases.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder [default: WAREHOUSE/exports/BASIS/FORMAT].")
@click.option("--step", type=int,
              help="Pooled bases whose checkpoints have different norm scales: the checkpoint "
                   "the SAE is for.")
@json_option
@click.pass_context
def export_dictionary_command(ctx, basis, format_, out, step, as_json):
    """Write a basis so SAELens or sparsify loads it with its own loader.

    The folder holds cfg.json and the weights as safetensors, in original activation units
    (the basis's norm scale folded in); BatchTopK and Matryoshka thresholds become per-latent
    JumpReLU thresholds with the same code. Load it with sae_lens.SAE.load_from_disk(DIR) or
    sparsify.SparseCoder.load_from_disk(DIR).

    \b
    Examples:
      featurestore export-dictionary --basis demo-l2 --format saelens --step 1800
      featurestore export-dictionary --basis my-topk --format sparsify --out ./sae --json
    """
    from featurestore.queries.export_dictionary import export_dictionary

    result = export_dictionary(basis, format_, out=out, step=step, warehouse=_warehouse(ctx))
    _emit(result, as_json)


@cli.command("feature-trajectory-sweep")
@click.option("--basis", required=True, help="A shared basis (from shared-feature-fit).")
@click.option("--checkpoints", default="all", show_default=True, metavar="all|STEP,...",
              help="Checkpoints of the basis to encode.")
@click.option("--workers", type=cli_types.PARALLEL, default=1, show_default=True,
              help="Processes encoding checkpoints in parallel.")
@json_option
@quiet_option
@click.pass_context
def feature_trajectory_sweep_command(ctx, basis, checkpoints, workers, as_json, quiet):
    """Encode every checkpoint in a shared basis and write the trajectory tables.

    Writes trajectories, feature_directions, feature_activations, feature_examples,
    checkpoint_summary and split_profiles, in one commit. Train-crosscoder bases (model
    diffs) are swept by crosscoder-sweep.

    \b
    Examples:
      featurestore feature-trajectory-sweep --basis demo-l2
      featurestore feature-trajectory-sweep --basis demo-l2 --workers 2 --json
    """
    from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep

    _threads(ctx)
    result = feature_trajectory_sweep(basis, checkpoints=checkpoints, workers=workers,
                                      warehouse=_warehouse(ctx), progress=not quiet)
    _emit(result, as_json)


@cli.command("crosscoder-sweep")
@click.option("--basis", required=True, help="A train-crosscoder basis (a model diff).")
@json_option
@quiet_option
@click.pass_context
def crosscoder_sweep_command(ctx, basis, as_json, quiet):
    """Make the latents of a train-crosscoder basis readable: per-source statistics, contexts.

    Encodes every token of the basis's aligned activation sets and writes, in one commit,
    crosscoder_latent_stats (per latent and source: activation rate, mean activation, energy,
    decoder norm, the source's encoder input) and crosscoder_examples (the top contexts of every
    latent, decoded when the run has token strings, with what it writes into each source).
    Re-running replaces the basis's rows. For shared bases use feature-trajectory-sweep.

    \b
    Examples:
      featurestore crosscoder-sweep --basis demo-diff
      featurestore feature 17 --basis demo-diff
      featurestore sql "SELECT d.feature_id, s.source, s.energy, s.activation_rate
          FROM model_diff d JOIN crosscoder_latent_stats s USING (basis, feature_id)
          WHERE d.basis = 'demo-diff' AND d.class = 'ft-exclusive' ORDER BY s.energy DESC"
      featurestore report --basis demo-diff
    """
    from featurestore.ingest.crosscoder_sweep import crosscoder_sweep

    _threads(ctx)
    result = crosscoder_sweep(basis, warehouse=_warehouse(ctx), progress=not quiet)
    _emit(result, as_json)


@cli.command("feature-birth-analyze")
@click.option("--basis", required=True, help="Shared basis whose trajectories to read.")
@click.option("--metric", type=click.Choice(METRICS), default=DEFAULT_METRIC, show_default=True,
              help="Trajectory column that marks a feature present (decoder_norm: crosscoder-"
                   "kind bases only).")
@click.option("--presence", type=click.Choice(PRESENCE), default=DEFAULT_PRESENCE,
              show_default=True,
              help="How T sets each feature's threshold: relative: T x the feature's own peak "
                   "of the metric over the checkpoints; absolute: T itself.")
@click.option("--threshold", type=cli_types.POSITIVE,
              help="T: present when metric >= T (x the peak) [default: relative 0.4; absolute: "
                   "activation_rate 0.01, energy 0.1/features, else 10% of the metric's 99th "
                   "percentile].")
@click.option("--persistence", type=cli_types.COUNT, default=4, show_default=True,
              help="K: checkpoints in a row the feature must stay present (absent for a death); "
                   "in the last K-1 checkpoints, present to the end counts as a censored birth.")
@click.option("--stable-eps", type=cli_types.NON_NEGATIVE, default=0.1, show_default=True,
              help="E: stable when within E x |final value| of the final value from then on.")
@click.option("--stable-cos", type=cli_types.COSINE, default=0.9, show_default=True,
              help="C: stable also needs direction cosine with the final direction >= C.")
@click.option("--permutations", type=cli_types.COUNT, default=20, show_default=True,
              help="Shuffled checkpoint orders in the null control.")
@click.option("--seed", type=cli_types.SEED, default=0, show_default=True,
              help="Seed of the permutations.")
@json_option
@click.pass_context
def feature_birth_analyze_command(ctx, basis, metric, presence, threshold, persistence,
                                  stable_eps, stable_cos, permutations, seed, as_json):
    """Find when each feature of a shared basis is born, stabilises and dies.

    Over the checkpoints in step order, a feature is present where its metric is >= its
    threshold (by default T x its own peak of the metric; --presence absolute: T). A birth is
    the first checkpoint from which it stays present for K checkpoints, or, in the last K-1
    checkpoints, to the last one (a censored birth, flagged in births.birth_censored), having
    been absent at every checkpoint before (features present at the first checkpoint are
    present_at_init, not births); stabilisation is the first checkpoint from which the metric
    stays within E of its final value with direction cosine >= C; death is the first from which
    it stays absent for K checkpoints (censored likewise). The same rule on shuffled checkpoint
    orders gives the false-birth rate. Stored in `births` (per feature) and `birth_summary` (per
    step window); re-running with the same parameters replaces them. The rule is the SQL macro
    feature_births(basis, metric, T, K, E, C, presence := ...).

    \b
    Examples:
      featurestore feature-birth-analyze --basis demo-l2
      featurestore feature-birth-analyze --basis demo-l2 --metric activation_rate \\
          --presence absolute --threshold 0.01
      featurestore feature-birth-analyze --basis demo-l2 --metric energy --persistence 2 --json
      featurestore sql "SELECT * FROM birth_summary WHERE basis = 'demo-l2'"
    """
    from featurestore.ingest.birth_analysis import analyze_births

    result = analyze_births(basis, metric=metric, threshold=threshold, presence=presence,
                            persistence=persistence, stable_eps=stable_eps, stable_cos=stable_cos,
                            permutations=permutations, seed=seed, warehouse=_warehouse(ctx))
    _emit(result, as_json)


@cli.command("feature-compare")
@click.option("--basis", required=True, help="Shared basis whose trajectories to compare.")
@click.option("--source", type=cli_types.STEP, required=True,
              help="Checkpoint step to compare from.")
@click.option("--target", type=cli_types.STEP, required=True,
              help="Checkpoint step to compare to.")
@click.option("--top", type=cli_types.COUNT, default=20, show_default=True,
              help="Features to print.")
@click.option("--rank-by", type=click.Choice(tuple(RANK_BY)), default=DEFAULT_RANK_BY,
              show_default=True,
              help="Change to rank by (largest absolute change first).")
@json_option
@click.pass_context
def feature_compare_command(ctx, basis, source, target, top, rank_by, as_json):
    """Compare every feature of a shared basis between two checkpoints.

    Per feature: activation rate at both steps, its change and smoothed log ratio, the change of
    mean activation and energy, the cosine of the refitted directions and the rate change per
    token split, with a rank by each change. Stored in `diffs` (re-running replaces the pair);
    the same rows come from the SQL macro feature_compare(basis, source, target).

    \b
    Examples:
      featurestore feature-compare --basis demo-l2 --source 0 --target 1800
      featurestore feature-compare --basis demo-l2 --source 100 --target 400 --rank-by log_ratio
      featurestore sql "SELECT * FROM diffs WHERE rank_by_energy_change <= 5"
    """
    from featurestore.ingest.feature_compare import compare_features

    result = compare_features(basis, source, target, warehouse=_warehouse(ctx), top=top,
                              rank_by=rank_by)
    _emit(result, as_json)


@cli.command("feature-patch")
@click.option("--basis", required=True, help="Pooled shared basis; its stage is patched.")
@click.option("--source", type=cli_types.STEP, required=True,
              help="Checkpoint whose feature activations are patched in (--mode patch).")
@click.option("--target", type=cli_types.STEP, required=True,
              help="Checkpoint whose model runs and is patched.")
@click.option("--features", default=DEFAULT_FEATURES, show_default=True, metavar="ID,...|top:N",
              help="Feature ids, or the top N of the pair's diffs ranking (run feature-compare "
                   "first).")
@click.option("--rank-by", type=click.Choice(tuple(RANK_BY)), default=DEFAULT_RANK_BY,
              show_default=True, help="Ranking that top:N reads.")
@click.option("--mode", type=click.Choice(MODES), default=MODES[0],
              show_default=True, help="What the features are set to (see above).")
@click.option("--scale", type=cli_types.ANY,
              help="--mode scale: multiply the target's activations by A.")
@click.option("--tokens", type=cli_types.COUNT, default=2048, show_default=True,
              help="Tokens to run, shared equally by the splits.")
@click.option("--splits", help="Comma-separated splits [default: the demo task's sub-tasks, "
                               "or every split of the activation set].")
@click.option("--seed", type=cli_types.SEED, default=0, show_default=True,
              help="Seed of the demo-task sequences.")
@json_option
@quiet_option
@click.pass_context
def feature_patch_command(ctx, basis, source, target, features, rank_by, mode, scale, tokens,
                          splits, seed, as_json, quiet):
    """Patch features of a shared basis in a checkpoint's model and measure what changes.

    At the basis's stage the target model's activations x become
    x - decode(f_target[S]) + decode(f_new[S]), the reconstruction error kept, with f_new the
    source checkpoint's activations on the same tokens (patch), zero, the feature's mean at the
    target (mean) or the target's activations times --scale (scale). Each feature alone and the
    whole set together; per split: loss, accuracy, KL divergence from the clean output and, for
    demo tasks, the correct answer's logit difference. Every row carries the site's
    reconstruction error and the loss change of splicing the reconstruction in, to judge an
    effect against. Stored in `patches`; re-running a (basis, source, target, mode) replaces it.

    \b
    Examples:
      featurestore feature-patch --basis demo-l2 --source 0 --target 1800
      featurestore feature-patch --basis demo-l2 --source 0 --target 1800 --features 12,40 \\
          --mode zero --splits modular,induction --json
      featurestore sql "SELECT feature_set, split, delta, spliced_loss_delta FROM patches
          WHERE metric = 'loss' ORDER BY abs(delta) DESC LIMIT 10"
    """
    from featurestore.ingest.feature_patch import feature_patch

    result = feature_patch(basis, source, target, features=features, rank_by=rank_by,
                           mode=mode, scale=scale, tokens=tokens, splits=splits, seed=seed,
                           warehouse=_warehouse(ctx), progress=not quiet and not as_json)
    _emit(result, as_json)


@cli.command("feature-lineage")
@click.option("--basis", required=True, help="Pooled shared basis of a demo-model run.")
@click.option("--steps", default="all", show_default=True, metavar="all|STEP,...",
              help="Checkpoints to map (LAST = the last).")
@click.option("--features", metavar="ID,...|top:N",
              help="Features to map, instead of the causal filter (top:N: highest energy).")
@click.option("--top-k", type=cli_types.COUNT, default=8, show_default=True,
              help="Edges kept per feature, method and source type.")
@click.option("--min-weight", type=cli_types.NON_NEGATIVE, default=0.0, show_default=True,
              help="Drop edges with |weight| below this.")
@click.option("--upstream", metavar="BASIS",
              help="A basis of the same run at an earlier stage: feature -> feature edges.")
@click.option("--tokens", type=cli_types.COUNT, default=2048, show_default=True,
              help="Tokens the model reads at each checkpoint.")
@click.option("--patch-threshold", type=cli_types.NON_NEGATIVE, default=0.01, show_default=True,
              help="Causal filter: |loss delta| a feature's own patch must reach.")
@click.option("--top-features", type=cli_types.COUNT, default=16, show_default=True,
              help="Causal filter without patch rows: this many features of highest energy.")
@json_option
@quiet_option
@click.pass_context
def feature_lineage_command(ctx, basis, steps, features, top_k, min_weight, upstream, tokens,
                            patch_threshold, top_features, as_json, quiet):
    """Map features of a shared basis to the heads, neurons and features that build them.

    Per checkpoint, through nnsight: direct feature attribution (dfa) of every attention head,
    MLP neuron and the embeddings, gradient x activation (grad_x_act) as a second line of
    evidence, upstream features of --upstream (decoder cosine, activation correlation) and, for
    final_norm bases, the output tokens a feature promotes and suppresses (dla). Only features
    that pass the causal filter get edges: a single-feature patch moved the loss by at least
    --patch-threshold (feature-patch rows at that step), else the --top-features of highest
    energy. Stored in `lineage_edges` with the pruning settings; re-running replaces a step.

    \b
    Examples:
      featurestore feature-lineage --basis demo-l2 --steps LAST
      featurestore feature-lineage --basis demo-fn --steps 0,400,LAST --upstream demo-l2 --json
      featurestore sql "SELECT step, src_id, weight FROM lineage_edges
          WHERE basis = 'demo-l2' AND dst_id = '12' AND method = 'dfa' AND rank = 1"
    """
    from featurestore.ingest.feature_lineage import feature_lineage

    result = feature_lineage(basis, steps=steps, features=features, top_k=top_k,
                             min_weight=min_weight, upstream=upstream, tokens=tokens,
                             patch_threshold=patch_threshold, top_features=top_features,
                             warehouse=_warehouse(ctx), progress=not quiet and not as_json)
    _emit(result, as_json)


@cli.command("demo")
@click.option("--steps", type=cli_types.COUNT, help="Training steps of the base run.")
@click.option("--finetune-steps", type=cli_types.COUNT, default=DEFAULT_FINETUNE_STEPS,
              show_default=True)
@click.option("--tokens", type=cli_types.COUNT, default=DEFAULT_TOKENS, show_default=True,
              help="Tokens collected per checkpoint.")
@click.option("--artifacts", "artifacts_out", type=click.Path(file_okay=False),
              default=DEFAULT_OUT, show_default=True, help="Root of the artifact layout.")
@quiet_option
@click.pass_context
def demo_command(ctx, steps, finetune_steps, tokens, artifacts_out, quiet):
    """Run the main job end to end on the built-in default.

    Trains `demo`, fine-tunes `demo-ft` from its last checkpoint, collects layer_2_post_mlp and
    final_norm for every checkpoint of both, trains a crosscoder on the pair, fits shared bases
    on demo's checkpoints (sweep, births, compare), patches and traces the features that changed
    most, exports graphs, plots, the artifact layout and reports, and prints a summary.

    \b
    Example:
      featurestore demo
    """
    from featurestore.demo import run_demo

    _threads(ctx)
    summary = run_demo(steps=steps, finetune_steps=finetune_steps, tokens=tokens,
                       warehouse=_warehouse(ctx), artifacts_out=artifacts_out,
                       progress=not quiet,
                       log=lambda text: click.echo(text, err=True))
    click.echo(summary)
    where = f" --warehouse {shlex.quote(_warehouse(ctx))}" if _warehouse(ctx) else ""
    click.echo(f"\nBrowse the results: featurestore{where} serve   (then open "
               "http://127.0.0.1:8765/)")


@cli.group("experiment")
def experiment_group():
    """Published results reproduced end to end with the store's own jobs."""


@experiment_group.command("grokking")
@click.option("--run", default="grok", show_default=True, help="Name of the run to train.")
@click.option("--p", "p", type=cli_types.COUNT, default=GrokkingConfig.p, show_default=True,
              help="The prime modulus: the task is a + b mod p over all p^2 pairs.")
@click.option("--train-fraction", type=cli_types.FRACTION, default=GrokkingConfig.train_fraction,
              show_default=True,
              help="Share of the pairs trained on; the rest are the test pairs.")
@click.option("--steps", type=cli_types.COUNT, default=GrokkingConfig.steps, show_default=True,
              help="Full-batch AdamW steps.")
@click.option("--d-model", type=cli_types.COUNT, default=GrokkingConfig.d_model,
              show_default=True,
              help="Width of the one-layer model (4 heads, MLP 4x wider).")
@click.option("--weight-decay", type=cli_types.NON_NEGATIVE,
              default=GrokkingConfig.weight_decay, show_default=True,
              help="AdamW weight decay: what drives the late cleanup.")
@click.option("--dense-every", type=cli_types.COUNT, default=DENSE_EVERY,
              show_default=True,
              help="Checkpoint every N steps after the log-spaced start.")
@click.option("--fit-steps", type=cli_types.COUNT, default=BASIS_FIT_STEPS,
              show_default=True,
              help="Training steps of each shared basis.")
@click.option("--seed", type=cli_types.SEED, default=GrokkingConfig.seed, show_default=True,
              help="Seed of the train/test split and the weights.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Report directory [default: WAREHOUSE/exports/RUN/report].")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@quiet_option
@click.pass_context
def grokking_command(ctx, run, p, train_fraction, steps, d_model, weight_decay, dense_every,
                     fit_steps, seed, out, as_json, quiet):
    """The phases of grokking (Nanda et al., 2023) with the store's own jobs.

    Trains a one-layer transformer on a + b mod p (full batch, AdamW, weight decay 1) with
    log-spaced then dense checkpoints and their progress measures (progress_measures), collects
    layer_0_post_mlp and final_norm on every problem, fits a shared basis per stage, sweeps,
    finds births, compares the first and last checkpoint, reads each feature's frequency
    (feature_frequencies), patches and traces the features that changed most, and writes a
    report. Then, in SQL: were the key-frequency features born before test accuracy jumped?

    \b
    Examples:
      featurestore experiment grokking
      featurestore experiment grokking --p 23 --steps 400 --json
      featurestore sql "SELECT * FROM grokking_phases"
      featurestore sql "SELECT * FROM frequency_births WHERE key_frequency AND born_before_jump"
    """
    from featurestore.grokking_experiment import run_grokking_experiment

    _threads(ctx)
    result = run_grokking_experiment(
        run, p=p, train_fraction=train_fraction, steps=steps, d_model=d_model,
        weight_decay=weight_decay, seed=seed, dense_every=dense_every, fit_steps=fit_steps,
        warehouse=_warehouse(ctx), out=out, progress=not quiet,
        log=(lambda text: None) if quiet else (lambda text: click.echo(text, err=True)))
    _emit(result, as_json)


@cli.command("feature-frequencies")
@click.option("--basis", required=True, help="Shared basis of a modular-addition run.")
@click.option("--step", type=cli_types.STEP_OR_LAST, default="LAST", show_default=True,
              help="Checkpoint whose activations are read.")
@json_option
@click.pass_context
def feature_frequencies_command(ctx, basis, step, as_json):
    """Which Fourier frequency each feature of a modular-addition basis follows.

    Encodes every collected problem at the '=' position, averages each feature's activation per
    answer (a + b) mod p, and stores the profile, its dominant frequency and whether that is one
    of the run's key frequencies in `feature_frequencies` (re-running replaces the basis's rows).

    \b
    Examples:
      featurestore feature-frequencies --basis grok-l0
      featurestore sql "SELECT * FROM feature_frequencies WHERE key_frequency"
    """
    from featurestore.ingest.feature_frequencies import feature_frequencies

    result = feature_frequencies(basis, step, warehouse=_warehouse(ctx))
    _emit(result, as_json)


# --- the read side --------------------------------------------------------------------------------


@cli.command("sql")
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]),
              default="table", show_default=True, help="Output format on stdout.")
@click.option("--as-of", "as_of", metavar="SNAPSHOT|TIME",
              help="Query the warehouse as it was at a snapshot id (see `featurestore "
                   "snapshots`) or a time (UTC unless given), e.g. 12 or '2026-12-06 14:00'.")
@click.option("--trusted", is_flag=True,
              help="Full DuckDB, no restrictions: any statement (COPY, ATTACH, CALL, ...), any "
                   "file the user can read or write. It CAN change or damage the warehouse; for "
                   "your own SQL only, never for SQL from someone else.")
@click.pass_context
def sql_command(ctx, query, fmt, as_of, trusted):
    """Run a SQL query on the warehouse and print the result.

    Tables, views (sql/views), macros and UDFs are all available. The query cannot change the
    warehouse: only queries run (SELECT, EXPLAIN, DESCRIBE, SHOW, SUMMARIZE; several separated
    by ; print the last), only table functions that read, and DuckDB reads no file outside the
    warehouse's data folder. Anything else (COPY, ATTACH, SET, CALL, INSERT, DuckLake's
    maintenance functions, read_text('/etc/...')) is refused with exit status 1; --trusted
    lifts every restriction.

    \b
    Examples:
      featurestore sql "SELECT run, step, heldout_loss FROM checkpoints ORDER BY run, step"
      featurestore sql "SELECT * FROM checkpoint_metrics WHERE split = 'induction'" --format csv
      featurestore sql "SELECT * FROM activation_sets" --format parquet > sets.parquet
      featurestore sql "SELECT count(*) FROM births" --as-of 12
      featurestore sql "COPY (FROM runs) TO 'runs.csv'" --trusted
    """
    if trusted:
        import duckdb

        from featurestore.warehouse import connect
        from featurestore.writer import damage_hint

        con = connect(_warehouse(ctx), as_of=as_of)
        try:
            try:
                relation = con.sql(query)  # None: a statement with no result (SET, ATTACH)
                table = relation.to_arrow_table() if relation is not None else None
            except duckdb.Error as error:
                raise FeaturestoreError(f"SQL error: {error}.{damage_hint(str(error))}") from None
        finally:
            con.close()
    else:
        from featurestore.readonly_sql import query_read_only

        table = query_read_only(query, _warehouse(ctx), as_of=as_of)
    if table is not None:
        _write_table(table, fmt)


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but a loopback address also needs --public.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535),
              help="Port to listen on.")
@click.option("--public", is_flag=True,
              help="Allow a --host other than loopback: anyone who can reach the address can "
                   "read the whole warehouse (the app has no login; its SQL stays read-only).")
@click.option("--time-limit", default=10.0, show_default=True, type=click.FloatRange(0.1),
              metavar="SECONDS", help="Stop a query of the SQL page after this long.")
@click.pass_context
def serve_command(ctx, host, port, public, time_limit):
    """Browse the warehouse in a web browser: runs, bases, features across training, model
    diffs and read-only SQL.

    Each page shows the SQL behind it, with a link that opens it in the SQL page. The app reads
    the warehouse read-only and shows what jobs commit after a reload; the SQL page runs only
    queries, reads nothing outside the warehouse, stops a query after --time-limit seconds and
    shows at most 1,000 rows (downloads as CSV or Parquet hold up to 1,000,000).

    \b
    Examples:
      featurestore serve                                  # http://127.0.0.1:8765
      featurestore --warehouse runs/wh serve --port 9000
      featurestore serve --host 0.0.0.0 --public          # reachable from other machines
    """
    import ipaddress

    from featurestore.queries.web_app import create_app, serve

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise click.BadParameter(f"{host!r} is not an IP address or localhost",
                                 param_hint="--host") from None
    if not loopback and not public:
        raise click.BadParameter(
            f"{host} is reachable from other machines and the app has no login: add --public "
            "to serve the warehouse there anyway, or leave --host at 127.0.0.1",
            param_hint="--host")
    if not loopback:
        click.echo(f"warning: serving {host}:{port} to anyone who can reach it; the app has no "
                   "login (the SQL page stays read-only)", err=True)
    create_app(_warehouse(ctx))  # a missing warehouse fails here, before the server starts
    click.echo(f"featurestore: serving {_warehouse(ctx) or 'the warehouse'} at "
               f"http://{'localhost' if host == 'localhost' else host}:{port}/ (Ctrl-C stops)",
               err=True)
    serve(_warehouse(ctx), host=host, port=port, time_limit=time_limit)


def _write_table(table, fmt: str) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, sys.stdout.buffer)
        return
    rows = table.to_pylist()
    if fmt == "json":
        _emit_json(rows)
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(table.column_names)
        writer.writerows([[format_cell(v) for v in row.values()] for row in rows])
    else:
        click.echo(format_table(table.column_names,
                                [[format_cell(v) for v in r.values()] for r in rows]))


@cli.command("tables")
@json_option
@click.pass_context
def tables_command(ctx, as_json):
    """List tables and views with their row counts and descriptions.

    \b
    Example:
      featurestore tables --json
    """
    from featurestore.warehouse import list_tables

    tables = list_tables(_warehouse(ctx))
    if as_json:
        _emit_json(tables)
        return
    click.echo(format_table(
        ["name", "kind", "rows", "status", "description"],
        [[t["name"], t["kind"], "?" if t["rows"] is None else str(t["rows"]),
          t["status"].split(":")[0], t["description"]] for t in tables], max_width=80))
    for table in tables:
        if table["status"] != "ok":
            click.echo(f"{table['name']}: {table['status']}", err=True)


@cli.command("describe")
@click.argument("table")
@json_option
@click.pass_context
def describe_command(ctx, table, as_json):
    """Show a table's or view's columns, types and descriptions.

    \b
    Example:
      featurestore describe activation_sets
    """
    from featurestore.warehouse import describe_table

    columns = describe_table(table, _warehouse(ctx))
    if as_json:
        _emit_json(columns)
        return
    click.echo(format_table(["column", "type", "description"],
                            [[c["column"], c["type"], c["description"]] for c in columns],
                            max_width=100))


@cli.command("feature")
@click.argument("feature", type=cli_types.NON_NEGATIVE_COUNT)
@click.option("--basis", required=True, help="Basis the feature belongs to.")
@click.option("--step", type=cli_types.STEP,
              help="Checkpoint of the examples (shared bases) [default: the last swept].")
@click.option("--examples", type=cli_types.NON_NEGATIVE_COUNT, default=8, show_default=True,
              help="Top contexts to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
@click.pass_context
def feature_command(ctx, feature, basis, step, examples, as_json):
    """Show one feature: its trajectory, birth and top contexts.

    Shared bases: energy, activation rate and mean activation at every swept checkpoint (with
    a sparkline of energy), the feature's birth under the births rule the graphs use (the
    default when stored; censored births said so), and its top contexts at --step with the
    activating token marked. Train-crosscoder bases: the model-diff class and per-source
    statistics and contexts (after crosscoder-sweep). Contexts are decoded text when the run
    has token strings, token ids otherwise.

    \b
    Examples:
      featurestore feature 12 --basis demo-l2
      featurestore feature 12 --basis demo-l2 --step 400 --examples 3
      featurestore feature 17 --basis demo-diff --json
    """
    from featurestore.queries.feature_card import feature_card

    card = feature_card(basis, feature, step=step, examples=examples,
                        warehouse=_warehouse(ctx))
    _emit(card, as_json)


@cli.command("stages")
@click.option("--run", required=True, help="A run with a model.")
@json_option
@click.pass_context
def stages_command(ctx, run, as_json):
    """List the stage names a run's model has, in forward-pass order.

    \b
    Example:
      featurestore stages --run demo
    """
    from featurestore.ingest.collect import run_stage_names

    names = run_stage_names(run, warehouse=_warehouse(ctx))
    if as_json:
        _emit_json(names)
    else:
        click.echo("\n".join(names))


@cli.group("export")
def export_group():
    """Graphs and plots of a shared basis, built from warehouse queries."""


@export_group.command("graphs")
@click.option("--basis", required=True, help="Shared basis to export.")
@click.option("--step", default="all", show_default=True, metavar="all|STEP|LAST",
              help="One graph over every step with lineage or patches, or one step's.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Directory [default: WAREHOUSE/exports/BASIS/graphs].")
@json_option
@click.pass_context
def export_graphs_command(ctx, basis, step, out, as_json):
    """Export a basis's feature graph as node-link JSON, GraphML and attribution-graph JSON.

    Nodes: features (with birth step and top tokens), attention heads, MLP neurons, the
    embedding, output tokens, checkpoints and each checkpoint's reconstruction error. Edges:
    lineage (component -> feature), flows_to (feature -> feature across stages), born_at,
    patch_effect and dla, each with weight, method and step. GraphML opens in Gephi and
    Cytoscape; the attribution graph follows the circuit-tracer / Neuronpedia layout with steps.

    \b
    Examples:
      featurestore export graphs --basis demo-l2
      featurestore export graphs --basis demo-fn --step LAST --out graphs/ --json
    """
    from featurestore.queries.graph_files import export_graphs

    result = export_graphs(basis, step=step, out=out, warehouse=_warehouse(ctx))
    _emit(result, as_json)


@export_group.command("plots")
@click.option("--basis", required=True, help="Basis to plot (shared, or a crosscoder).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Directory [default: WAREHOUSE/exports/BASIS/plots].")
@json_option
@click.pass_context
def export_plots_command(ctx, basis, out, as_json):
    """Export every plot a basis has data for: spec + data JSON, PNG, SVG and HTML.

    Trajectories, the feature x checkpoint heatmap ordered by birth, the birth timeline with its
    null band, the compare scatter, patch effects with their reconstruction error, the relative
    decoder norm histogram (crosscoders), training curves and checkpoint summaries. The HTML is
    self-contained (no network needed); the JSON holds the Vega-Lite spec with its data inline.

    \b
    Examples:
      featurestore export plots --basis demo-l2
      featurestore export plots --basis demo-diff --out plots/ --json
    """
    from featurestore.queries.plots import export_plots

    result = export_plots(basis, out=out, warehouse=_warehouse(ctx))
    _emit(result, as_json)


@cli.command("export-artifacts")
@click.option("--basis", required=True, help="Shared basis to export.")
@click.option("--out", type=click.Path(file_okay=False), default=DEFAULT_OUT, show_default=True,
              help="Root of the layout.")
@json_option
@click.pass_context
def export_artifacts_command(ctx, basis, out, as_json):
    """Write a shared basis as the artifact file layout.

    Under OUT/runs/RUN/analysis/shared_features/STAGE/: the weights (shared_feature_basis.pt,
    torch.load(weights_only=True)), the basis and feature descriptions, trajectories (JSONL),
    checkpoint summaries, split profiles, births, compares, patches and lineage per step, and
    the graphs/ and plots/ exports. Built whole beside the old layout and swapped in.

    \b
    Examples:
      featurestore export-artifacts --basis demo-l2
      featurestore export-artifacts --basis demo-fn --out /data/artifacts --json
    """
    from featurestore.queries.artifacts import export_artifacts

    result = export_artifacts(basis, out=out, warehouse=_warehouse(ctx))
    _emit(result, as_json)


@cli.command("export-dashboards")
@click.option("--basis", required=True, help="Shared basis to export.")
@click.option("--step", metavar="STEP|LAST",
              help="Swept checkpoint to show [default: the last swept, as `feature` uses].")
@click.option("--features", metavar="ID,...|top:N",
              help="Features to export (top:N: highest energy at the step) [default: every "
                   "feature that fires at the step].")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory; the files go to OUT/BASIS_stepSTEP/.")
@json_option
@click.pass_context
def export_dashboards_command(ctx, basis, step, features, out, as_json):
    """Export feature dashboards in the format Neuronpedia imports (SAEDashboard's batches).

    One batch-FEATURE.json per feature at one checkpoint: its top activating contexts with the
    activation at every token (decoded text where the run has token strings, token ids
    otherwise), its activation rate and histogram, and the tokens it promotes and suppresses
    through the checkpoint's unembedding. skipped_indexes.json lists the features that never
    fire there. Neuronpedia's importer reads the folder as it reads SAEDashboard's output.

    \b
    Examples:
      featurestore export-dashboards --basis demo-l2 --out dashboards/
      featurestore export-dashboards --basis demo-fn --step 400 --features top:20 \\
          --out dashboards/ --json
    """
    from featurestore.queries.dashboards import export_dashboards

    _threads(ctx)  # the logit effects run the checkpoint's unembedding in torch
    result = export_dashboards(basis, step=step, features=features, out=out,
                               warehouse=_warehouse(ctx))
    _emit(result, as_json)


@cli.command("report")
@click.option("--basis", required=True, help="Shared basis to report on.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Directory [default: WAREHOUSE/exports/BASIS/report].")
@json_option
@click.pass_context
def report_command(ctx, basis, out, as_json):
    """Write the feature-dynamics report of one stage's basis as HTML and Markdown.

    Fit quality, which features are born when (against the shuffled-order null), stability
    across seeds, which features are causally important (patch effects beside the
    reconstruction error) and which components build them (lineage), each section with the SQL
    behind it and its plots inline.

    \b
    Examples:
      featurestore report --basis demo-l2
      featurestore report --basis demo-fn --out reports/ --json
    """
    from featurestore.queries.report import write_report

    result = write_report(basis, out=out, warehouse=_warehouse(ctx))
    _emit(result, as_json)


@cli.command("init")
@json_option
@click.pass_context
def init_command(ctx, as_json):
    """Create an empty warehouse: the catalog, every table (empty) and the schema version.

    Optional: every job that writes creates the warehouse on its first commit. Running it on an
    existing warehouse changes nothing.

    \b
    Examples:
      featurestore init
      featurestore --warehouse ~/data/wh init --json
    """
    from featurestore.warehouse import init_warehouse

    result = init_warehouse(_warehouse(ctx))
    _emit(result, as_json)


@cli.command("snapshots")
@click.option("--limit", type=cli_types.COUNT, default=20, show_default=True,
              help="Show the newest N snapshots.")
@json_option
@click.pass_context
def snapshots_command(ctx, limit, as_json):
    """List the warehouse's snapshots, newest first: one per job that wrote.

    Each shows its id, time, the job and its command line, and the tables it changed. Query an
    older one with `featurestore sql --as-of ID` or `connect(as_of=ID)`.

    \b
    Examples:
      featurestore snapshots
      featurestore snapshots --limit 100 --json
    """
    from featurestore.warehouse import Warehouse

    snapshots = Warehouse(_warehouse(ctx)).snapshots(limit)
    if as_json:
        _emit_json([s.to_dict() for s in snapshots])
        return
    rows = []
    for s in snapshots:
        tables = sorted({t for values in s.changes.values() for t in values
                         if not t.startswith("main.")})
        rows.append([str(s.snapshot_id), f"{s.time:%Y-%m-%d %H:%M:%S}", s.job or "",
                     " ".join(s.command_line) if s.command_line else "", ", ".join(tables)])
    click.echo(format_table(["snapshot", "time (UTC)", "job", "command line", "tables changed"],
                            rows))


@cli.command("compact")
@click.option("--older-than", type=cli_types.AGE, default="7d", show_default=True, metavar="AGE",
              help="Expire snapshots older than this (e.g. 7d, 12h, 0) and delete files and "
                   "artefact folders only they read.")
@click.option("--dry-run", is_flag=True, help="Report what would go; change nothing.")
@json_option
@click.pass_context
def compact_command(ctx, older_than, dry_run, as_json):
    """Merge small table files, expire old snapshots and delete what nothing reads any more.

    Jobs never delete what they replace: older snapshots keep reading it (time travel, open
    notebooks). This reclaims the space, with DuckLake's own maintenance functions for table
    files, plus artefact folders (checkpoints, activation sets, weights) and scratch of killed
    jobs. The newest snapshot is always kept.

    \b
    Examples:
      featurestore compact --dry-run
      featurestore compact --older-than 1d --json
    """
    from featurestore.compaction import compact_warehouse

    result = compact_warehouse(_warehouse(ctx), older_than, dry_run)
    _emit(result, as_json)


@cli.command("check")
@click.option("--quick", is_flag=True,
              help="Skip what reads whole files (checksums, page decoding, activation "
                   "fingerprints, directions against weights): sizes, footers, row counts and "
                   "artefact presence only.")
@click.option("--repair", is_flag=True,
              help="Take damaged table files out of the catalog in one new snapshot, so the "
                   "jobs that wrote them can run again (their rows were unreadable already).")
@json_option
@click.pass_context
def check_command(ctx, quick, repair, as_json):
    """Verify every file the warehouse serves, and say what to re-run for each damaged one.

    Table files are checked against the catalog (present, size, the SHA-256 recorded when they
    were written, footer and row count, every page decodable); artefacts against their rows
    (checkpoints and weights present and whole, activation sets holding the tokens their rows
    fingerprint, decoder_directions equal to the basis weights). Exit status 1 when anything
    is wrong and was not repaired.

    \b
    Examples:
      featurestore check
      featurestore check --quick --json
      featurestore check --repair      # then run the commands it names
    """
    from featurestore.integrity import check_warehouse

    result = check_warehouse(_warehouse(ctx), deep=not quick, repair=repair)
    _emit(result, as_json)
    unrepaired = [p for p in result.problems
                  if result.repaired_snapshot is None or p.kind != "table file"]
    if unrepaired:
        ctx.exit(1)


@cli.group("catalog")
def catalog_group():
    """Maintain the warehouse's catalog."""


@catalog_group.command("migrate")
@json_option
@click.pass_context
def catalog_migrate_command(ctx, as_json):
    """Convert a warehouse of schema 2 (featurestore.duckdb) to DuckLake, in place.

    Every table is copied into the lake in one snapshot; artefacts stay where they are; the old
    catalog and table files move to schema2-backup/. Jobs that write do this on their own.

    \b
    Example:
      featurestore --warehouse old_warehouse catalog migrate
    """
    from featurestore.migrate import migrate_warehouse

    result = migrate_warehouse(_warehouse(ctx))
    _emit(result, as_json)


@catalog_group.command("backup")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The backup file to write (must not exist).")
@click.pass_context
def catalog_backup_command(ctx, out):
    """Copy the SQLite catalog consistently, even while jobs write.

    To restore, stop the jobs and copy the backup over catalog.sqlite: the warehouse is then at
    the backup's snapshot (table files written since are orphans, which `featurestore compact`
    deletes). A PostgreSQL catalog is backed up with pg_dump.

    \b
    Example:
      featurestore catalog backup --out ~/backups/catalog-$(date +%F).sqlite
    """
    from featurestore.warehouse import Warehouse

    path = Warehouse(_warehouse(ctx)).backup_catalog(out)
    click.echo(f"backed up the catalog to {path}")


@catalog_group.command("restore")
@click.option("--from", "source", type=click.Path(dir_okay=False, exists=True),
              help="A copy made with `featurestore catalog backup` [default: the copy every "
                   "commit refreshes, catalog.sqlite.backup].")
@click.option("--force", is_flag=True,
              help="Replace a catalog that is not damaged (the snapshots after the copy go).")
@json_option
@click.pass_context
def catalog_restore_command(ctx, source, force, as_json):
    """Bring back a damaged or lost SQLite catalog from a copy.

    The warehouse comes back at the copy's snapshot; the replaced catalog is kept beside it as
    catalog.sqlite.damaged-<time>. Table files of jobs committed after the copy are unknown to
    it (`featurestore compact` deletes them): run those jobs again.

    \b
    Examples:
      featurestore catalog restore
      featurestore catalog restore --from ~/backups/catalog-2026-12-01.sqlite
    """
    from featurestore.recovery import restore_catalog

    result = restore_catalog(_warehouse(ctx), source=source, force=force)
    _emit(result, as_json)


def main() -> None:
    from featurestore import writer

    writer.COMMAND_LINE = sys.argv[1:]  # recorded in the snapshot of each job
    cli(prog_name="featurestore")


if __name__ == "__main__":  # python -m featurestore.cli, as the installed `featurestore` does
    main()
