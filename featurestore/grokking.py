"""Modular addition and its progress measures: the grokking setup of Nanda, Chan, Lieberum, Smith
and Steinhardt, "Progress measures for grokking via mechanistic interpretability" (ICLR 2023).

A one-layer transformer reads "a b =" (tokens a, b in 0..p-1 and '=' = p) and predicts
c = (a + b) mod p at the '=' position; it trains full-batch on a fixed random share of the p²
pairs, with AdamW and strong weight decay. It first memorises the training pairs, then builds an
algorithm on a few key frequencies w_k = 2πk/p (cos and sin of w_k·a and w_k·b, multiplied into
cos(w_k(a + b − c))), and finally weight decay cleans up the memorising components: test
accuracy jumps late.

The progress measures here, per checkpoint:

    frequency_shares     share of the token embedding's squared norm (rows 0..p-1) in each
                         frequency k = 1..(p-1)/2 of the real Fourier basis over Z_p (cos and
                         sin together), and in the constant
    key frequencies      the frequencies dominating the final embedding (largest shares)
    restricted loss      train loss of the logits kept only along the key-frequency directions
                         cos(w_k(a + b − c)) and sin(w_k(a + b − c)), c varying (plus the
                         constant): how well the Fourier algorithm alone does
    excluded loss        train loss of the logits with those directions removed: how well the
                         memorisation does without the algorithm

The paper restricts the logits to the terms cos(w_k(a + b − c)) of a 3-D Fourier transform over
(a, b, c); projecting each input's logit vector (over c) onto cos and sin of w_k(a + b − c) for
the key k spans the same terms for a fixed (a, b), which is what is computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

MODULAR_ADDITION = "modular_addition"  # runs.task_config's "task" for these runs


@dataclass(frozen=True)
class ModularAddition:
    """All p² problems "a b = c" with c = (a + b) mod p, and which of them are trained on.

    A sequence holds the answer too, so that the answer is the next token after '=' like any
    next-token target the store grades (patching, split metrics). The model is trained on the
    prediction at '=' only; with causal attention nothing at positions 0-2 sees the answer, so
    this is the paper's three-token model with the answer appended for grading.
    """

    p: int
    train_fraction: float
    seed: int = 0

    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")
    DEFAULT_SPLITS: ClassVar[tuple[str, ...]] = SPLITS
    ANSWER_POSITION: ClassVar[int] = 2  # the '=' token, whose next token is the answer
    n_ctx: ClassVar[int] = 4

    def __post_init__(self) -> None:
        if self.p < 3 or any(self.p % d == 0 for d in range(2, math.isqrt(self.p) + 1)):
            raise ValueError(f"p={self.p}: use a prime >= 3")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"train_fraction={self.train_fraction}: use a share in (0, 1)")

    @property
    def equals_token(self) -> int:
        return self.p

    @property
    def vocab_size(self) -> int:
        return self.p + 1

    def token_names(self) -> list[str]:
        return [str(i) for i in range(self.p)] + ["="]

    def to_dict(self) -> dict:
        return {"task": MODULAR_ADDITION, "p": self.p, "train_fraction": self.train_fraction,
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict) -> ModularAddition:
        return cls(int(data["p"]), float(data["train_fraction"]), int(data.get("seed", 0)))

    def tokens(self) -> np.ndarray:
        """[p², 4] int64: row a·p + b is (a, b, '=', (a + b) mod p)."""
        a, b = np.divmod(np.arange(self.p * self.p), self.p)
        return np.stack([a, b, np.full_like(a, self.equals_token), (a + b) % self.p], axis=1)

    def answers(self) -> np.ndarray:
        """[p²]: (a + b) mod p for row a·p + b."""
        a, b = np.divmod(np.arange(self.p * self.p), self.p)
        return (a + b) % self.p

    def train_mask(self) -> np.ndarray:
        """[p²] bool: the pairs trained on, a fixed random share of round(fraction · p²)."""
        order = np.random.default_rng(self.seed).permutation(self.p * self.p)
        mask = np.zeros(self.p * self.p, dtype=bool)
        mask[order[: round(self.train_fraction * self.p * self.p)]] = True
        return mask

    def sample(self, split: str, n_sequences: int, seed: int):
        """Problems of `split` (train: the trained pairs, test: the others) as a TaskBatch. Every
        problem of the split, in row order, when n_sequences covers them all (so a collection
        sees the whole (a, b) grid); otherwise a seeded random subset, in row order."""
        import torch

        from featurestore.tasks import TaskBatch

        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(self.SPLITS)}")
        rows = np.flatnonzero(self.train_mask() == (split == "train"))
        if n_sequences < len(rows):
            rng = np.random.default_rng([seed, self.SPLITS.index(split)])
            rows = np.sort(rng.choice(rows, size=n_sequences, replace=False))
        tokens = self.tokens()[rows]
        scored = np.zeros(tokens.shape, dtype=bool)
        scored[:, self.ANSWER_POSITION] = True
        return TaskBatch(torch.from_numpy(tokens), torch.from_numpy(scored), [split] * len(rows))


def fourier_basis(p: int) -> np.ndarray:
    """[p, p] orthonormal real Fourier basis over Z_p, one basis vector per row: the constant,
    then cos(2πkx/p) and sin(2πkx/p) for k = 1..(p-1)/2."""
    x = np.arange(p)
    rows = [np.full(p, 1 / math.sqrt(p))]
    for k in range(1, (p - 1) // 2 + 1):
        rows.append(np.cos(2 * np.pi * k * x / p) * math.sqrt(2 / p))
        rows.append(np.sin(2 * np.pi * k * x / p) * math.sqrt(2 / p))
    return np.stack(rows)


def frequency_shares(matrix: np.ndarray) -> np.ndarray:
    """Share of ||matrix||² (rows indexed by x in Z_p) in each frequency: [(p+1)/2] with index 0
    the constant and index k the cos and sin of frequency k together; sums to 1."""
    p = matrix.shape[0]
    coefficients = fourier_basis(p) @ np.asarray(matrix, dtype=np.float64)
    energy = (coefficients ** 2).sum(axis=1)
    shares = np.concatenate([energy[:1], energy[1:].reshape(-1, 2).sum(axis=1)])
    return shares / shares.sum()


def key_frequencies(shares: np.ndarray, mass: float = 0.8, most: int = 8) -> list[int]:
    """The fewest frequencies (k >= 1, largest shares first) holding `mass` of the non-constant
    share, at most `most`: the frequencies an embedding is built on."""
    order = np.argsort(-shares[1:], kind="stable") + 1
    total = shares[1:].sum()
    keys, held = [], 0.0
    for k in order[:most]:
        keys.append(int(k))
        held += shares[k]
        if held >= mass * total:
            break
    return sorted(keys)


def key_frequency_directions(p: int, keys: list[int]) -> np.ndarray:
    """[p², 2·len(keys) + 1, p]: for each input a·p + b, an orthonormal basis (over c) of the
    constant and cos / sin of w_k(a + b − c) for the key frequencies k."""
    a, b = np.divmod(np.arange(p * p), p)
    c = np.arange(p)
    phase = (a + b)[:, None] - c[None, :]  # [p², p]
    rows = [np.full((p * p, p), 1 / math.sqrt(p))]
    for k in keys:
        w = 2 * np.pi * k / p
        rows.append(np.cos(w * phase) * math.sqrt(2 / p))
        rows.append(np.sin(w * phase) * math.sqrt(2 / p))
    return np.stack(rows, axis=1)


def restricted_and_excluded_logits(logits: np.ndarray, keys: list[int]
                                   ) -> tuple[np.ndarray, np.ndarray]:
    """logits [p², p] (row a·p + b, column c) kept only along the key-frequency directions of
    each input (restricted), and with those directions removed, the constant kept (excluded)."""
    p = logits.shape[1]
    directions = key_frequency_directions(p, keys)
    coefficients = np.einsum("ndc,nc->nd", directions, logits)
    restricted = np.einsum("nd,ndc->nc", coefficients, directions)
    constant = coefficients[:, :1] * directions[:, 0]
    return restricted, logits - restricted + constant


def cross_entropy(logits: np.ndarray, answers: np.ndarray) -> float:
    """Mean cross-entropy of rows of logits against integer answers (float64, stable)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(answers)), answers].mean())


