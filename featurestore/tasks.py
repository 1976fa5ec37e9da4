"""The built-in synthetic token task.

Every sequence belongs to one of four sub-tasks and starts with that sub-task's marker token.
The sub-tasks are chosen so that a small transformer learns them at different times, which
gives the feature store something to watch form during training:

    bigram     symbols from a fixed random Markov chain (each symbol has 3 possible successors).
               Predictable from the current token alone, so it is learned first.
    modular    "a + b = c" problems modulo a prime, packed back to back. Predicting c needs
               attention to a and b plus an addition table, so it comes later.
    induction  a span of distinct symbols repeated until the context is full. Predicting the
               repeats needs an induction circuit (find the earlier occurrence of the current
               symbol, copy what followed it), which forms last.
    reverse    palindromes: a span of fresh symbols followed by its mirror image. It has no
               weight in the base mix and most of the weight in FINETUNE_MIX, so fine-tuning
               has a real new skill to add.

The "world" (Markov chain, operand frequencies, held-out addition problems, vocabulary layout)
depends only on the config, never on the seeds used to draw sequences. The mix of sub-tasks is
part of the config; a fine-tuning task is the same world with another mix:

    finetune_task = SyntheticTask(dataclasses.replace(config, mix=FINETUNE_MIX))
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from featurestore.model import config_from_dict

SUBTASKS = ("bigram", "modular", "induction", "reverse")
BASE_MIX = {"bigram": 0.2, "modular": 0.5, "induction": 0.3, "reverse": 0.0}
FINETUNE_MIX = {"bigram": 0.1, "modular": 0.15, "induction": 0.15, "reverse": 0.6}

# Each bigram symbol has this many possible successors, with these probabilities. The best
# possible accuracy on bigram sequences is therefore the first probability.
SUCCESSOR_PROBABILITIES = (0.7, 0.2, 0.1)


@dataclass
class TaskConfig:
    n_ctx: int = 16
    world_seed: int = 0
    modulus: int = 23  # a prime, so that addition mod p has no shortcuts through factors
    mix: dict[str, float] = field(default_factory=lambda: dict(BASE_MIX))  # relative weights
    bigram_symbols: int = 24
    span_symbols: int = 16  # alphabet shared by induction and reverse
    # Span lengths (inclusive ranges). Longer spans make a sub-task harder and later to learn.
    induction_min_span: int = 4
    induction_max_span: int = 7
    reverse_min_span: int = 3
    reverse_max_span: int = 6
    heldout_pair_fraction: float = 0.1  # share of (a, b) pairs that training never shows
    # The r-th most common operand has weight 1 / r ** operand_zipf; 0 means uniform operands.
    operand_zipf: float = 1.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mix) - set(SUBTASKS))
        if unknown:
            raise ValueError(f"unknown sub-tasks in mix: {unknown}; known: {list(SUBTASKS)}")
        if any(weight < 0 for weight in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix weights must be >= 0 and not all zero, got {self.mix}")
        longest = (self.n_ctx - 1) // 2  # room for a span and one full copy of it
        if not 2 <= self.induction_min_span <= self.induction_max_span <= longest:
            raise ValueError(f"need 2 <= induction_min_span <= induction_max_span <= {longest}")
        # A palindrome needs 3 symbols before any of its mirror image is predictable.
        if not 3 <= self.reverse_min_span <= self.reverse_max_span <= longest:
            raise ValueError(f"need 3 <= reverse_min_span <= reverse_max_span <= {longest}")
        if self.span_symbols < self.n_ctx - 1:
            raise ValueError("span_symbols must be >= n_ctx - 1 (reverse uses that many at most)")
        if not 0 < self.heldout_pair_fraction < 1:
            raise ValueError("heldout_pair_fraction must be strictly between 0 and 1")

    @property
    def vocab_size(self) -> int:
        return Vocabulary.for_config(self).size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class Vocabulary:
    """Token ids as contiguous ranges: markers | bigram symbols | 0..p-1 '+' '=' | span symbols."""

    bigram_symbols: int
    modulus: int
    span_symbols: int

    @classmethod
    def for_config(cls, config: TaskConfig) -> Vocabulary:
        return cls(config.bigram_symbols, config.modulus, config.span_symbols)

    def marker(self, subtask: str) -> int:
        return SUBTASKS.index(subtask)

    @property
    def bigram_start(self) -> int:
        return len(SUBTASKS)

    @property
    def number_start(self) -> int:
        return self.bigram_start + self.bigram_symbols

    @property
    def plus(self) -> int:
        return self.number_start + self.modulus

    @property
    def equals(self) -> int:
        return self.plus + 1

    @property
    def span_start(self) -> int:
        return self.equals + 1

    @property
    def size(self) -> int:
        return self.span_start + self.span_symbols

    def token_names(self) -> list[str]:
        """A readable name for every token id, e.g. for labelling features."""
        return (
            [f"<{name}>" for name in SUBTASKS]
            + [f"b{i}" for i in range(self.bigram_symbols)]
            + [str(i) for i in range(self.modulus)]
            + ["+", "="]
            + [f"s{i}" for i in range(self.span_symbols)]
        )


@dataclass
class TaskBatch:
    tokens: torch.Tensor  # LongTensor[n, n_ctx]
    scored: torch.Tensor  # BoolTensor[n, n_ctx]: the NEXT token is predictable and is graded
    subtask: list[str]  # the sub-task of each sequence


class SyntheticTask:
    # "train" is the only split training draws from. "heldout" has the same mix, but its
    # addition problems use only the held-out (a, b) pairs and its sequences come from a
    # separate random stream. The per-sub-task splits are held-out examples of one sub-task.
    SPLITS = ("train", "heldout", *SUBTASKS)
    DEFAULT_SPLITS = SUBTASKS  # what collect reads unless told: each sub-task in equal shares

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.vocab = Vocabulary.for_config(config)
        world = np.random.default_rng(config.world_seed)
        # successors[s] lists the bigram symbols (not token ids) that may follow symbol s, most
        # likely first.
        self.successors = np.stack(
            [
                world.choice(
                    config.bigram_symbols, size=len(SUCCESSOR_PROBABILITIES), replace=False
                )
                for _ in range(config.bigram_symbols)
            ]
        )
        p = config.modulus
        all_pairs = np.array([(a, b) for a in range(p) for b in range(p)])
        shuffled = world.permutation(len(all_pairs))
        n_heldout = max(1, round(config.heldout_pair_fraction * len(all_pairs)))
        self.heldout_pairs = all_pairs[np.sort(shuffled[:n_heldout])]
        self.train_pairs = all_pairs[np.sort(shuffled[n_heldout:])]
        # Operands follow a Zipf law over a random ranking of 0..p-1: a few numbers are common,
        # most are rare. With uniform operands neither a nor b alone says anything about c, so
        # nothing pushes the model to look at either until it uses both together, and training
        # sits on a long plateau; a skewed operand distribution breaks that symmetry.
        operand_rank = world.permutation(p)
        self.operand_weights = 1.0 / (1.0 + operand_rank) ** config.operand_zipf

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def n_ctx(self) -> int:
        return self.config.n_ctx

    def token_names(self) -> list[str]:
        return self.vocab.token_names()

    def sample(self, split: str, n_sequences: int, seed: int) -> TaskBatch:
        """n_sequences from `split`; the same (split, n_sequences, seed) gives the same batch."""
        return self._generate(split, n_sequences, self._rng(split, seed, stream=0))

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[TaskBatch]:
        """An endless, reproducible stream of batches (a different stream from `sample`'s)."""
        rng = self._rng(split, seed, stream=1)  # called now, so a bad split name fails now
        return (self._generate(split, batch_size, rng) for _ in itertools.count())

    def _rng(self, split: str, seed: int, stream: int) -> np.random.Generator:
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(self.SPLITS)}")
        # Mixing the split into the seed gives every split its own stream of sequences, so
        # held-out splits never replay the training stream.
        return np.random.default_rng([seed, self.SPLITS.index(split), stream])

    def _generate(self, split: str, n: int, rng: np.random.Generator) -> TaskBatch:
        if split in ("train", "heldout"):
            mix = self.config.mix
        else:
            mix = {split: 1.0}
        pairs = self.train_pairs if split == "train" else self.heldout_pairs

        names = [name for name, weight in mix.items() if weight > 0]
        weights = np.array([mix[name] for name in names], dtype=float)
        which = rng.choice(len(names), size=n, p=weights / weights.sum())

        tokens = np.empty((n, self.config.n_ctx), dtype=np.int64)
        scored = np.zeros((n, self.config.n_ctx), dtype=bool)
        for index, name in enumerate(names):
            rows = np.flatnonzero(which == index)
            if name == "bigram":
                tokens[rows], scored[rows] = self._bigram(rng, len(rows))
            elif name == "modular":
                tokens[rows], scored[rows] = self._modular(rng, len(rows), pairs)
            elif name == "induction":
                tokens[rows], scored[rows] = self._induction(rng, len(rows))
            else:
                tokens[rows], scored[rows] = self._reverse(rng, len(rows))
        return TaskBatch(
            tokens=torch.from_numpy(tokens),
            scored=torch.from_numpy(scored),
            subtask=[names[i] for i in which],
        )

    # Each generator below returns (tokens, scored) as numpy arrays of shape [n, n_ctx].
    # Position i is scored when tokens[i + 1] is determined (or, for bigram, best guessed) by
    # what came before, so the last position is never scored.

    def _bigram(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        n_ctx = self.config.n_ctx
        symbols = np.empty((n, n_ctx - 1), dtype=np.int64)
        symbols[:, 0] = rng.integers(self.config.bigram_symbols, size=n)
        picks = rng.choice(
            len(SUCCESSOR_PROBABILITIES), size=(n, n_ctx - 2), p=SUCCESSOR_PROBABILITIES
        )
        for t in range(1, n_ctx - 1):
            symbols[:, t] = self.successors[symbols[:, t - 1], picks[:, t - 1]]

        tokens = np.empty((n, n_ctx), dtype=np.int64)
        tokens[:, 0] = self.vocab.marker("bigram")
        tokens[:, 1:] = self.vocab.bigram_start + symbols
        scored = np.zeros((n, n_ctx), dtype=bool)
        # The marker is followed by a uniformly random first symbol; every later symbol
        # follows the chain.
        scored[:, 1:-1] = True
        return tokens, scored

    def _modular(
        self, rng: np.random.Generator, n: int, pairs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        n_ctx, p, vocab = self.config.n_ctx, self.config.modulus, self.vocab
        # Enough 5-token problems to fill the sequence; the last one may be cut off.
        n_problems = -(-(n_ctx - 1) // 5)
        pair_weights = self.operand_weights[pairs[:, 0]] * self.operand_weights[pairs[:, 1]]
        picks = rng.choice(len(pairs), size=(n, n_problems), p=pair_weights / pair_weights.sum())
        a, b = pairs[picks, 0], pairs[picks, 1]
        problems = np.stack(
            [
                vocab.number_start + a,
                np.full_like(a, vocab.plus),
                vocab.number_start + b,
                np.full_like(a, vocab.equals),
                vocab.number_start + (a + b) % p,
            ],
            axis=-1,
        )
        tokens = np.empty((n, n_ctx), dtype=np.int64)
        tokens[:, 0] = vocab.marker("modular")
        tokens[:, 1:] = problems.reshape(n, 5 * n_problems)[:, : n_ctx - 1]
        scored = np.zeros((n, n_ctx), dtype=bool)
        scored[:, :-1] = tokens[:, :-1] == vocab.equals  # '=' is followed by the answer
        return tokens, scored

    def _induction(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """A span of distinct symbols, repeated until the context is full.

        The span length varies, so the model cannot copy from a fixed offset: it has to find the
        earlier occurrence of the current symbol and predict what followed it.
        """
        n_ctx = self.config.n_ctx
        span_lengths = rng.integers(
            self.config.induction_min_span, self.config.induction_max_span + 1, size=n
        )
        # A random permutation of the alphabet per sequence; any prefix of it is distinct.
        permutations = np.argsort(rng.random((n, self.config.span_symbols)), axis=1)

        tokens = np.empty((n, n_ctx), dtype=np.int64)
        tokens[:, 0] = self.vocab.marker("induction")
        scored = np.zeros((n, n_ctx), dtype=bool)
        for row, length in enumerate(span_lengths):
            repeats = np.tile(permutations[row, :length], -(-(n_ctx - 1) // length))
            tokens[row, 1:] = self.vocab.span_start + repeats[: n_ctx - 1]
            # The first repeat's first symbol cannot be foreseen (nothing marks where the span
            # ends); from there on every next symbol is fixed.
            scored[row, 1 + length : n_ctx - 1] = True
        return tokens, scored

    def _reverse(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Back-to-back palindromes: a span of fresh symbols, then the span mirrored.

        "a b c d" becomes "a b c d c b a". A symbol only repeats inside its own mirror image, so
        to predict the next symbol the model has to find where the current one appeared before
        and read the symbol just before it there (induction reads the one just after).
        """
        n_ctx, min_span = self.config.n_ctx, self.config.reverse_min_span
        permutations = np.argsort(rng.random((n, self.config.span_symbols)), axis=1)
        # More span lengths per row than can fit; the leftovers are never used.
        span_lengths = rng.integers(
            min_span, self.config.reverse_max_span + 1, size=(n, n_ctx // (2 * min_span - 1) + 1)
        )

        tokens = np.empty((n, n_ctx), dtype=np.int64)
        tokens[:, 0] = self.vocab.marker("reverse")
        scored = np.zeros((n, n_ctx), dtype=bool)
        for row in range(n):
            symbols: list[int] = []
            n_fresh = 0
            for length in span_lengths[row]:
                room = n_ctx - 1 - len(symbols)
                if room <= 0:
                    break
                # A palindrome cut off by the end of the context takes no more fresh symbols
                # than fit, so a sequence never needs more than n_ctx - 1 of them.
                span = list(permutations[row, n_fresh : n_fresh + min(length, room)])
                n_fresh += len(span)
                # The mirror's first symbol cannot be foreseen (nothing marks where the span
                # ends); each one after it is fixed, so the positions before those are scored.
                mirror_start = 1 + len(symbols) + len(span)
                scored[row, mirror_start : mirror_start + len(span) - 2] = True
                symbols += span + span[-2::-1]
            tokens[row, 1:] = self.vocab.span_start + np.array(symbols[: n_ctx - 1])
        scored[:, -1] = False  # the last position has no next token
        return tokens, scored


def task_from_config(task_config: dict):
    """The task a trained run's tokens come from (runs.task_config): this module's synthetic
    task, or modular addition for the grokking experiment's runs. Both give SPLITS,
    DEFAULT_SPLITS, n_ctx, vocab_size, token_names() and sample(split, n, seed)."""
    from featurestore.grokking import MODULAR_ADDITION, ModularAddition

    if task_config.get("task") == MODULAR_ADDITION:
        return ModularAddition.from_dict(task_config)
    return SyntheticTask(TaskConfig.from_dict(task_config))
