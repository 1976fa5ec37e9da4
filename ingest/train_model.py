"""`featurestore train-model` and `featurestore finetune`: train the demo model, save checkpoints.

A run owns everything under warehouse/runs/<run>/ and its rows in `runs` and `checkpoints`.
Re-running a job for the same run replaces all of it (and drops the run's activation sets, which
described the old weights), in one commit.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from featurestore import ranges
from featurestore.errors import FeaturestoreError
from featurestore.registry import get_checkpoints, get_run
from featurestore.resources import FLOAT_BYTES, require_memory
from featurestore.results import Result
from featurestore.schema import package_version
from featurestore.settings import check_name
from featurestore.warehouse import Warehouse, drop_run_outputs
from featurestore.writer import utc_now

# Keep in step with featurestore.training.FINETUNE_TRAIN_CONFIG (importing it here would import
# torch whenever the CLI starts).
DEFAULT_FINETUNE_STEPS = 500


@dataclass
class TrainResult(Result):
    run: str
    kind: str
    steps: int
    checkpoint_steps: list[int]
    final_metrics: dict[str, dict[str, float]]  # split -> {loss, accuracy}
    seconds: float

    def summary(self) -> str:
        lines = [f"{self.kind} run {self.run!r}: {self.steps} steps, "
                 f"{len(self.checkpoint_steps)} checkpoints in {self.seconds:.1f}s"]
        lines += [f"  {split:<10} loss {metrics['loss']:.3f}  accuracy {metrics['accuracy']:.3f}"
                  for split, metrics in self.final_metrics.items()]
        return "\n".join(lines)


def train_model(run: str, steps: int | None = None, seed: int = 0, d_model: int | None = None,
                warehouse: str | None = None, progress: bool = True) -> TrainResult:
    """Train the demo transformer from scratch on the built-in task and register its checkpoints."""
    import torch

    from featurestore.model import ModelConfig, Transformer
    from featurestore.tasks import TaskConfig
    from featurestore.training import TrainConfig

    check_name(run, "run name")
    task_config = TaskConfig()
    train_config = TrainConfig(seed=seed, **({"steps": steps} if steps is not None else {}))
    if d_model is not None:
        ranges.Range(8, ranges.MAX_INT64, integer=True).check(d_model, "--d-model")
    try:
        model_config = ModelConfig(
            vocab_size=task_config.vocab_size,
            n_ctx=task_config.n_ctx,
            **({"d_model": d_model} if d_model is not None else {}),
        )
    except ValueError as error:
        raise FeaturestoreError(f"--d-model {d_model}: {error}") from None
    _require_training_memory(model_config)
    torch.manual_seed(seed)
    model = Transformer(model_config)
    return _train_and_register(Warehouse(warehouse), run, "pretrain", model, task_config,
                               train_config, parent=None, progress=progress)


def finetune(run: str, from_checkpoint: str, steps: int = DEFAULT_FINETUNE_STEPS, seed: int = 0,
             warehouse: str | None = None, progress: bool = True) -> TrainResult:
    """Continue a run's checkpoint (RUN or RUN@STEP, default the last) on the shifted task mix."""
    from featurestore.checkpoints import check_finite_weights, load_checkpoint
    from featurestore.tasks import FINETUNE_MIX, TaskConfig
    from featurestore.training import FINETUNE_TRAIN_CONFIG

    check_name(run, "run name")
    parent_run, _, step_text = from_checkpoint.partition("@")
    if step_text and not (step_text.isdigit() or step_text.upper() == "LAST"):
        raise FeaturestoreError(
            f"--from {from_checkpoint!r}: expected RUN or RUN@STEP (STEP a number or LAST)"
        )
    if parent_run == run:
        raise FeaturestoreError(f"--run {run!r}: a fine-tune needs a new run name, not its parent")
    # The fine-tune schedule: a short warm-up, so the new sub-task is learned within the budget.
    train_config = dataclasses.replace(FINETUNE_TRAIN_CONFIG, steps=steps, seed=seed)
    wh = Warehouse(warehouse)
    with wh.connect() as con:
        parent = get_run(con, parent_run)
        step = int(step_text) if step_text.isdigit() else -1
        (checkpoint,) = get_checkpoints(wh, con, parent_run, [step])
    if parent.model_family != "demo" or "task" in (parent.task_config or {}):
        raise FeaturestoreError(f"--from {parent_run!r}: only runs trained on the demo task "
                                "(featurestore train-model) can be fine-tuned")
    model = load_checkpoint(checkpoint.path)
    check_finite_weights(model, checkpoint.path)
    task_config = TaskConfig.from_dict({**parent.task_config, "mix": dict(FINETUNE_MIX)})
    return _train_and_register(wh, run, "finetune", model, task_config, train_config,
                               parent=(parent_run, checkpoint.step), progress=progress)