@dataclass(frozen=True)
class GrokkingConfig:
    """The experiment's model and optimiser: the paper's (one layer, 4 heads, AdamW with weight
    decay 1.0, betas (0.9, 0.98), full batch), at a size a 2-core CPU trains in minutes."""

    p: int = 59
    train_fraction: float = 0.4
    d_model: int = 128
    n_heads: int = 4
    steps: int = 3000
    lr: float = 1e-3
    weight_decay: float = 1.0
    warmup: int = 10
    seed: int = 0

    def task(self) -> ModularAddition:
        return ModularAddition(self.p, self.train_fraction, self.seed)


# The experiment's defaults beyond the model's (shared by its jobs and the CLI): checkpoints every
# DENSE_EVERY steps after the log-spaced start, and the shared bases' training steps; their
# dictionaries are BASIS_WIDTH x d_model wide with d_model / BASIS_K_DIVISOR active per token
# (1024 and 32 at the default width).
DENSE_EVERY = 100
BASIS_FIT_STEPS = 1000
BASIS_WIDTH = 8
BASIS_K_DIVISOR = 4


def checkpoint_plan(steps: int, dense_every: int) -> list[int]:
    """Log-spaced steps (0, 1, 2, 4, ...) for the fast start, then every `dense_every` steps to
    the last, so the late transition is seen densely wherever it falls."""
    plan = {0, steps}
    step = 1
    while step < steps:
        plan.add(step)
        step *= 2
    plan.update(range(0, steps, dense_every))
    return sorted(plan)


