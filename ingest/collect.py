"""`featurestore collect`: read a run's checkpoints at named stages and store activation sets.

Every requested checkpoint sees the same tokens in the same order, so the sets of one collection
are aligned row for row (and carry the same tokens fingerprint). For demo runs the default token
set is drawn from the per-sub-task splits, which do not depend on a run's task mix: a base run
and its fine-tuned run therefore get identical tokens and can be compared directly. Runs of
Hugging Face models take their tokens from a file (--tokens-from).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featurestore.activations import (
    ActivationSetWriter,
    TokenColumns,
    check_finite,
    norm_sample,
    norm_scale,
)
from featurestore.errors import FeaturestoreError
from featurestore.registry import (
    Checkpoint,
    Run,
    activation_set_name,
    get_checkpoints,
    get_run,
    parse_steps,
)
from featurestore.warehouse import Warehouse, utc_now

DEFAULT_SPLITS = ("bigram", "modular", "induction", "reverse")
DEFAULT_TOKENS = 32_768
BATCH_SEQUENCES = 128


@dataclass
class CollectResult:
    run: str
    stages: list[str]
    steps: list[int]
    n_tokens: int
    seconds: float
    tokens_per_second: float  # model tokens read per second (checkpoints x tokens / seconds)
    sets: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def token_set(task_config: dict, splits: list[str], n_tokens: int, seed: int) -> tuple:
    """Demo-task token ids [n_sequences, n_ctx] and their TokenColumns, equal shares per split."""
    import torch

    from featurestore.tasks import SyntheticTask, TaskConfig

    task = SyntheticTask(TaskConfig.from_dict(task_config))
    unknown = [s for s in splits if s not in task.SPLITS]
    if unknown:
        raise FeaturestoreError(
            f"--splits: unknown split {', '.join(unknown)}; valid splits: {', '.join(task.SPLITS)}"
        )
    n_ctx = task.config.n_ctx
    per_split = max(1, math.ceil(n_tokens / n_ctx / len(splits)))
    tokens = torch.cat([task.sample(split, per_split, seed).tokens for split in splits])
    split_names = np.repeat(np.array(splits, dtype=object), per_split)
    return tokens, _columns(tokens, split_names)


def token_file(path: str, n_tokens: int | None) -> tuple:
    """Token ids from a datasets folder or Parquet file with an `input_ids` column.

    Sequences must all have the same length; the first ceil(n_tokens / length) are used (all of
    them for n_tokens None). An optional `split` column names each sequence's split.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    source = Path(path)
    if source.is_file() and source.suffix == ".parquet":
        table = pq.read_table(source)
    elif source.is_dir():
        import datasets

        table = datasets.load_from_disk(str(source)).data.table
    else:
        raise FeaturestoreError(
            f"--tokens-from {path}: expected a .parquet file or a datasets save_to_disk folder"
        )
    if "input_ids" not in table.column_names:
        raise FeaturestoreError(f"--tokens-from {path}: no input_ids column")
    ids = table.column("input_ids").combine_chunks()
    lengths = set(pa.compute.list_value_length(ids).to_pylist())
    if len(lengths) != 1:
        raise FeaturestoreError(
            f"--tokens-from {path}: input_ids have lengths {sorted(lengths)[:5]}; every sequence "
            "must have the same length (pack or truncate them first)"
        )
    (length,) = lengths
    wanted = len(ids) if n_tokens is None else math.ceil(n_tokens / length)
    if wanted > len(ids):
        raise FeaturestoreError(
            f"--tokens {n_tokens} needs {wanted} sequences of {length} tokens but {path} has "
            f"{len(ids)}; lower --tokens to at most {len(ids) * length}"
        )
    tokens = torch.from_numpy(  # a writable copy: Arrow's buffers are read-only
        np.array(ids.flatten().to_numpy(), dtype=np.int64).reshape(-1, length)[:wanted])
    splits = (np.asarray(table.column("split").to_pylist()[:wanted], dtype=object)
              if "split" in table.column_names else np.full(wanted, "tokens", dtype=object))
    return tokens, _columns(tokens, splits)


def _columns(tokens, sequence_splits: np.ndarray) -> TokenColumns:
    n_seq, n_ctx = tokens.shape
    return TokenColumns(
        sequence_id=np.repeat(np.arange(n_seq, dtype=np.int64), n_ctx),
        position=np.tile(np.arange(n_ctx, dtype=np.int32), n_seq),
        token_id=tokens.reshape(-1).numpy().astype(np.int64),
        split=np.repeat(sequence_splits, n_ctx),
    )


