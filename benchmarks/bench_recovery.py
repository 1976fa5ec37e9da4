"""Crosscoder recovery: how exactly BatchTopK training finds a planted dictionary, and how fast.

Speed alone can hide a trainer that converges to a slightly wrong dictionary, so this benchmark
trains on data with a known answer and reports how close the answer came beside tokens/s.

The data: two aligned sources, A and B, of d_model 64, built from a planted sparse dictionary of
N_SHARED features present in both sources, N_A_ONLY only in A and N_B_ONLY only in B. A shared
feature has its own random unit direction in each source. Every token turns every feature on
independently with probability FIRING_PROBABILITY (so K = 8 features a token on average), with a
magnitude uniform in [1, 2], plus a little Gaussian noise; 4,096 tokens, held in an activation
set on disk as a real run's are, and normalised by the pipeline's own norm scale. A source holds
128 features in 64 dimensions, so the features overlap and the encoder must separate them by
sparsity. This is the recovery test's dictionary (tests/test_crosscoder_recovery.py) at twice its
width.

The training: featurestore's BatchTopK crosscoder (512 latents, k = K), STEPS steps of 2,048
tokens through train_crosscoder, each trainer setting in TRAINERS from the same initial weights
and on the same batches. The baseline is training on the squared error throughout; the
defaults end training on each source's error norm (TrainerConfig.norm_loss_fraction).

The figures, per setting, one sample per seed (each seed plants its own dictionary and draws its
own initial weights):

    tokens/s             the whole train_crosscoder call: reading batches from the set, the
                         steps, the final state save and the threshold calibration
    mean max cosine      over every (feature, source) where the feature is present: its best
                         cosine with any latent's decoder vector in that source; the table
                         gives its shortfall from 1, the notes the cosine itself
    classified           share of features whose best-matching latent (whole decoder vectors,
                         both sources concatenated) has the relative decoder norm
                         ||d_B|| / (||d_A|| + ||d_B||) of its kind: below 0.3 for A-only, 0.3
                         to 0.7 for shared, above 0.7 for B-only

With --quick: one seed and a tenth of the steps, a smoke run of the code path (the dictionary is
not learned yet at that length).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import BenchmarkResult, Measurement, RunOptions

from featurestore.activations import ActivationSet, TokenColumns, norm_scale, write_activation_set
from featurestore.aligned import AlignedActivations, Source
from featurestore.crosscoder import CrossCoder, CrossCoderConfig
from featurestore.crosscoder_training import TrainerConfig, train_crosscoder

SOURCES = ("A", "B")
D_MODEL = 64
N_SHARED, N_A_ONLY, N_B_ONLY = 96, 32, 32
N_FEATURES = N_SHARED + N_A_ONLY + N_B_ONLY
FIRING_PROBABILITY = 0.05
NOISE = 0.01
TRAIN_TOKENS = 4096
K = round(N_FEATURES * FIRING_PROBABILITY)
D_HIDDEN = 512
BATCH_SIZE = 2048
STEPS, QUICK_STEPS = 3000, 300
SEEDS, QUICK_SEEDS = (0, 1), (0,)
RELATIVE_NORM_BANDS = {"A-only": (0.0, 0.3), "shared": (0.3, 0.7), "B-only": (0.7, 1.0)}
# Trainer settings compared, each a set of TrainerConfig fields over the defaults; the first is
# the baseline.
TRAINERS: dict[str, dict] = {
    "squared error throughout": {"norm_loss_fraction": 0.0},
    "defaults (error norm for the last 20%)": {},
}


def run(options: RunOptions) -> BenchmarkResult:
    steps = QUICK_STEPS if options.quick else STEPS
    seeds = QUICK_SEEDS if options.quick else SEEDS
    rates: dict[str, list[float]] = {label: [] for label in TRAINERS}
    scores: dict[str, list[dict[str, float]]] = {label: [] for label in TRAINERS}
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        for seed in seeds:
            directions, kinds, data = planted_data(Path(tmp) / f"seed_{seed}", seed)
            # Each seed starts with a different setting, so none always runs first (on a machine
            # whose load changes, the first of a pair would otherwise always meet the same load).
            labels = list(TRAINERS)
            labels = labels[seed % len(labels):] + labels[:seed % len(labels)]
            for label in labels:
                state_dir = Path(tmp) / f"state_{seed}_{list(TRAINERS).index(label)}"
                trainer = TrainerConfig(steps=steps, batch_size=BATCH_SIZE, log_every=steps,
                                        save_every=steps, seed=seed, **TRAINERS[label])
                model, seconds = train(data, trainer, state_dir)
                rates[label].append(steps * BATCH_SIZE / seconds)
                scores[label].append(recovery(model, directions, kinds))
                print(f"  seed {seed}, {label}: {rates[label][-1]:,.0f} tokens/s, "
                      + ", ".join(f"{key} {value:.5f}" for key, value in scores[label][-1].items()),
                      flush=True)

    baseline = next(iter(TRAINERS))
    measurements = []
    for label in TRAINERS:
        measurements += [
            Measurement(f"{label}: training", "tokens/s", rates[label],
                        None if label == baseline else f"{baseline}: training"),
            # The table prints three significant figures, which would show every cosine here as
            # 1; its shortfall from 1 keeps the digits where settings differ.
            Measurement(f"{label}: 1 - mean max cosine", "shortfall (smaller is better)",
                        [1 - score["mean max cosine"] for score in scores[label]]),
            Measurement(f"{label}: classified", "share",
                        [score["classified"] for score in scores[label]]),
        ]
    notes = [f"{N_FEATURES} planted features ({N_SHARED} shared, {N_A_ONLY} A-only, {N_B_ONLY} "
             f"B-only) in 2 sources of d_model {D_MODEL}, {TRAIN_TOKENS:,} tokens; BatchTopK "
             f"{D_HIDDEN} latents, k {K}, {steps} steps of {BATCH_SIZE:,} tokens; seeds "
             f"{', '.join(map(str, seeds))}. Recovery, median over seeds:"]
    notes += [f"  {label}: mean max cosine "
              f"{statistics.median(s['mean max cosine'] for s in scores[label]):.5f}, worst "
              f"feature's {min(s['min cosine'] for s in scores[label]):.4f}, classified "
              f"{statistics.median(s['classified'] for s in scores[label]):.0%}"
              for label in TRAINERS]
    return BenchmarkResult(
        name="recovery",
        description=(f"BatchTopK crosscoder on a planted two-source dictionary (2x{D_MODEL}, "
                     f"{D_HIDDEN} latents, k {K}): recovery and training tokens/s"),
        measurements=measurements,
        config={"d_model": D_MODEL, "n_shared": N_SHARED, "n_a_only": N_A_ONLY,
                "n_b_only": N_B_ONLY, "firing_probability": FIRING_PROBABILITY, "noise": NOISE,
                "train_tokens": TRAIN_TOKENS, "d_hidden": D_HIDDEN, "k": K,
                "batch_size": BATCH_SIZE, "steps": steps, "seeds": list(seeds),
                "trainers": TRAINERS},
        details={"scores": scores},
        notes=notes,
    )


def planted_dictionary(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(directions [n_features, n_sources, d_model], unit and zero where absent; kinds)."""
    kinds = np.array(["shared"] * N_SHARED + ["A-only"] * N_A_ONLY + ["B-only"] * N_B_ONLY)
    directions = rng.standard_normal((N_FEATURES, len(SOURCES), D_MODEL))
    directions /= np.linalg.norm(directions, axis=2, keepdims=True)
    directions[kinds == "A-only", 1] = 0.0
    directions[kinds == "B-only", 0] = 0.0
    return directions, kinds


