"""Training a crosscoder: one loop for every architecture, resumable to the bit.

A training state (model, optimizer, scheduler, step, RNG, metrics so far) is saved every
`save_every` steps as safetensors plus JSON, never a pickle. The data order is a pure function of
the seed and the step (featurestore.aligned), or, for an activation buffer reading models, of the
seed and the pool's row numbers, which the state stores with the token-source position
(featurestore.activation_buffer); so `resume=True` continues exactly: a run killed and resumed
ends with the same weights as one never interrupted.

A background thread prepares the next batch while the current one trains (torch releases the
GIL in its kernels; for the buffer a refill's model forward is the big cost). It reads the same
rows in the same order as the loop would, so results do not depend on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from featurestore import ranges
from featurestore.crosscoder import CrossCoder
from featurestore.crosscoder_metrics import batch_metrics, total_loss
from featurestore.dictionary_kinds import THRESHOLD_ARCHS
from featurestore.errors import FeaturestoreError
from featurestore.model import config_from_dict
from featurestore.resources import FLOAT_BYTES, require_memory

# One file holds a whole training state: the tensors, and the rest as JSON in its header
# metadata, so a save replaces both at once (a kill leaves the old state or the new one).
STATE_FILE = "state.safetensors"
STATE_METADATA_KEY = "featurestore.state"
# The fewest optimiser steps a run may have when its length follows from its data (--tokens, or
# the length of a token stream) rather than from --steps: the learning rate warms up over
# TrainerConfig.warmup_steps (100) steps, so a shorter run never trains at its peak rate and
# its dictionary means little. Jobs refuse such a run before any model runs; a run given --steps
# explicitly (a smoke test, say) runs as asked.
MIN_STEPS = 100


def check_enough_steps(steps: int, source: str, fixes: list[str]) -> None:
    """Refuse a run of fewer than MIN_STEPS steps; `source` says what gave that many steps,
    `fixes` how to get more."""
    if steps < MIN_STEPS:
        remedies = ", ".join(fixes[:-1]) + " or " + fixes[-1] if len(fixes) > 1 else fixes[0]
        raise FeaturestoreError(
            f"{source} gives {steps} steps, fewer than the {MIN_STEPS} a run needs to train at "
            f"all (its learning rate warms up over that many steps): {remedies}")


@dataclass(frozen=True)
class TrainerConfig:
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100  # linear learning-rate warm-up
    decay_fraction: float = 0.2  # linear decay to 0 over this last share of the steps
    l1_coeff: float = 1.0  # vanilla: final sparsity coefficient
    l1_warmup_fraction: float = 0.05  # vanilla, jumprelu: the coefficient ramps up over this share
    # jumprelu: final coefficient of the L0 penalty (active latents per token). An active latent
    # must remove this much of a token's squared error to pay for itself, where the squared norm
    # of a normalised token is d_model and a typical feature's share of it about d_model / L0,
    # tens of units in most dictionaries: 1 prunes the latents that add little and keeps the
    # features. Raise it for a sparser code.
    l0_coeff: float = 1.0
    # batchtopk, topk: over this last share of the steps, train on each source's error norm
    # ||x_s - x_hat_s|| instead of its square. Under the squared error, the tokens whose code
    # missed a feature carry most of the error and tilt the decoder rows towards the features
    # they fire with; the norm weighs every token alike and finishes the directions more
    # precisely. Throughout training it would slow the discovery of rare features (the same
    # down-weighting), so the squared error finds the features first. 0: squared error only.
    norm_loss_fraction: float = 0.2
    k_anneal_from: int = 0  # batchtopk, topk, matryoshka: start at this k, anneal to k (0: off)
    k_anneal_fraction: float = 0.1
    max_grad_norm: float = 1.0
    log_every: int = 50
    save_every: int = 500
    seed: int = 0
    bias_init: str = "geometric_median"

    def __post_init__(self) -> None:
        # Checked here so that a notebook caller is refused as the CLI is; the messages name
        # the flag of each setting that has one (train-crosscoder, shared-feature-fit).
        for name in ("steps", "batch_size", "log_every", "save_every"):
            ranges.COUNT.check(getattr(self, name), _flag(name))
        for name in ("warmup_steps", "k_anneal_from"):
            ranges.NON_NEGATIVE_COUNT.check(getattr(self, name), _flag(name))
        ranges.SEED.check(self.seed, "--seed")
        ranges.POSITIVE.check(self.lr, "--lr")
        if len(self.betas) != 2:
            raise FeaturestoreError(f"--betas {self.betas}: give two numbers, e.g. 0.9 0.999")
        for beta in self.betas:
            ranges.BETA.check(beta, "--betas")
        ranges.NON_NEGATIVE.check(self.l1_coeff, "--l1-coeff")
        ranges.NON_NEGATIVE.check(self.l0_coeff, "--l0-coeff")
        ranges.FRACTION.check(self.norm_loss_fraction, "--norm-loss-fraction")
        for name in ("decay_fraction", "l1_warmup_fraction", "k_anneal_fraction"):
            ranges.FRACTION.check(getattr(self, name), f"TrainerConfig.{name}")
        ranges.POSITIVE.check(self.max_grad_norm, "TrainerConfig.max_grad_norm")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerConfig:
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return config_from_dict(cls, data)


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def require_training_memory(n_sources: int, d_model: int, d_hidden: int,
                            batch_size: int) -> None:
    """Refuse a dictionary or a batch this machine cannot hold, before either is allocated.
    The dictionary: W_enc and W_dec (n_sources x d_model x d_hidden each) with their gradients
    and Adam's two moments. A batch: per token, its inputs, reconstruction and error (n_sources x
    d_model each) and its pre-activations, latents and their gradient (d_hidden each)."""
    dictionary = 2 * n_sources * d_model * d_hidden * 4 * FLOAT_BYTES
    require_memory("--dict-size", d_hidden, dictionary,
                   f"a dictionary of {d_hidden:,} latents over {n_sources} source(s) of d_model "
                   f"{d_model} (weights, gradients and Adam state)")
    per_token = (3 * n_sources * d_model + 3 * d_hidden) * FLOAT_BYTES
    require_memory("--batch-size", batch_size, dictionary + batch_size * per_token,
                   f"a training batch of {batch_size:,} tokens ({per_token:,} bytes each) beside "
                   "the dictionary")


def lr_factor(step: int, config: TrainerConfig) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last decay_fraction."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_start = int(config.steps * (1 - config.decay_fraction))
    if step >= decay_start and config.decay_fraction > 0:
        return max(0.0, (config.steps - step) / (config.steps - decay_start))
    return 1.0


def l1_coeff_at(step: int, config: TrainerConfig) -> float:
    return config.l1_coeff * _sparsity_warmup(step, config)


def l0_coeff_at(step: int, config: TrainerConfig) -> float:
    return config.l0_coeff * _sparsity_warmup(step, config)


def _sparsity_warmup(step: int, config: TrainerConfig) -> float:
    warmup = max(1, int(config.steps * config.l1_warmup_fraction))
    return min(1.0, (step + 1) / warmup)


def norm_loss_at(step: int, config: TrainerConfig) -> bool:
    """Whether this step trains on the error norm (the last norm_loss_fraction of the steps)."""
    return step >= config.steps * (1 - config.norm_loss_fraction)


def k_at(step: int, config: TrainerConfig, k: int) -> int:
    if not config.k_anneal_from:
        return k
    anneal = max(1, int(config.steps * config.k_anneal_fraction))
    progress = min(1.0, step / anneal)
    return max(k, round(config.k_anneal_from + (k - config.k_anneal_from) * progress))


def make_optimizer(model: CrossCoder, config: TrainerConfig) -> torch.optim.Adam:
    try:  # one fused kernel per step where the platform has it
        return torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas, fused=True)
    except RuntimeError:
        return torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls) -> Distributed:
        """Join the process group torchrun set up (gloo on CPU, NCCL on GPU), if there is one."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_rows(self, index):
        """This rank's contiguous share of a batch's rows."""
        if len(index) % self.world_size:
            raise FeaturestoreError(
                f"--batch-size {len(index)} must divide evenly among {self.world_size} processes")
        share = len(index) // self.world_size
        return index[self.rank * share:(self.rank + 1) * share]


