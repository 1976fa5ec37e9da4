"""Crosscoder training throughput: featurestore's CrossCoder trainer against a plain dense one.

A crosscoder trains for thousands of steps, so the time of one step bounds how many tokens a run
can afford. Every architecture (vanilla; batchtopk, topk and matryoshka with k=32, matryoshka in
its default five doubling groups; jumprelu) is timed at four sizes, written sources x d_model /
latents:

    2x64/1024     2 sources of 64 dims, 1,024 latents (the only size with --quick)
    2x128/2048    2 sources of 128 dims, 2,048 latents
    2x256/4096    2 sources of 256 dims, 4,096 latents
    8x128/2048    8 checkpoints of 128 dims, 2,048 latents

A step is what train_crosscoder does for each batch of 1,024 tokens: forward, total_loss, backward,
clip_grad_norm_ to 1.0, optimizer step (make_optimizer's Adam, fused where torch has it); logging,
checkpoints and the learning-rate schedule are left out. The activations are random standard-normal
batches held in memory: per source their mean norm is about sqrt(d_model), which is what
normalisation gives real activations, and reading them costs nothing here (activation_read times
reading).

The baseline, measured in the same run on the same batches from the same initial weights, is what
a straightforward research implementation does (DenseReference below): the sources flattened into
one vector, one dense matmul each way (for matryoshka, one decode of each prefix), decoder norms
recomputed where they are used, and the default (non-fused) torch.optim.Adam. Its loss on the
first batch is checked against featurestore's, so both train the same model.

Also measured, interleaved with the trainers: the machine's fp32 matmul rate (one 2048x2048
product), which the notes divide each trainer's matmul FLOP rate by (utilisation); and, before the
timing, the peak memory a trainer's first two steps add (peak_step_memory_mb).

With a GPU (torch.cuda.is_available()) the same sizes are trained there as well: both trainers in
fp32 with TF32 matmuls, and featurestore's also under bf16 autocast, against the GPU's own TF32 and
bf16 matmul rates. FEATURESTORE_BENCH_DEVICE=cpu or =cuda runs one device only; unset, the CPU
always and the GPU where there is one.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from harness import (
    DEVICE_ENV,
    BenchmarkResult,
    Figure,
    Measurement,
    RunOptions,
    benchmark_devices,
    matmul_figure,
    measure,
    tf32_matmuls,
)
from torch import nn

from featurestore.crosscoder import CrossCoder, CrossCoderConfig
from featurestore.crosscoder_metrics import total_loss
from featurestore.crosscoder_training import TrainerConfig, make_optimizer

BATCH_SIZE = 1024  # tokens per step: the trainer's default
K = 32
ARCHS = ("vanilla", "batchtopk", "topk", "jumprelu", "matryoshka")
SPARSE_ARCHS = ("batchtopk", "topk", "matryoshka")  # featurestore decodes these k rows a token
# The trainer's defaults: learning rate, betas, the vanilla L1 and JumpReLU L0 coefficients (at
# the end of their warm-up) and the gradient-norm clip.
TRAINER = TrainerConfig()
MEMORY_STEPS = 2  # see peak_step_memory_mb
SEED = 0


@dataclass(frozen=True)
class Size:
    n_sources: int
    d_model: int
    d_hidden: int

    @property
    def label(self) -> str:
        return f"{self.n_sources}x{self.d_model}/{self.d_hidden}"

    def flops_per_token(self, sparse_k: int = 0, decoded: int | None = None) -> int:
        """Matmul FLOPs of one training step per token.

        Dense: forward 2*s*d*h for the encoder and as many for the decoder. Backward: the decoder
        needs the gradients of its weights and of the latents (2 products), the encoder only that
        of its weights, because the input activations need no gradient (1 product; autograd skips
        the other). 5 products in all, 10*s*d*h, where the usual "backward = 2x forward" would say
        12*s*d*h. A dense decoder that decodes several prefixes (the reference's matryoshka)
        does its 3 products over `decoded` latents in all, the sum of the prefixes' sizes. With
        sparse_k, featurestore's BatchTopK, TopK and Matryoshka: only the encoder's forward is
        dense (2*s*d*h); the decoder both ways and the encoder's weight gradient touch k rows a
        token (4 products of 2*s*d*k). Elementwise work, top-k, clipping and Adam are
        memory-bound and not counted, so the utilisation this gives is that of the matmuls'
        share of the work.
        """
        width = self.n_sources * self.d_model
        if sparse_k:
            return 2 * width * self.d_hidden + 8 * width * sparse_k
        return 4 * width * self.d_hidden + 6 * width * (decoded or self.d_hidden)


SIZES = [Size(2, 64, 1024), Size(2, 128, 2048), Size(2, 256, 4096), Size(8, 128, 2048)]
QUICK_SIZES = SIZES[:1]


@dataclass(frozen=True)
class Device:
    """Where the trainers run, and how each device is timed."""

    name: str  # "cpu" or "cuda"
    # A CPU step lasts far longer than the timer's resolution, so one per sample is enough; a GPU
    # step is short, so a sample runs many, and the timer reads after a synchronize.
    steps_per_sample: int
    # CPU: 17 GFLOP a product, large enough that the BLAS runs at its full rate rather than its
    # overhead (a larger product runs no faster). GPU: 1.1 TFLOP a product.
    matmul_n: int
    matmul_repeats: int
    # The matmul modes measured: (label part, autocast dtype or None for fp32). On CUDA fp32
    # matmuls run as TF32 (allowed in run below); bf16 autocast puts the products in bf16.
    modes: tuple[tuple[str, torch.dtype | None], ...]

    def synchronize(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize()

    def matmul_label(self, mode: str) -> str:
        n = self.matmul_n
        return f"fp32 matmul {n}x{n}" if self.name == "cpu" else f"CUDA matmul {n}x{n}, {mode}"

    def trainer_label(self, who: str, arch: str, size: Size, mode: str) -> str:
        # The CPU labels are those of the CPU-only benchmark, so its results compare over time.
        suffix = "" if self.name == "cpu" else f", CUDA {mode}"
        return f"{who}, {arch}, {size.label}{suffix}"


CPU = Device("cpu", steps_per_sample=1, matmul_n=2048, matmul_repeats=1, modes=(("fp32", None),))
CUDA = Device("cuda", steps_per_sample=20, matmul_n=8192, matmul_repeats=10,
              modes=(("fp32 (TF32)", None), ("bf16", torch.bfloat16)))


class DenseReference(nn.Module):
    """The same crosscoder as a straightforward research implementation writes it.

    Weights are the CrossCoder's, flattened over sources: W_enc [s*d, h], W_dec [h, s*d]. Encode
    is one matmul and a ReLU, then for batchtopk and matryoshka a topk over the whole batch's
    decoder-norm-weighted activations, for topk one over each token's, for jumprelu a threshold
    per latent (straight-through estimators as SAELens writes them); decode one matmul, or for
    matryoshka one per prefix, each from scratch. The loss is total_loss's: summed squared error
    per token (matryoshka: its mean over the prefixes), plus the decoder-norm-weighted L1 for
    vanilla, the L0 for jumprelu.
    """

    def __init__(self, model: CrossCoder):
        super().__init__()
        config = model.config
        self.arch, self.k, self.bandwidth = config.arch, config.k, config.jumprelu_bandwidth
        self.prefixes = [sum(config.group_sizes[:g + 1]) for g in range(len(config.group_sizes))]
        self.n_sources, self.d_model = config.n_sources, config.d_model
        width = config.n_sources * config.d_model
        with torch.no_grad():
            self.W_enc = nn.Parameter(model.W_enc.reshape(width, config.d_hidden).clone())
            self.b_enc = nn.Parameter(model.b_enc.clone())
            self.W_dec = nn.Parameter(model.decoder().reshape(config.d_hidden, width).clone())
            self.b_dec = nn.Parameter(model.b_dec.reshape(width).clone())
            if config.arch == "jumprelu":
                self.log_threshold = nn.Parameter(model.log_threshold.clone())

    def penalty_weights(self) -> torch.Tensor:
        """Per latent, the sum over sources of its decoder norms; recomputed on every call."""
        per_source = self.W_dec.view(-1, self.n_sources, self.d_model)
        return per_source.norm(dim=-1).sum(dim=1)

    def loss(self, x: torch.Tensor, l1_coeff: float, l0_coeff: float) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        pre = flat @ self.W_enc + self.b_enc
        acts = torch.relu(pre)
        if self.arch in ("batchtopk", "matryoshka"):
            scores = (acts * self.penalty_weights()).flatten()
            top = scores.topk(self.k * x.shape[0], sorted=False).indices
            acts = torch.zeros_like(scores).scatter(0, top, acts.flatten()[top]).view_as(acts)
        elif self.arch == "topk":
            top = acts.topk(self.k, dim=1)
            acts = torch.zeros_like(acts).scatter(1, top.indices, top.values)
        elif self.arch == "jumprelu":
            threshold = self.log_threshold.exp()
            acts = _ReferenceJumpReLU.apply(pre, threshold, self.bandwidth)
            l0 = _ReferenceStep.apply(pre, threshold, self.bandwidth).sum(dim=1).mean()
        if self.arch == "matryoshka":
            errors = [(flat - acts[:, :m] @ self.W_dec[:m] - self.b_dec).pow(2).sum(dim=1).mean()
                      for m in self.prefixes]
            return torch.stack(errors).mean()
        reconstruction = acts @ self.W_dec + self.b_dec
        loss = (flat - reconstruction).pow(2).sum(dim=1).mean()
        if self.arch == "vanilla":
            loss = loss + l1_coeff * (acts * self.penalty_weights()).sum(dim=1).mean()
        if self.arch == "jumprelu":
            loss = loss + l0_coeff * l0
        return loss


class _ReferenceJumpReLU(torch.autograd.Function):
    """pre * (pre > threshold); the threshold's gradient through a rectangle kernel."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = -(threshold / ctx.bandwidth) * window * grad
        return grad * (pre > threshold), grad_threshold.sum(dim=0), None


class _ReferenceStep(torch.autograd.Function):
    """(pre > threshold) as numbers; the threshold's gradient through a rectangle kernel."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return None, (-(1.0 / ctx.bandwidth) * window * grad).sum(dim=0), None


@dataclass
class Trainer:
    """A model, its optimizer and its loss; `train` runs train_crosscoder's step on each batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor], torch.Tensor]
    device: Device
    autocast: torch.dtype | None = None  # run the loss (forward) under this autocast dtype

    def train(self, batches: torch.Tensor) -> int:
        """One step per batch of `batches` [n, batch, sources, d_model]; returns the tokens."""
        for x in batches:
            with torch.autocast(self.device.name, dtype=self.autocast,
                                enabled=self.autocast is not None):
                loss = self.loss(x)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), TRAINER.max_grad_norm)
            self.optimizer.step()
        self.device.synchronize()  # on a GPU the steps were only queued
        return batches.shape[0] * batches.shape[1]


