"""A plain torch training loop: AdamW, warm-up then cosine decay, evaluation at checkpoints.

No files, no warehouse: `train` hands the model and its metrics to a callback at each
checkpoint step, and whoever called it decides what to store. With the same config, task and
initial weights, two runs on CPU end with bitwise identical weights (there is no dropout, and
the data stream is a pure function of the seed).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from featurestore import ranges
from featurestore.errors import FeaturestoreError
from featurestore.model import Transformer, config_from_dict
from featurestore.tasks import SyntheticTask

# Every run is evaluated on the same sequences, whatever its training seed, so that metrics
# from different runs are directly comparable.
EVAL_SEED = 0


# The defaults were tuned on 2 CPU cores (torch.set_num_threads(2)) with the default model and
# task: a run takes under a minute, bigram is learned within ~70 steps, modular addition mostly
# between steps ~300 and ~1000, and induction finishes last. Small batches and a high learning
# rate give the most optimizer steps per second, and steps are what get a small model off the
# plateaus that precede modular addition and induction.
@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1800
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    seed: int = 0  # seeds the training data stream (initial weights are the caller's business)
    eval_sequences: int = 256  # per split, at every checkpoint
    n_checkpoints: int = 16

    def __post_init__(self) -> None:
        # Checked here so that a notebook caller is refused as the CLI is; the messages name
        # the flags (--steps, --seed) or the field.
        ranges.COUNT.check(self.steps, "--steps")
        ranges.SEED.check(self.seed, "--seed")
        ranges.COUNT.check(self.batch_size, "TrainConfig.batch_size")
        ranges.POSITIVE.check(self.lr, "TrainConfig.lr")
        ranges.NON_NEGATIVE_COUNT.check(self.warmup_steps, "TrainConfig.warmup_steps")
        ranges.NON_NEGATIVE.check(self.weight_decay, "TrainConfig.weight_decay")
        ranges.COUNT.check(self.eval_sequences, "TrainConfig.eval_sequences")
        ranges.Range(2, ranges.MAX_INT64, integer=True).check(self.n_checkpoints,
                                                              "TrainConfig.n_checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, data)


# Fine-tuning is a short run with its own warm-up to the same peak learning rate. With
# FINETUNE_MIX it takes `reverse` from near zero to roughly 0.45-0.65 accuracy (depending on the
# seed); modular and induction dip sharply in the first few dozen steps, then recover.
FINETUNE_TRAIN_CONFIG = TrainConfig(steps=500, warmup_steps=50)


@dataclass
class SplitMetrics:
    loss: float  # mean next-token cross-entropy over every position that has a next token
    accuracy: float  # argmax next-token accuracy over the task's scored positions only


def checkpoint_steps(total_steps: int, n: int) -> list[int]:
    """Up to n steps from 0 to total_steps, spaced evenly in log(step): dense early, sparse late.

    Features change fastest at the start of training, so that is where checkpoints go. Always
    includes 0 (before any update) and total_steps; gives exactly min(n, total_steps + 1) steps.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if n < 2:
        raise ValueError(f"need n >= 2 checkpoints (first and last), got {n}")
    count = min(n, total_steps + 1)
    # count - 1 targets from 1 to total_steps, geometrically spaced; step 0 goes in front.
    targets = np.geomspace(1, total_steps, num=count - 1) if count > 2 else [total_steps]
    steps = [0]
    for i, target in enumerate(targets):
        remaining_after = len(targets) - 1 - i
        # Round to a whole step but stay strictly increasing (early targets are closer together
        # than one step) and leave room for the steps still to come.
        step = max(round(float(target)), steps[-1] + 1)
        steps.append(min(step, total_steps - remaining_after))
    return steps


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting tokens[:, i + 1] from logits[:, i]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def evaluate(
    model: Transformer,
    task: SyntheticTask,
    splits: Sequence[str],
    n_sequences: int,
    seed: int,
) -> dict[str, SplitMetrics]:
    was_training = model.training
    model.eval()
    metrics: dict[str, SplitMetrics] = {}
    for split in splits:
        batch = task.sample(split, n_sequences, seed)
        logits = model(batch.tokens)
        predicted = logits[:, :-1].argmax(dim=-1)
        scored = batch.scored[:, :-1]
        correct = (predicted == batch.tokens[:, 1:]) & scored
        metrics[split] = SplitMetrics(
            loss=next_token_loss(logits, batch.tokens).item(),
            accuracy=correct.sum().item() / max(scored.sum().item(), 1),
        )
    model.train(was_training)
    return metrics


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to config.lr, then cosine decay to a tenth of it at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    min_lr = 0.1 * config.lr
    return min_lr + 0.5 * (config.lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: Transformer, config: TrainConfig) -> torch.optim.AdamW:
    # Decay only the matrices (linear weights and embeddings); decaying biases and LayerNorm
    # gains just pulls them away from their natural values of 0 and 1.
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": matrices, "weight_decay": config.weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]
    # beta2 = 0.98 rather than 0.999 lets the step size adapt faster, which suits short runs.
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))


def train(
    model: Transformer,
    task: SyntheticTask,
    config: TrainConfig,
    on_checkpoint: Callable[[int, Transformer, dict[str, SplitMetrics]], None],
    start_step: int = 0,
    progress: bool = False,
) -> None:
    """Train `model` in place for config.steps updates on the task's "train" split.

    At each step in checkpoint_steps(config.steps, config.n_checkpoints) -- step 0 being the
    untouched incoming model -- calls on_checkpoint(start_step + step, model, metrics) with
    metrics for every split of the task.

    Fine-tuning uses the same function: pass a model loaded from a checkpoint, a task with the
    fine-tune mix, FINETUNE_TRAIN_CONFIG, and start_step = the step the model was saved at,
    so steps keep counting from there (the first callback then repeats the incoming model's
    metrics, now on the fine-tuning task). The optimizer and learning-rate schedule start fresh.
    """
    checkpoints = set(checkpoint_steps(config.steps, config.n_checkpoints))
    optimizer = make_optimizer(model, config)
    batches = task.batches("train", config.batch_size, seed=config.seed)
    model.train()

    bar = tqdm(
        # disable=None shows the bar only on a terminal, so logs and CI output stay readable.
        total=config.steps, disable=None if progress else True, desc="training", unit="step",
        file=sys.stderr
    )
    for step in range(config.steps + 1):
        if step in checkpoints:
            metrics = evaluate(model, task, task.SPLITS, config.eval_sequences, EVAL_SEED)
            on_checkpoint(start_step + step, model, metrics)
        if step == config.steps:
            break  # the last checkpoint is after the last update

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        tokens = next(batches).tokens
        loss = next_token_loss(model(tokens), tokens)
        if not torch.isfinite(loss):  # every later step and checkpoint would be NaN too
            raise FeaturestoreError(
                f"training diverged at step {start_step + step}: the loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