class TrainingData(Protocol):
    """What the loop reads: AlignedActivations (stored sets) and ActivationBuffer (models)."""

    @property
    def labels(self) -> list[str]: ...

    def indices_for_step(self, step: int, batch_size: int) -> np.ndarray: ...

    def batch(self, index: np.ndarray) -> torch.Tensor:
        """Normalised activations [len(index), n_sources, d_model]."""

    def calibration_batches(self, after_step: int, batch_size: int,
                            n: int) -> Iterable[torch.Tensor]: ...

    def state_at(self, position: int) -> dict | None:
        """What a training state must hold to continue at this position (None: nothing)."""

    def restore(self, state: dict | None) -> None: ...

    def progress(self) -> dict[str, str]:
        """Fields for the progress bar."""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    metrics: list[dict[str, float]]  # one dict per logged step, with "step" and "tokens"

    @property
    def final(self) -> dict[str, float]:
        return self.metrics[-1] if self.metrics else {}


def train_crosscoder(model: CrossCoder, data: TrainingData, config: TrainerConfig,
                     state_dir: Path, resume: bool = False, progress: bool = True,
                     on_step: Callable[[int], None] | None = None,
                     on_log: Callable[[dict], None] | None = None,
                     distributed: Distributed = Distributed()) -> TrainResult:
    """Train `model` in place; training states go to `state_dir`.

    on_log receives every logged metrics row (e.g. for wandb); on_step the count of steps done.
    Under torchrun every process trains on its share of each batch and DistributedDataParallel
    averages the gradients, so (for vanilla, TopK and JumpReLU) the result is that of one process
    on whole batches; BatchTopK and Matryoshka select their top k x batch within each share, and
    their threshold and dead-latent counts are combined over all shares. Only rank 0 saves
    states and metrics.
    """
    from tqdm import tqdm

    if data.labels != list(model.config.source_labels):
        raise FeaturestoreError(
            f"sources {data.labels} do not match the model's {list(model.config.source_labels)}")
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    metrics: list[dict[str, float]] = []
    start = 0
    if resume:
        start, metrics, data_state = load_state(state_dir, model, optimizer, scheduler, config)
        data.restore(data_state)
    else:
        model.init_decoder_bias(data.batch(data.indices_for_step(0, config.batch_size)),
                                config.bias_init)
    model.train()
    step_model = model
    if distributed.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # The model all-reduces its own buffers (threshold, firing counts) each step, so DDP
        # need not overwrite them with rank 0's copy.
        step_model = DistributedDataParallel(model, broadcast_buffers=False)
    base_k = model.config.k
    bar = tqdm(total=config.steps, initial=start, desc="crosscoder", unit="step",
               file=sys.stderr, disable=None if progress and distributed.is_main else True)

    def load(step: int) -> torch.Tensor:  # this process's share of a step's batch
        return data.batch(distributed.local_rows(data.indices_for_step(step, config.batch_size)))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="next-batch") as loader:
        upcoming = loader.submit(load, start)
        for step in range(start, config.steps):
            x = upcoming.result()
            if step + 1 < config.steps:
                upcoming = loader.submit(load, step + 1)
            model.config = dataclasses.replace(model.config, k=k_at(step, config, base_k))
            l1_coeff, l0_coeff = l1_coeff_at(step, config), l0_coeff_at(step, config)
            norm_loss = norm_loss_at(step, config)
            out = step_model(x)
            loss, _ = total_loss(model, x, out, l1_coeff, l0_coeff, norm_loss)
            if not torch.isfinite(loss):
                saved = _saved_step(state_dir)
                raise FeaturestoreError(
                    f"training diverged at step {step}: the loss is {loss.item()}. The last good "
                    f"state ({'step ' + str(saved) if saved is not None else 'none saved yet'}) "
                    f"is kept in {state_dir}; lower --lr and run again"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            done = step + 1
            if distributed.is_main and (done % config.log_every == 0 or done == config.steps):
                row = batch_metrics(model, x, out, l1_coeff, optimizer.param_groups[0]["lr"],
                                    l0_coeff, norm_loss)
                metrics.append({"step": done, "tokens": done * config.batch_size, **row})
                if on_log is not None:
                    on_log(metrics[-1])
                bar.set_postfix(loss=f"{row['loss']:.3g}", ev=f"{row['explained_variance']:.3f}",
                                **data.progress(), refresh=False)
            if distributed.is_main and (done % config.save_every == 0 or done == config.steps):
                save_state(state_dir, done, model, optimizer, scheduler, config, metrics,
                           data.state_at(done * config.batch_size))
            bar.update()
            if on_step is not None:
                on_step(done)
    bar.close()
    model.config = dataclasses.replace(model.config, k=base_k)
    if model.config.arch in THRESHOLD_ARCHS:
        calibrate_threshold(model, data, config)
    model.eval()
    return TrainResult(config.steps, config.steps * config.batch_size, metrics)


@torch.no_grad()
def calibrate_threshold(model: CrossCoder, data: TrainingData, config: TrainerConfig,
                        batches: int = 8) -> None:
    """Set the BatchTopK (or Matryoshka) inference threshold from the final weights.

    The running estimate lags behind the weights (its EMA spans ~100 steps while the decoder norms
    still move), so after training it is replaced by the mean, over a few whole batches, of the
    smallest score batch top-k keeps. Every process computes it on the same whole batches, so
    they agree without communicating.
    """
    smallest = []
    norm_sums = model.decoder_norms().sum(dim=1)
    for x in data.calibration_batches(config.steps, config.batch_size, batches):
        acts = torch.relu(model.pre_activations(x))
        scores = (acts * norm_sums).flatten()
        kept = scores.topk(min(model.config.k * len(x), scores.numel()), sorted=False).values
        if (kept > 0).any():
            smallest.append(kept[kept > 0].min())
    if smallest:
        model.threshold.fill_(torch.stack(smallest).mean())


# --- training states: one safetensors file, JSON in its metadata ----------------------------


def save_state(directory: Path, step: int, model: CrossCoder, optimizer, scheduler,
               config: TrainerConfig, metrics: list[dict], data_state: dict | None = None) -> None:
    """Write the state to temp files and rename them into place (a kill leaves the old one).

    data_state (the data's own, e.g. the buffer's pool rows and token-source position): its
    arrays go with the tensors, the rest into the JSON.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value.detach().contiguous().reshape(value.shape)
    tensors["rng.torch"] = torch.get_rng_state()
    data_meta = None
    if data_state is not None:
        data_meta = {k: v for k, v in data_state.items() if not isinstance(v, np.ndarray)}
        tensors.update({f"data.{k}": torch.from_numpy(v) for k, v in data_state.items()
                        if isinstance(v, np.ndarray)})
    meta = {
        "step": step,
        "trainer": config.to_dict(),
        "model_config": model.config.to_dict(),
        "param_groups": optim["param_groups"],
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "metrics": metrics,
        "data": data_meta,
    }
    temp = directory / f".{STATE_FILE}.tmp"
    save_file(tensors, temp, metadata={STATE_METADATA_KEY: json.dumps(meta)})
    with open(temp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temp, directory / STATE_FILE)


def _state_metadata(directory: Path) -> dict | None:
    """The JSON part of the saved state in `directory`, or None if there is none."""
    from safetensors import safe_open

    path = directory / STATE_FILE
    if not path.exists():
        return None
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()[STATE_METADATA_KEY])


def _saved_step(directory: Path) -> int | None:
    meta = _state_metadata(directory)
    return None if meta is None else meta["step"]


def load_state(directory: Path, model: CrossCoder, optimizer, scheduler,
               config: TrainerConfig) -> tuple[int, list[dict], dict | None]:
    """Load a saved state into model, optimizer and scheduler; (step, metrics, data state)."""
    from safetensors.torch import load_file

    meta = _state_metadata(directory)
    if meta is None:
        raise FeaturestoreError(
            f"--resume: no saved training state in {directory}; run without --resume to start")
    # Through from_dict, a setting added since the state was saved reads as its default.
    saved = TrainerConfig.from_dict(meta["trainer"]).to_dict()
    if saved != config.to_dict():
        changed = sorted(k for k in config.to_dict() if saved.get(k) != config.to_dict()[k])
        raise FeaturestoreError(
            f"--resume: the saved run used different settings ({', '.join(changed)}); resume "
            "with the same options, or start over without --resume"
        )
    tensors = load_file(directory / STATE_FILE)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                           if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None]})
    torch.set_rng_state(tensors["rng.torch"])
    data_state = meta.get("data")
    if data_state is not None:
        data_state = {**data_state, **{k[len("data."):]: v.numpy() for k, v in tensors.items()
                                       if k.startswith("data.")}}
    return int(meta["step"]), meta["metrics"], data_state
