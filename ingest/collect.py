"""`featurestore collect`: read a run's checkpoints at named stages and store activation sets.

Every requested checkpoint sees the same tokens in the same order, so the sets of one collection
are aligned row for row (and carry the same tokens fingerprint). For demo runs the default token
set is drawn from the per-sub-task splits, which do not depend on a run's task mix: a base run
and its fine-tuned run therefore get identical tokens and can be compared directly. Other runs
take their tokens from a file (--tokens-from): text, tokenized with the run's tokenizer, or token
ids (featurestore.corpus). A run's token_strings are written by its first collection.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from featurestore import ranges, run_inputs
from featurestore.activations import (
    ActivationSetWriter,
    TokenColumns,
    check_finite,
    norm_sample,
    norm_scale,
)
from featurestore.corpus import CorpusOptions, model_context, read_token_file
from featurestore.errors import FeaturestoreError
from featurestore.registry import (
    activation_set_name,
    get_checkpoints,
    get_run,
    parse_steps,
)
from featurestore.resources import FLOAT_BYTES, TOKEN_BYTES, require_disk, require_memory
from featurestore.results import Result
from featurestore.run_inputs import open_reader, token_set
from featurestore.token_text import TokenizerSearch, has_token_strings, token_string_rows
from featurestore.warehouse import Warehouse
from featurestore.writer import utc_now

DEFAULT_TOKENS = 32_768


@dataclass
class CollectResult(Result):
    run: str
    stages: list[str]
    steps: list[int]
    n_tokens: int
    seconds: float
    tokens_per_second: float  # model tokens read per second (checkpoints x tokens / seconds)
    sets: list[dict] = field(default_factory=list)
    token_strings: int = 0  # token_strings rows written (0: the run had them, or no tokenizer)
    notes: list[str] = field(default_factory=list)  # e.g. a token file smaller than the default

    def summary(self) -> str:
        return (f"collected {len(self.sets)} activation sets for {self.run!r}: "
                f"{len(self.steps)} checkpoints x {len(self.stages)} stages x "
                f"{self.n_tokens} tokens in {self.seconds:.1f}s "
                f"({self.tokens_per_second:,.0f} tokens/s)")


def collect(
    run: str,
    stages: list[str] | tuple[str, ...],
    checkpoints: str | list[int] | None = "all",
    tokens: int | None = None,
    splits: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
    tokens_from: str | None = None,
    text_column: str = "text",
    tokenizer: str | None = None,
    seq_len: int | None = None,
    include_first_position: bool = False,
    warehouse: str | None = None,
    progress: bool = True,
) -> CollectResult:
    """Collect activation sets for `run` at `stages` on its checkpoints (all, or listed steps).

    Tokens: the run's task's `splits` (default: the task's own) for runs trained here, or the file
    `tokens_from` (text or token ids, featurestore.corpus; `splits` default: all of the file's).
    `tokens` defaults to DEFAULT_TOKENS, or the whole file when it holds fewer (with a note).
    """
    from tqdm import tqdm

    if not stages:
        raise FeaturestoreError("--stage: give at least one stage, e.g. --stage layer_2_post_mlp")
    if len(set(stages)) != len(stages):
        raise FeaturestoreError(f"--stage: stages repeat in {list(stages)}")
    if tokens is not None:
        ranges.COUNT.check(tokens, "--tokens")
        require_memory("--tokens", tokens, tokens * TOKEN_BYTES,
                       "holding the token ids and their columns")
    ranges.SEED.check(seed, "--seed")
    if tokens_from is None:
        file_only = [flag for flag, given in (("--text-column", text_column != "text"),
                                              ("--tokenizer", tokenizer is not None),
                                              ("--seq-len", seq_len is not None)) if given]
        if file_only:
            raise FeaturestoreError(f"{', '.join(file_only)} applies to a token file: give "
                                    "--tokens-from PATH, or leave it out for the demo task")
    notes: list[str] = []
    wh = Warehouse(warehouse)
    steps = checkpoints if isinstance(checkpoints, list) else parse_steps(checkpoints)
    with wh.writer(f"collect {run}") as writer:
        with wh.connect() as con:
            run_info = get_run(con, run)
            chosen = get_checkpoints(wh, con, run, steps)
            strings_written = has_token_strings(con, run)

        # Everything that can be wrong with the input is checked before the first long step.
        first_reader = open_reader(run_info, chosen[0])
        for stage in stages:
            first_reader.site(stage)
        search = TokenizerSearch(tokenizer, run_info.tokenizer, chosen[0].path)
        if tokens_from is not None:
            options = CorpusOptions(text_column, seq_len,
                                    None if splits is None else tuple(splits))
            token_file = read_token_file(tokens_from, options, seed, tokens, DEFAULT_TOKENS,
                                         search, model_context(first_reader.module))
            token_ids, columns = token_file.tokens, token_file.columns()
            source = token_file.source
            notes += token_file.notes
        elif run_info.task_config is not None:
            token_ids, columns = token_set(run_info.task_config, splits,
                                           tokens or DEFAULT_TOKENS, seed)
            used = ",".join(dict.fromkeys(columns.split.tolist()))
            source = (f"{run_info.task_config.get('task', 'demo')} task splits={used} "
                      f"sequences={token_ids.shape[0]} seed={seed}")
        else:
            raise FeaturestoreError(
                f"run {run!r} is a registered model with no task: pass --tokens-from PATH (text "
                "as .txt, .jsonl, .parquet or a datasets folder, or token ids in an input_ids "
                "column)"
            )
        vocab = first_reader.vocab_size
        if int(token_ids.max()) >= vocab or int(token_ids.min()) < 0:
            raise FeaturestoreError(
                f"token ids range over {int(token_ids.min())}..{int(token_ids.max())} but the "
                f"model of {run!r} has a vocabulary of {vocab}; use tokens of that model"
            )
        # The run's token strings, once: from its first collection on, token ids read as text.
        string_rows = None if strings_written else token_string_rows(run_info, search)
        if string_rows is not None:
            writer.put("token_strings", string_rows)
        elif not strings_written:
            notes.append(f"no tokenizer found for run {run!r}, so no token_strings were written "
                         "and examples will show token ids; pass --tokenizer DIR to add them")
        n_tokens = len(columns)
        # Each set takes at least n_tokens x d_model floats (an mlp_hidden stage, more).
        if run_info.d_model is not None:
            require_disk("--tokens", n_tokens, n_tokens * run_info.d_model * FLOAT_BYTES
                         * len(stages) * len(chosen), wh.root,
                         f"{len(chosen) * len(stages)} activation set(s) of d_model "
                         f"{run_info.d_model}")
        fingerprint = columns.fingerprint()
        sample = norm_sample(columns.position, exclude_first=not include_first_position)

        bar = tqdm(total=len(chosen) * n_tokens, unit="tok", unit_scale=True,
                   desc=f"collect {run}", file=sys.stderr,
                   disable=None if progress else True)  # None: only on a terminal
        started = time.perf_counter()
        result_sets = []
        for checkpoint in chosen:
            reader = first_reader if checkpoint is chosen[0] else open_reader(run_info, checkpoint)
            for stage, (width, scale) in write_stages(
                    writer, run, checkpoint.step, reader, token_ids, columns, list(stages),
                    sample, bar.update).items():
                relative = writer.versioned(stage_folder(run, stage, checkpoint.step))
                row = {
                    "name": activation_set_name(run, checkpoint.step, stage), "run": run,
                    "step": checkpoint.step, "stage": stage, "path": relative,
                    "format": "hf_dataset", "source": "collected", "n_tokens": n_tokens,
                    "d_model": width, "norm_scale": scale,
                    "norm_excludes_first": not include_first_position,
                    "tokens_fingerprint": fingerprint, "token_source": source,
                    "created_at": utc_now(),
                }
                writer.put("activation_sets", [row])
                result_sets.append({k: row[k] for k in ("name", "path", "d_model", "norm_scale")})
        bar.close()
        seconds = time.perf_counter() - started
    return CollectResult(
        run=run, stages=list(stages), steps=[c.step for c in chosen], n_tokens=n_tokens,
        seconds=seconds, tokens_per_second=len(chosen) * n_tokens / seconds, sets=result_sets,
        token_strings=len(string_rows or []), notes=notes,
    )


def stage_folder(run: str, stage: str, step: int) -> str:
    """Where collect stores a set, relative to the warehouse root."""
    return f"activations/{run}/{stage}/step_{step:09d}"


def write_stages(writer, run: str, step: int, reader, token_ids, columns: TokenColumns,
                 stages: list[str], sample: np.ndarray,
                 on_batch=lambda n: None) -> dict[str, tuple[int, float]]:
    """Read every stage of one checkpoint batch by batch and write each batch straight into its
    activation set, so memory is bounded by the batch, not the token count. Returns each stage's
    (width, norm scale), the scale estimated on the `sample` rows."""
    from contextlib import ExitStack

    outputs: dict[str, ActivationSetWriter] = {}
    samples: dict[str, list[np.ndarray]] = {stage: [] for stage in stages}
    with ExitStack() as stack:
        for rows, values in stage_batches(reader, token_ids, stages):
            in_batch = sample[(sample >= rows.start) & (sample < rows.stop)] - rows.start
            for stage, value in values.items():
                check_finite(value, f"activation set {activation_set_name(run, step, stage)}",
                             first_row=rows.start)
                if stage not in outputs:  # widths differ by stage (d_model, or d_mlp)
                    directory = writer.stage_dir(stage_folder(run, stage, step))
                    outputs[stage] = stack.enter_context(
                        ActivationSetWriter(directory, value.shape[1]))
                outputs[stage].write(value, columns[rows])
                samples[stage].append(value[in_batch])
            on_batch(rows.stop - rows.start)
    return {stage: (outputs[stage].d_model, norm_scale(np.concatenate(samples[stage])))
            for stage in stages}


def stage_batches(reader, token_ids, stages: list[str]):
    """(rows, {stage: float32 array [rows, width]}) for every batch of sequences, in order."""
    n_seq, n_ctx = token_ids.shape
    per_batch = run_inputs.batch_sequences(n_ctx)
    for start in range(0, n_seq, per_batch):
        batch = token_ids[start:start + per_batch]
        rows = slice(start * n_ctx, (start + batch.shape[0]) * n_ctx)
        yield rows, {stage: value.reshape(-1, value.shape[-1]).float().numpy()
                     for stage, value in reader.read(batch, stages).items()}
        # A trace's objects hold each other in reference cycles that keep the batch's tensors
        # alive until the cyclic collector happens to run: several batches piled up otherwise.
        gc.collect()


def read_stages(reader, token_ids, stages: list[str]) -> dict[str, np.ndarray]:
    """Every stage for every token, as float32 arrays [n_tokens, width], held in memory."""
    batches = list(stage_batches(reader, token_ids, stages))
    return {stage: np.concatenate([values[stage] for _, values in batches]) for stage in stages}


def run_stage_names(run: str, warehouse: str | None = None) -> list[str]:
    """The stage names of a run's model, in forward-pass order."""
    wh = Warehouse(warehouse)
    with wh.connect() as con:
        run_info = get_run(con, run)
        (last,) = get_checkpoints(wh, con, run, [-1])
    return open_reader(run_info, last).stage_names
