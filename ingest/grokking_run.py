"""Train a modular-addition run (the grokking setup) and register it with its progress measures.

Like train-model, the run owns warehouse/runs/<run>/ and its rows in `runs` and `checkpoints`;
it also owns its `progress_measures` rows. Re-running replaces all of it (and drops the run's
activation sets and the bases fitted on them), in one commit.

Checkpoints are log-spaced at the start (0, 1, 2, 4, ...) and then every `dense_every` steps,
so the late jump in test accuracy is seen densely wherever it falls. The key frequencies are
those of the last checkpoint's embedding, so the restricted and excluded loss of every
checkpoint are computed once training is over, from the answer logits kept at each checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

from featurestore import ranges
from featurestore.errors import FeaturestoreError
from featurestore.grokking import DENSE_EVERY, GrokkingConfig
from featurestore.results import Result
from featurestore.schema import package_version
from featurestore.settings import check_name
from featurestore.warehouse import Warehouse, drop_run_outputs
from featurestore.writer import utc_now


@dataclass
class GrokkingRunResult(Result):
    run: str
    steps: int
    checkpoint_steps: list[int]
    key_frequencies: list[int]
    final: dict[str, float]  # the last checkpoint's progress measures
    seconds: float


def train_grokking_run(run: str, config: GrokkingConfig | None = None,
                       dense_every: int = DENSE_EVERY, warehouse: str | None = None,
                       progress: bool = True) -> GrokkingRunResult:
    """Train the one-layer model on a + b mod p (full batch, AdamW, weight decay; `config`
    default GrokkingConfig()) and register its checkpoints and their progress measures."""
    from tqdm import tqdm

    from featurestore.checkpoints import save_checkpoint
    from featurestore.grokking import (
        checkpoint_plan,
        frequency_shares,
        key_frequencies,
        progress_measures,
        read_out,
        train_grokking,
    )

    check_name(run, "run name")
    config = config or GrokkingConfig()
    ranges.COUNT.check(config.steps, "--steps")
    ranges.COUNT.check(dense_every, "--dense-every")
    try:
        task = config.task()
    except ValueError as error:
        raise FeaturestoreError(f"--p / --train-fraction: {error}") from None
    plan = checkpoint_plan(config.steps, dense_every)
    started = time.perf_counter()
    wh = Warehouse(warehouse)
    with wh.writer(f"experiment grokking {run}") as writer:
        run_dir = writer.stage_dir(f"runs/{run}")
        readouts = []
        checkpoint_paths = {}
        bar = tqdm(total=config.steps, unit="step", desc=f"train {run}", file=sys.stderr,
                   disable=None if progress else True)

        def on_checkpoint(step, model):
            directory = run_dir / "checkpoints" / f"step_{step:09d}"
            directory.mkdir(parents=True)
            save_checkpoint(model, directory, {"run": run, "step": step,
                                               "task": task.to_dict()})
            checkpoint_paths[step] = (f"{writer.versioned(f'runs/{run}')}/checkpoints/"
                                      f"step_{step:09d}")
            readouts.append(read_out(model, task, step))
            bar.update(step - bar.n)

        model = train_grokking(config, plan, on_checkpoint)
        bar.close()

        keys = key_frequencies(frequency_shares(readouts[-1].embedding))
        measures = [progress_measures(readout, task, keys) for readout in readouts]
        n_train = int(task.train_mask().sum())
        created_at = utc_now()
        writer.put("checkpoints", [{
            "run": run, "step": m.step, "tokens_seen": m.step * n_train * task.n_ctx,
            "path": checkpoint_paths[m.step],
            "train_loss": m.train_loss, "train_accuracy": m.train_accuracy,
            "heldout_loss": m.test_loss, "heldout_accuracy": m.test_accuracy,
            "split_metrics": [{"split": "train", "loss": m.train_loss,
                               "accuracy": m.train_accuracy},
                              {"split": "test", "loss": m.test_loss,
                               "accuracy": m.test_accuracy}],
            "eval_tokens": f"every problem of {task.p}^2 (train: {n_train} pairs)",
            "created_at": created_at,
        } for m in measures], replace_where={"run": run})
        writer.put("progress_measures", [
            {"run": run, **asdict(m), "key_frequencies": keys} for m in measures
        ], replace_where={"run": run})
        train_config = {k: v for k, v in asdict(config).items() if k not in ("p", "train_fraction")}
        (run_dir / "run.json").write_text(json.dumps({
            "run": run, "kind": "pretrain", "model": model.config.to_dict(),
            "task": task.to_dict(), "train": {**train_config, "dense_every": dense_every},
        }, indent=2))
        writer.put("runs", [{
            "run": run, "kind": "pretrain", "model_family": "demo", "parent_run": None,
            "parent_step": None, "seed": config.seed, "steps": config.steps,
            "d_model": model.config.d_model, "n_layers": model.config.n_layers,
            "model_config": json.dumps(model.config.to_dict()),
            "task_config": json.dumps(task.to_dict()),
            "train_config": json.dumps({**train_config, "dense_every": dense_every}),
            "tokenizer": None, "featurestore_version": package_version(),
            "created_at": created_at,
        }])
        drop_run_outputs(wh, writer, run)
    last = measures[-1]
    return GrokkingRunResult(
        run=run, steps=config.steps, checkpoint_steps=[m.step for m in measures],
        key_frequencies=keys,
        final={k: v for k, v in asdict(last).items() if k not in ("step", "frequency_shares")},
        seconds=time.perf_counter() - started)