def featurestore_trainer(model: CrossCoder, device: Device,
                         autocast: torch.dtype | None = None) -> Trainer:
    def loss(x: torch.Tensor) -> torch.Tensor:
        return total_loss(model, x, model(x), TRAINER.l1_coeff, TRAINER.l0_coeff)[0]

    return Trainer(model, make_optimizer(model, TRAINER), loss, device, autocast)


def reference_trainer(model: CrossCoder, device: Device) -> Trainer:
    reference = DenseReference(model)
    optimizer = torch.optim.Adam(reference.parameters(), lr=TRAINER.lr, betas=TRAINER.betas)
    return Trainer(reference, optimizer,
                   lambda x: reference.loss(x, TRAINER.l1_coeff, TRAINER.l0_coeff), device)


def run(options: RunOptions) -> BenchmarkResult:
    sizes = QUICK_SIZES if options.quick else SIZES
    devices = chosen_devices()
    measurements: list[Measurement] = []
    # By trainer figure label: its matmul FLOPs per token, the matmul figure its utilisation
    # divides by, and what the notes and the JSON file report next to its rate.
    flops_per_token: dict[str, int] = {}
    matmul_of: dict[str, str] = {}
    weights_mb: dict[str, float] = {}
    memory_mb: dict[str, float] = {}
    notes = [f"tokens/s: training steps of {BATCH_SIZE} tokens, "
             f"{' / '.join(f'{d.steps_per_sample} per sample on {d.name}' for d in devices)}; "
             "both trainers of a pair of rows start from the same weights and train on the same "
             "batches."]
    if CUDA not in devices:
        why = (f"{DEVICE_ENV}=cpu" if torch.cuda.is_available()
               else "torch sees no GPU on this machine")
        notes.append(f"CUDA: {why}, so the CUDA training figures were skipped")
    for device in devices:
        figures = device_figures(device, sizes, flops_per_token, matmul_of, weights_mb, memory_mb)
        with tf32_matmuls(device.name):
            measurements += measure(figures, options)

    rates = {m.label: m.median for m in measurements}
    achieved = {label: rates[label] * flops / 1e9 for label, flops in flops_per_token.items()}
    utilisation = {label: achieved[label] / rates[matmul_of[label]] for label in achieved}
    notes += [
        "per trainer: the matmul GFLOP/s it performs (Size.flops_per_token: 10*s*d*h a token for "
        "a dense step, more for the reference's matryoshka, which decodes every prefix; "
        "featurestore's BatchTopK, TopK and Matryoshka decode and back-propagate the encoder "
        "sparsely, 2*s*d*h + 8*s*d*k) and that as a share of its device's matmul rate; the peak "
        f"memory torch allocates over its first {MEMORY_STEPS} steps on top of the weights "
        "(peak_step_memory_mb). That peak is the step's activations and the gradients and Adam "
        "moments: set by the batch and the model, never by the dataset, of which training holds "
        "one batch at a time:",
    ]
    notes += [f"  {label}: {achieved[label]:.1f} GFLOP/s = {utilisation[label]:.0%} of "
              f"{matmul_of[label]}; peak +{memory_mb[label]:.1f} MB over "
              f"{weights_mb[label]:.1f} MB of weights" for label in achieved]
    return BenchmarkResult(
        name="crosscoder",
        description=(f"crosscoder training steps of {BATCH_SIZE} tokens at "
                     f"{', '.join(s.label for s in sizes)} (sources x d_model / latents), "
                     f"vanilla, jumprelu, and batchtopk, topk and matryoshka with k={K}, on "
                     f"{' and '.join(d.name for d in devices)}"),
        measurements=measurements,
        config={"batch_size": BATCH_SIZE, "k": K, "archs": list(ARCHS),
                "sizes": [{"label": s.label, "n_sources": s.n_sources, "d_model": s.d_model,
                           "d_hidden": s.d_hidden} for s in sizes],
                "devices": [{"name": d.name, "steps_per_sample": d.steps_per_sample,
                             "matmul_n": d.matmul_n, "matmul_repeats": d.matmul_repeats,
                             "modes": [mode for mode, _ in d.modes]} for d in devices],
                "memory_steps": MEMORY_STEPS,
                "trainer": TRAINER.to_dict()},
        details={"matmul_gflops": {label: rates[label] for label in set(matmul_of.values())},
                 "matmul_flops_per_token": flops_per_token,
                 "matmul_figure": matmul_of,
                 "achieved_matmul_gflops": achieved,
                 "utilisation": utilisation,
                 "peak_step_memory_mb": memory_mb,
                 "weights_mb": weights_mb},
        notes=notes,
    )