def answer_logits(model, tokens):
    """The model's logits for the answer at the '=' position, over the p answer tokens. Only
    "a b =" is run: with causal attention the answer token changes nothing before it."""
    p = model.config.vocab_size - 1
    answer_at = ModularAddition.ANSWER_POSITION
    return model(tokens[:, :answer_at + 1])[:, answer_at, :p]


def train_grokking(config: GrokkingConfig, checkpoints: list[int], on_checkpoint):
    """Train featurestore's Transformer (one layer) on the task, full batch; call
    `on_checkpoint(step, model)` at each step of `checkpoints` (0 is the initialisation).
    Returns the trained model."""
    import torch
    import torch.nn.functional as F

    from featurestore.model import ModelConfig, Transformer

    task = config.task()
    tokens = torch.from_numpy(task.tokens())
    answers = torch.from_numpy(task.answers())
    train = torch.from_numpy(task.train_mask())
    torch.manual_seed(config.seed)
    model = Transformer(ModelConfig(vocab_size=task.vocab_size, n_ctx=task.n_ctx,
                                    d_model=config.d_model, n_layers=1, n_heads=config.n_heads))
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.98))
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min((step + 1) / config.warmup, 1.0))
    wanted = set(checkpoints)
    for step in range(config.steps + 1):
        if step in wanted:
            model.eval()
            on_checkpoint(step, model)
            model.train()
        if step == config.steps:
            return model
        loss = F.cross_entropy(answer_logits(model, tokens[train]), answers[train])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        warmup.step()


@dataclass
class Readout:
    """What a checkpoint's progress measures are computed from."""

    step: int
    logits: np.ndarray  # [p², p] float64: the answer logits of every problem
    embedding: np.ndarray  # [p, d_model] float64: the token embedding of 0..p-1


def read_out(model, task: ModularAddition, step: int) -> Readout:
    import torch

    with torch.no_grad():
        logits = answer_logits(model, torch.from_numpy(task.tokens())).double().numpy()
        embedding = model.wte.weight[: task.p].double().numpy()
    return Readout(step, logits, embedding)


@dataclass
class ProgressMeasures:
    """One checkpoint's measures (see the module docstring); progress_measures rows."""

    step: int
    train_loss: float
    test_loss: float
    train_accuracy: float
    test_accuracy: float
    restricted_loss: float
    excluded_loss: float
    key_frequency_share: float  # of the embedding's non-constant squared norm
    frequency_shares: list[float]  # of the embedding: index 0 constant, k frequency k