def _require_training_memory(config) -> None:
    """Refuse a model too wide for this machine before building it: training holds its
    weights, their gradients and AdamW's two moments, in float32."""
    import torch

    from featurestore.model import Transformer

    with torch.device("meta"):  # counts the parameters without allocating them
        parameters = sum(p.numel() for p in Transformer(config).parameters())
    require_memory("--d-model", config.d_model, parameters * 4 * FLOAT_BYTES,
                   f"training a model of {parameters:,} parameters (weights, gradients and "
                   "AdamW state)")


def _train_and_register(wh: Warehouse, run: str, kind: str, model, task_config, train_config,
                        parent: tuple[str, int] | None, progress: bool) -> TrainResult:
    from featurestore.checkpoints import save_checkpoint
    from featurestore.tasks import SyntheticTask
    from featurestore.training import train

    task = SyntheticTask(task_config)
    tokens_per_step = train_config.batch_size * task_config.n_ctx
    checkpoint_rows: list[dict] = []
    started = time.perf_counter()
    with wh.writer(f"{'train-model' if kind == 'pretrain' else 'finetune'} {run}") as writer:
        run_dir = writer.stage_dir(f"runs/{run}")

        def on_checkpoint(step, model, metrics):
            relative = f"{writer.versioned(f'runs/{run}')}/checkpoints/step_{step:09d}"
            directory = run_dir / "checkpoints" / f"step_{step:09d}"
            directory.mkdir(parents=True)
            save_checkpoint(model, directory, {
                "run": run, "step": step, "task": task_config.to_dict(),
            })
            checkpoint_rows.append({
                "run": run, "step": step, "tokens_seen": step * tokens_per_step, "path": relative,
                "train_loss": metrics["train"].loss, "train_accuracy": metrics["train"].accuracy,
                "heldout_loss": metrics["heldout"].loss,
                "heldout_accuracy": metrics["heldout"].accuracy,
                "split_metrics": [{"split": s, "loss": m.loss, "accuracy": m.accuracy}
                                  for s, m in metrics.items()],
                "created_at": utc_now(),
            })

        train(model, task, train_config, on_checkpoint, progress=progress)
        (run_dir / "run.json").write_text(json.dumps({
            "run": run, "kind": kind, "model": model.config.to_dict(),
            "task": task_config.to_dict(), "train": train_config.to_dict(),
        }, indent=2))
        writer.put("runs", [{
            "run": run, "kind": kind, "model_family": "demo",
            "parent_run": parent[0] if parent else None,
            "parent_step": parent[1] if parent else None,
            "seed": train_config.seed, "steps": train_config.steps,
            "d_model": model.config.d_model, "n_layers": model.config.n_layers,
            "model_config": json.dumps(model.config.to_dict()),
            "task_config": json.dumps(task_config.to_dict()),
            "train_config": json.dumps(train_config.to_dict()),
            "featurestore_version": package_version(), "created_at": utc_now(),
        }])
        writer.put("checkpoints", checkpoint_rows, replace_where={"run": run})
        drop_run_outputs(wh, writer, run)
    last = checkpoint_rows[-1]
    return TrainResult(
        run=run, kind=kind, steps=train_config.steps,
        checkpoint_steps=[r["step"] for r in checkpoint_rows],
        final_metrics={m["split"]: {"loss": m["loss"], "accuracy": m["accuracy"]}
                       for m in last["split_metrics"]},
        seconds=time.perf_counter() - started,
    )