def planted_data(root: Path, seed: int) -> tuple[np.ndarray, np.ndarray, AlignedActivations]:
    """The planted dictionary of `seed` and its training tokens as aligned activation sets."""
    rng = np.random.default_rng(seed)
    directions, kinds = planted_dictionary(rng)
    active = rng.random((TRAIN_TOKENS, N_FEATURES)) < FIRING_PROBABILITY
    magnitudes = rng.uniform(1.0, 2.0, (TRAIN_TOKENS, N_FEATURES)) * active
    x = np.einsum("nf,fsd->nsd", magnitudes, directions)
    x = (x + NOISE * rng.standard_normal(x.shape)).astype(np.float32)
    n = TRAIN_TOKENS
    tokens = TokenColumns(np.arange(n) // 16, (np.arange(n) % 16).astype(np.int32),
                          np.zeros(n, dtype=np.int64), np.array(["train"] * n, dtype=object))
    sources = []
    for s, label in enumerate(SOURCES):
        write_activation_set(root / label, x[:, s], tokens)
        sources.append(Source(label, ActivationSet(root / label, norm_scale=norm_scale(x[:, s]),
                                                   name=label)))
    return directions, kinds, AlignedActivations(sources, seed=seed)


def train(data: AlignedActivations, trainer: TrainerConfig,
          state_dir: Path) -> tuple[CrossCoder, float]:
    """A BatchTopK crosscoder trained from the seed's initial weights, and the seconds it took."""
    torch.manual_seed(trainer.seed)
    model = CrossCoder(CrossCoderConfig(n_sources=len(SOURCES), d_model=D_MODEL,
                                        d_hidden=D_HIDDEN, arch="batchtopk", k=K,
                                        source_labels=SOURCES), data.norm_scales)
    started = time.perf_counter()
    train_crosscoder(model, data, trainer, state_dir, progress=False)
    return model, time.perf_counter() - started


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def recovery(model: CrossCoder, directions: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """Mean and worst best-cosine over present (feature, source) pairs; share classified."""
    decoder = model.decoder().detach().double().numpy()  # [d_hidden, n_sources, d_model]
    present = np.linalg.norm(directions, axis=2) > 0
    best = np.concatenate([
        (directions[present[:, s], s] @ unit_rows(decoder[:, s]).T).max(axis=1)
        for s in range(len(SOURCES))])
    latents = unit_rows(decoder.reshape(len(decoder), -1))
    matched = (unit_rows(directions.reshape(N_FEATURES, -1)) @ latents.T).argmax(axis=1)
    norms = np.linalg.norm(decoder[matched], axis=2)
    relative = norms[:, 1] / norms.sum(axis=1)
    low, high = np.array([RELATIVE_NORM_BANDS[kind] for kind in kinds]).T
    return {"mean max cosine": float(best.mean()), "min cosine": float(best.min()),
            "classified": float(np.mean((relative >= low) & (relative <= high)))}
