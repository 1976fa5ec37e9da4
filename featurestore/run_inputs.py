"""What jobs feed a run's model: a stage reader on one of its checkpoints, and, for runs trained
here, its own task's token sequences. Shared by collect, the activation buffer, feature-patch,
feature-lineage and evaluate-checkpoints.
"""

from __future__ import annotations

import math

import numpy as np

from featurestore.corpus import sequence_columns
from featurestore.errors import FeaturestoreError
from featurestore.registry import Checkpoint, Run

# Tokens per traced batch when reading stages (128 sequences of the demo task's 16 tokens):
# short sequences go more to a batch, since each trace costs about the same whatever its size.
BATCH_TOKENS = 2048


def batch_sequences(n_ctx: int) -> int:
    """Sequences of `n_ctx` tokens per traced batch: BATCH_TOKENS of them, at least one."""
    return max(1, BATCH_TOKENS // n_ctx)


def token_set(task_config: dict, splits: list[str] | None, n_tokens: int, seed: int) -> tuple:
    """A trained run's task tokens [n_sequences, n_ctx] and their TokenColumns: equal shares of
    `splits` (default: the task's DEFAULT_SPLITS), or all of a split that holds fewer."""
    import torch

    from featurestore.tasks import task_from_config

    task = task_from_config(task_config)
    splits = list(task.DEFAULT_SPLITS if splits is None else splits)
    unknown = [s for s in splits if s not in task.SPLITS]
    if unknown:
        raise FeaturestoreError(
            f"--splits: unknown split {', '.join(unknown)}; valid splits: {', '.join(task.SPLITS)}"
        )
    per_split = max(1, math.ceil(n_tokens / task.n_ctx / len(splits)))
    batches = [task.sample(split, per_split, seed).tokens for split in splits]
    split_names = np.repeat(np.array(splits, dtype=object), [len(b) for b in batches])
    tokens = torch.cat(batches)
    return tokens, sequence_columns(tokens, split_names)


def open_reader(run: Run, checkpoint: Checkpoint):
    """A StageReader on one checkpoint of a run that has a model."""
    from featurestore.stages import demo_reader, hf_reader

    if run.kind == "hf":
        return hf_reader(checkpoint.path)
    if run.kind == "custom":
        from featurestore.custom_model import CustomModel

        return CustomModel.from_json(run.model_config).reader(checkpoint.path)
    if run.model_family == "demo":
        from featurestore.checkpoints import load_checkpoint

        return demo_reader(load_checkpoint(checkpoint.path))
    raise FeaturestoreError(
        f"run {run.run!r} is an {run.kind} run with no model: its activations were registered, "
        "so there is nothing to run. Collect from a trained run or a registered model."
    )