def chosen_devices() -> list[Device]:
    """The CPU, and the GPU where torch sees one (harness.benchmark_devices)."""
    return [CPU if name == "cpu" else CUDA for name in benchmark_devices()]


def device_figures(device: Device, sizes: list[Size], flops_per_token: dict[str, int],
                   matmul_of: dict[str, str], weights_mb: dict[str, float],
                   memory_mb: dict[str, float]) -> list[Figure]:
    """The matmul rates and every trainer on one device; fills in the per-trainer dicts."""
    generator = torch.Generator().manual_seed(SEED)
    figures = [matmul_figure(device.matmul_label(mode), device.name, device.matmul_n,
                             device.matmul_repeats, dtype,
                             note="the device's rate, not a baseline for a ratio: the "
                                  "utilisation below divides by it")
               for mode, dtype in device.modes]
    for size in sizes:
        # Distinct batches for every step of a timed sample and of the memory pass.
        batches = torch.randn(max(device.steps_per_sample, MEMORY_STEPS), BATCH_SIZE,
                              size.n_sources, size.d_model, generator=generator).to(device.name)
        for arch in ARCHS:
            torch.manual_seed(SEED)  # the CrossCoder's initial weights, which the reference copies
            initial = CrossCoder(CrossCoderConfig(size.n_sources, size.d_model, size.d_hidden,
                                                  arch=arch, k=K)).to(device.name).train()
            reference = reference_trainer(initial, device)
            check_same_loss(initial, reference.model, batches[0])
            fp32_mode = device.modes[0][0]
            reference_label = device.trainer_label("dense reference", arch, size, fp32_mode)
            decoded = sum(reference.model.prefixes) if arch == "matryoshka" else None
            trainers = {reference_label: (reference, size.flops_per_token(decoded=decoded),
                                          fp32_mode)}
            for mode, dtype in device.modes:
                # Every featurestore trainer starts from the same weights as the reference.
                model = initial if dtype is None else copy.deepcopy(initial)
                label = device.trainer_label("CrossCoder", arch, size, mode)
                sparse_k = K if arch in SPARSE_ARCHS else 0
                trainers[label] = (featurestore_trainer(model, device, dtype),
                                   size.flops_per_token(sparse_k), mode)
            timed = batches[:device.steps_per_sample]
            for label, (trainer, flops, mode) in trainers.items():
                flops_per_token[label] = flops
                matmul_of[label] = device.matmul_label(mode)
                weights_mb[label] = sum(p.numel() * p.element_size()
                                        for p in trainer.model.parameters()) / 1e6
                memory_mb[label] = peak_step_memory_mb(trainer, batches[:MEMORY_STEPS])
                figures.append(Figure(label, "tokens/s", lambda t=trainer, x=timed: t.train(x),
                                      baseline=None if label == reference_label
                                      else reference_label))
    return figures