def open_reader(run: Run, checkpoint: Checkpoint):
    """A StageReader on one checkpoint of a run that has a model."""
    from featurestore.stages import demo_reader, hf_reader

    if run.kind == "hf":
        return hf_reader(checkpoint.path)
    if run.model_family == "demo":
        from featurestore.checkpoints import load_checkpoint

        return demo_reader(load_checkpoint(checkpoint.path))
    raise FeaturestoreError(
        f"run {run.run!r} is an {run.kind} run with no model: its activations were registered, "
        "so there is nothing to run. Collect from a trained run or a registered model."
    )


def collect(
    run: str,
    stages: list[str] | tuple[str, ...],
    checkpoints: str | list[int] | None = "all",
    tokens: int = DEFAULT_TOKENS,
    splits: list[str] | tuple[str, ...] = DEFAULT_SPLITS,
    seed: int = 0,
    tokens_from: str | None = None,
    include_first_position: bool = False,
    warehouse: str | None = None,
    progress: bool = True,
) -> CollectResult:
    """Collect activation sets for `run` at `stages` on its checkpoints (all, or listed steps)."""
    from tqdm import tqdm

    if not stages:
        raise FeaturestoreError("--stage: give at least one stage, e.g. --stage layer_2_post_mlp")
    if len(set(stages)) != len(stages):
        raise FeaturestoreError(f"--stage: stages repeat in {list(stages)}")
    if tokens < 1:
        raise FeaturestoreError(f"--tokens must be positive, got {tokens}")
    wh = Warehouse(warehouse)
    steps = checkpoints if isinstance(checkpoints, list) else parse_steps(checkpoints)
    with wh.writer(f"collect {run}") as writer:
        con = wh.connect()
        try:
            run_info = get_run(con, run)
            chosen = get_checkpoints(wh, con, run, steps)
        finally:
            con.close()

        # Everything that can be wrong with the input is checked before the first long step.
        first_reader = open_reader(run_info, chosen[0])
        for stage in stages:
            first_reader.site(stage)
        if tokens_from is not None:
            token_ids, columns = token_file(tokens_from, tokens)
            source = f"file {Path(tokens_from).resolve()} sequences={token_ids.shape[0]}"
        elif run_info.model_family == "demo":
            token_ids, columns = token_set(run_info.task_config, list(splits), tokens, seed)
            source = (f"demo task splits={','.join(splits)} sequences={token_ids.shape[0]} "
                      f"seed={seed}")
        else:
            raise FeaturestoreError(
                f"run {run!r} is a Hugging Face model: pass --tokens-from PATH (a .parquet file "
                "or datasets folder with an input_ids column of equal-length token lists)"
            )
        vocab = first_reader.vocab_size
        if int(token_ids.max()) >= vocab or int(token_ids.min()) < 0:
            raise FeaturestoreError(
                f"token ids range over {int(token_ids.min())}..{int(token_ids.max())} but the "
                f"model of {run!r} has a vocabulary of {vocab}; use tokens of that model"
            )
        n_tokens = len(columns)
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
                relative = stage_folder(run, stage, checkpoint.step)
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
    for start in range(0, n_seq, BATCH_SEQUENCES):
        batch = token_ids[start:start + BATCH_SEQUENCES]
        rows = slice(start * n_ctx, (start + batch.shape[0]) * n_ctx)
        yield rows, {stage: value.reshape(-1, value.shape[-1]).float().numpy()
                     for stage, value in reader.read(batch, stages).items()}


def read_stages(reader, token_ids, stages: list[str]) -> dict[str, np.ndarray]:
    """Every stage for every token, as float32 arrays [n_tokens, width], held in memory."""
    batches = list(stage_batches(reader, token_ids, stages))
    return {stage: np.concatenate([values[stage] for _, values in batches]) for stage in stages}


def run_stage_names(run: str, warehouse: str | None = None) -> list[str]:
    """The stage names of a run's model, in forward-pass order."""
    wh = Warehouse(warehouse)
    con = wh.connect()
    try:
        run_info = get_run(con, run)
        (last,) = get_checkpoints(wh, con, run, [-1])
    finally:
        con.close()
    return open_reader(run_info, last).stage_names