def progress_measures(readout: Readout, task: ModularAddition, keys: list[int]
                      ) -> ProgressMeasures:
    """The measures of one checkpoint, restricted and excluded loss on the key frequencies."""
    logits = readout.logits
    answers, train = task.answers(), task.train_mask()
    correct = logits.argmax(axis=1) == answers
    kept, removed = restricted_and_excluded_logits(logits, keys)
    shares = frequency_shares(readout.embedding)
    return ProgressMeasures(
        step=readout.step, train_loss=cross_entropy(logits[train], answers[train]),
        test_loss=cross_entropy(logits[~train], answers[~train]),
        train_accuracy=float(correct[train].mean()), test_accuracy=float(correct[~train].mean()),
        restricted_loss=cross_entropy(kept[train], answers[train]),
        excluded_loss=cross_entropy(removed[train], answers[train]),
        key_frequency_share=float(shares[keys].sum() / shares[1:].sum()),
        frequency_shares=shares.tolist())


def fourier_shares(values: np.ndarray) -> np.ndarray:
    """frequency_shares of one function over Z_p (a vector of length p): [(p+1)/2], index 0 the
    constant; all zeros for a zero vector."""
    values = np.asarray(values, dtype=np.float64)
    if not values.any():
        return np.zeros((len(values) + 1) // 2)
    return frequency_shares(values[:, None])


# A feature looks the answer up when the answer alone explains this share of its activation's
# variance at '=' (and it follows no one frequency): feature_frequencies.answer_feature.
ANSWER_FEATURE_SHARE = 0.9

# A feature follows a frequency when that frequency holds at least half of its answer profile's
# non-constant squared norm: a majority, so no feature follows two.
FOLLOWS_SHARE = 0.5


@dataclass
class AnswerFrequency:
    """How one feature's activation at '=' depends on the answer (feature_frequencies row)."""

    n_active: int
    answer_profile: list[float]  # mean activation per answer c
    answer_variance_share: float | None  # variance explained by the answer alone
    dominant_frequency: int | None
    dominant_share: float | None  # of the profile's non-constant squared norm

    @property
    def follows_frequency(self) -> bool:
        return self.dominant_share is not None and self.dominant_share >= FOLLOWS_SHARE

    @property
    def answer_feature(self) -> bool:
        """Looks the answer up: the answer explains most of it, yet no one frequency does."""
        return (not self.follows_frequency and self.answer_variance_share is not None
                and self.answer_variance_share >= ANSWER_FEATURE_SHARE)


def answer_frequency(activations: np.ndarray, answers: np.ndarray, p: int) -> AnswerFrequency:
    """A feature's activations over problems (one per problem, answers[i] its answer) read as a
    function of the answer, and the frequency that function follows."""
    activations = np.asarray(activations, dtype=np.float64)
    counts = np.bincount(answers, minlength=p)
    profile = np.bincount(answers, weights=activations, minlength=p) / np.maximum(counts, 1)
    active = int((activations > 0).sum())
    total = activations.var()
    if active == 0 or total == 0:
        return AnswerFrequency(active, profile.tolist(), None, None, None)
    between = float((counts * (profile - activations.mean()) ** 2).sum() / len(activations))
    shares = fourier_shares(profile)
    waves = shares[1:]
    if waves.sum() < 1e-12:  # constant over answers (up to rounding): follows no frequency
        return AnswerFrequency(active, profile.tolist(), between / total, None, None)
    k = int(np.argmax(waves)) + 1
    return AnswerFrequency(active, profile.tolist(), between / total, k,
                           float(waves[k - 1] / waves.sum()))


def answer_feature_shares(decoders: np.ndarray, answers: list[int], p: int) -> np.ndarray:
    """How a set of answer features lies in the residual stream, as a function of the answer:
    their unit decoder directions [n, d] averaged per answer (answers[i] the answer feature i
    looks up; an answer with no feature reads as zero), split by frequency over the answer
    (frequency_shares: index 0 the constant). Features built on the Fourier algorithm sit on the
    circles of its key frequencies, so those frequencies hold most of the share."""
    units = decoders / np.linalg.norm(decoders, axis=1, keepdims=True)
    means = np.zeros((p, decoders.shape[1]))
    counts = np.bincount(answers, minlength=p)
    np.add.at(means, answers, units)
    means[counts > 0] /= counts[counts > 0, None]
    return frequency_shares(means)