@torch.no_grad()
def check_same_loss(model: CrossCoder, reference: DenseReference, x: torch.Tensor) -> None:
    """Refuse to compare rates unless both compute the same loss from the same weights.

    Compared in full fp32 (TF32 is only switched on while the figures run), so the tolerance
    is that of fp32 arithmetic on either device.
    """
    model.eval()  # no threshold update or firing count from this check
    ours = total_loss(model, x, model(x), TRAINER.l1_coeff, TRAINER.l0_coeff)[0]
    model.train()
    theirs = reference.loss(x, TRAINER.l1_coeff, TRAINER.l0_coeff)
    if not torch.allclose(ours, theirs, rtol=1e-4):
        raise RuntimeError(f"{model.config.arch}: CrossCoder's loss {ours.item()} and the dense "
                           f"reference's {theirs.item()} differ; DenseReference is out of date")


def peak_step_memory_mb(trainer: Trainer, batches: torch.Tensor) -> float:
    """Peak of the memory torch allocates over a fresh trainer's first steps, in MB.

    The first step allocates the gradients and, in the optimizer step, Adam's two moment buffers
    (each as big as the weights); the second runs with all of them alive next to its activations
    and temporaries, which is the steady state of training. The weights and the batches exist
    before, so they are not counted. On a GPU torch's allocator counts its own peak. On CPU torch
    keeps no allocation counters outside its profiler, whose memory events (+bytes per
    allocation, -bytes per free) this adds up in order. The process's resident memory grows more
    than this (glibc keeps and fragments what torch frees, the BLAS has its own buffers) and by an
    amount that varies from run to run, so it would blur the comparison between the two trainers.
    """
    if trainer.device.name == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.train(batches)
        return (torch.cuda.max_memory_allocated() - before) / 1e6
    # Kineto, torch's profiler, logs every start and stop to stderr at a level above its errors,
    # so only level 6 (nothing) keeps them out of the report; read when the profiler first starts.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as profiler:
        trainer.train(batches)
    events = [event for event in profiler.profiler.kineto_results.events()
              if event.name() == "[memory]"]
    if not events:  # with its errors silenced, a profiler that failed would read as 0 MB
        raise RuntimeError("torch's profiler recorded no allocations; peak memory unknown")
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 1e6
