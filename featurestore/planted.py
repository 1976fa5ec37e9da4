"""Planted activations over training checkpoints: synthetic data with a known answer for births.

A birth rule is only as trustworthy as the data it was checked on. The easy planted run of
tests/test_planted_dynamics.py has orthonormal directions, fewer features than dimensions and
every feature firing equally often, so any sensible rule passes it. Real activations are harder
in four ways, and this generator plants all four, keeping the truth beside the data:

Superposition. More features than dimensions (by default 64 in d_model 32), each a random
Gaussian direction normalised to unit length, so directions overlap (|cosine| about
1/sqrt(d_model) on average, up to about 0.5) and a dictionary must separate them by sparsity,
not by orthogonality.

Varying rates and magnitudes. Each feature fires on a token independently (a Bernoulli draw per
feature, so a token holds zero, one or several features; many tokens early in training hold
none) with its own probability, log-uniform between `min_rate` and `max_rate` (1% to 10%); its
magnitude when it fires is its own scale (log-normal, median 1, sigma `scale_sigma`) times a
factor in [1 - spread, 1 + spread]. Isotropic Gaussian noise lies over everything. One absolute
threshold for every feature (an activation rate of 1%, say) meets features that sit near it, and
a dictionary with k above the true L0 spreads spare activations over latents of features not
born yet.

Late births, and deaths. About a quarter of the features (28%) are present from the first
checkpoint; the rest are born at every checkpoint index 1 .. n-1, at least two at each, the last
two included: there a rule needing K checkpoints of presence cannot see K of them (a censored
birth). A few die: three present from initialisation in the middle third of the run, one at the
last checkpoint, and one born at index 1 mid-way. `birth_index` and `death_index` are indices
into `steps`: a feature is present at checkpoints birth_index <= c < death_index (None: from the
first / to the last). A pooled dictionary sees a feature born at the last checkpoint in about
1/(2n) of its full rate's tokens, so features born at the last two checkpoints fire at least
`late_min_rate` (4%): rarer, no dictionary of this size learns them, and the data would test the
fit rather than the birth rule.

Training-like change. At its birth checkpoint a feature fires at `birth_ramp` (half) of its
probability, at the full one from the next checkpoint on. A feature fires on the same tokens with
the same strength throughout (a fixed uniform draw per token and feature is compared with the
checkpoint's probability, so the tokens of the birth checkpoint are a subset of the later ones),
and half of the noise variance is fixed per token, half drawn afresh per checkpoint: consecutive
checkpoints differ by what was born, died or moved, as a model's do. Directions drift: each
rotates, in a plane of its own, from cosine `min_direction_cosine` (0.95) with its final
direction at the first checkpoint to 1 at the last, so one pooled dictionary covers a slightly
moving target. The steps are log-spaced (0, 10, 20, 40, ... 5000), as real runs save them.

Everything is a pure function of the `PlantedConfig` (the seed included): `generate(config)` gives
the `PlantedRun` (the truth), `run.activations(c)` the [tokens, d_model] float32 matrix of
checkpoint index c (the same tokens at every checkpoint), `run.write_checkpoint(c, path)` a
Parquet file `featurestore register-activations` accepts, and
`featurestore.ingest.register.register_planted_run` writes and registers every checkpoint.
`match_features` pairs each planted direction with the learned feature whose decoder direction
is closest, as a researcher would pair them: by direction, never by index; `score_births` sets
one rule's `births` rows against the truth. Numpy and pyarrow only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Log-spaced training steps: 14 checkpoints.
DEFAULT_STEPS = (0, 10, 20, 40, 80, 150, 250, 400, 600, 900, 1300, 2000, 3000, 5000)


@dataclass(frozen=True)
class PlantedConfig:
    """What to plant. The defaults train in seconds on 2 cores (4,096 tokens x 14 checkpoints)."""

    d_model: int = 32
    n_features: int = 64  # true features: more than d_model (superposition)
    steps: tuple[int, ...] = DEFAULT_STEPS  # checkpoint steps, increasing
    sequences: int = 256
    positions: int = 16  # tokens per checkpoint = sequences * positions
    vocab: int = 1000  # token ids drawn from 0 .. vocab-1 (fixed across checkpoints)
    present_fraction: float = 0.28  # share of features present from the first checkpoint
    min_rate: float = 0.01  # firing probabilities are log-uniform in [min_rate, max_rate]
    max_rate: float = 0.1
    late_min_rate: float = 0.04  # floor of the rate of features born at the last two checkpoints
    scale_sigma: float = 0.3  # per-feature magnitude scale: log-normal(0, scale_sigma)
    magnitude_spread: float = 0.5  # per firing: scale * uniform(1 - spread, 1 + spread)
    noise_std: float = 0.05  # isotropic Gaussian noise per dimension
    checkpoint_noise: float = 0.5  # share of the noise variance drawn afresh at each checkpoint
    birth_ramp: float = 0.5  # share of the firing probability at the birth checkpoint
    min_direction_cosine: float = 0.95  # cosine to the final direction at the first checkpoint
    mid_deaths: int = 3  # present-from-init features that die in the middle third of the run
    last_deaths: int = 1  # present-from-init features that die at the last checkpoint
    born_deaths: int = 1  # features born at index 1 that die mid-way
    seed: int = 0

    def __post_init__(self) -> None:
        n = len(self.steps)
        if n < 4 or list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"steps must be at least 4 distinct increasing steps, got "
                             f"{self.steps}")
        if self.n_features <= self.d_model:
            raise ValueError(f"n_features {self.n_features} must exceed d_model {self.d_model}")
        if not 0 < self.min_rate <= self.max_rate <= 1:
            raise ValueError(f"need 0 < min_rate <= max_rate <= 1, got {self.min_rate}, "
                             f"{self.max_rate}")
        if not 0 <= self.late_min_rate <= 1:
            raise ValueError(f"late_min_rate must lie in [0, 1], got {self.late_min_rate}")
        if not 0 < self.birth_ramp <= 1:
            raise ValueError(f"birth_ramp must lie in (0, 1], got {self.birth_ramp}")
        if not 0 < self.min_direction_cosine <= 1:
            raise ValueError(f"min_direction_cosine must lie in (0, 1], got "
                             f"{self.min_direction_cosine}")
        if not 0 <= self.checkpoint_noise <= 1:
            raise ValueError(f"checkpoint_noise must lie in [0, 1], got {self.checkpoint_noise}")
        if not 0 <= self.magnitude_spread < 1:
            raise ValueError(f"magnitude_spread must lie in [0, 1), got {self.magnitude_spread}")
        n_present = self.n_present
        if n_present <= self.mid_deaths + self.last_deaths:
            raise ValueError(f"{n_present} features present from init cannot supply "
                             f"{self.mid_deaths + self.last_deaths} deaths")
        if self.n_features - n_present < 2 * (n - 1):
            raise ValueError(
                f"{self.n_features - n_present} born features cannot give at least two births at "
                f"each of the {n - 1} checkpoints after the first; add features or lower "
                "present_fraction")

    @property
    def n_present(self) -> int:
        return max(1, round(self.present_fraction * self.n_features))

    @property
    def n_tokens(self) -> int:
        return self.sequences * self.positions


class Match(NamedTuple):
    learned: int  # index into the learned directions (a row, not a feature id)
    cosine: float


@dataclass(frozen=True, eq=False)
class PlantedRun:
    """The truth of one planted run. Arrays are indexed by planted feature 0 .. n_features-1."""

    config: PlantedConfig
    directions: np.ndarray  # [n_features, d_model] final unit directions
    checkpoint_directions: np.ndarray  # [n_checkpoints, n_features, d_model] unit, drifting
    firing_probability: np.ndarray  # [n_features] full firing probability
    magnitude_scale: np.ndarray  # [n_features]
    birth_index: tuple[int | None, ...]  # None: present from the first checkpoint
    death_index: tuple[int | None, ...]  # None: never dies
    sequence_id: np.ndarray = field(repr=False)  # [n_tokens], the same at every checkpoint
    position: np.ndarray = field(repr=False)
    token_id: np.ndarray = field(repr=False)

    @property
    def steps(self) -> tuple[int, ...]:
        return self.config.steps

    @property
    def n_checkpoints(self) -> int:
        return len(self.config.steps)

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def n_tokens(self) -> int:
        return self.config.n_tokens

    @property
    def present_from_init(self) -> list[int]:
        return [f for f, b in enumerate(self.birth_index) if b is None]

    @property
    def born(self) -> dict[int, int]:
        """Planted feature -> checkpoint index of its birth (>= 1)."""
        return {f: b for f, b in enumerate(self.birth_index) if b is not None}

    @property
    def deaths(self) -> dict[int, int]:
        """Planted feature -> checkpoint index of its death (absent from there on)."""
        return {f: d for f, d in enumerate(self.death_index) if d is not None}

    def alive(self, c: int) -> np.ndarray:
        """[n_features] bool: present at checkpoint index c."""
        self._check_index(c)
        return np.array([(b is None or c >= b) and (d is None or c < d)
                         for b, d in zip(self.birth_index, self.death_index)])

    def probabilities(self, c: int) -> np.ndarray:
        """[n_features] planted firing probability at checkpoint index c (0 where absent, reduced
        by birth_ramp at the birth checkpoint)."""
        ramp = np.array([self.config.birth_ramp if b == c else 1.0 for b in self.birth_index])
        return np.where(self.alive(c), self.firing_probability * ramp, 0.0)

    def expected_l0(self, c: int) -> float:
        """Expected number of active planted features per token at checkpoint index c."""
        return float(self.probabilities(c).sum())

    @property
    def mean_l0(self) -> float:
        """Expected active features per token over all checkpoints pooled with equal tokens, as
        shared-feature-fit pools them: the L0 a dictionary of the true features would have."""
        return float(np.mean([self.expected_l0(c) for c in range(self.n_checkpoints)]))

    def codes(self, c: int) -> np.ndarray:
        """[n_tokens, n_features] float32 planted coefficients at checkpoint index c: zero where a
        feature is silent, its magnitude where it fires."""
        self._check_index(c)
        cfg = self.config
        # One fixed uniform per (token, feature): a feature fires on the same tokens throughout,
        # with the same strength (its scale times a fixed factor per token).
        rng = np.random.default_rng([cfg.seed, 1])
        u = rng.random((self.n_tokens, self.n_features))
        factor = rng.uniform(1 - cfg.magnitude_spread, 1 + cfg.magnitude_spread,
                             (self.n_tokens, self.n_features))
        fires = u < self.probabilities(c)
        return np.where(fires, factor * self.magnitude_scale, 0.0).astype(np.float32)

    def activations(self, c: int) -> np.ndarray:
        """[n_tokens, d_model] float32 activations of checkpoint index c: the codes times the
        checkpoint's (drifted) directions, plus isotropic noise (a part fixed per token, a part
        drawn afresh at every checkpoint, `checkpoint_noise` of its variance)."""
        cfg = self.config
        codes = self.codes(c).astype(np.float64)
        shape = (self.n_tokens, cfg.d_model)
        fixed = np.random.default_rng([cfg.seed, 3]).standard_normal(shape)
        fresh = np.random.default_rng([cfg.seed, 3, c]).standard_normal(shape)
        noise = (math.sqrt(1 - cfg.checkpoint_noise) * fixed
                 + math.sqrt(cfg.checkpoint_noise) * fresh)
        x = codes @ self.checkpoint_directions[c] + cfg.noise_std * noise
        return x.astype(np.float32)

    def write_checkpoint(self, c: int, path: str | Path) -> Path:
        """Checkpoint index c as a Parquet file `featurestore register-activations` accepts."""
        values = self.activations(c)
        path = Path(path)
        pq.write_table(pa.table({
            "activations": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)),
                                                             self.config.d_model),
            "sequence_id": self.sequence_id,
            "position": self.position,
            "token_id": self.token_id,
            "split": pa.array(["synthetic"] * self.n_tokens),
        }), path)
        return path

    def _check_index(self, c: int) -> None:
        if not 0 <= c < self.n_checkpoints:
            raise IndexError(f"checkpoint index {c} outside 0 .. {self.n_checkpoints - 1}")


def generate(config: PlantedConfig | None = None) -> PlantedRun:
    """The planted truth of `config` (deterministic from config.seed)."""
    cfg = config or PlantedConfig()
    n, f_count, d = len(cfg.steps), cfg.n_features, cfg.d_model
    rng = np.random.default_rng([cfg.seed, 0])

    directions = rng.standard_normal((f_count, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # A drift axis per feature, orthogonal to its final direction; the angle to the final
    # direction shrinks linearly in checkpoint index from arccos(min cosine) to 0.
    axes = rng.standard_normal((f_count, d))
    axes -= (axes * directions).sum(axis=1, keepdims=True) * directions
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = math.acos(cfg.min_direction_cosine) * (1 - np.arange(n) / (n - 1))
    checkpoint_directions = (np.cos(angles)[:, None, None] * directions[None]
                             + np.sin(angles)[:, None, None] * axes[None])

    rates = np.exp(rng.uniform(math.log(cfg.min_rate), math.log(cfg.max_rate), f_count))
    scales = np.exp(cfg.scale_sigma * rng.standard_normal(f_count))

    # Which feature does what: a random order, so ids carry no schedule.
    order = rng.permutation(f_count)
    present, born = order[: cfg.n_present], order[cfg.n_present:]
    birth: list[int | None] = [None] * f_count
    death: list[int | None] = [None] * f_count
    for i, feature in enumerate(born):
        birth[feature] = 1 + i % (n - 1)  # every index 1 .. n-1, at least twice each
    middle = np.linspace(n // 3, (2 * n) // 3, cfg.mid_deaths).round().astype(int)
    for feature, index in zip(present, middle):
        death[feature] = int(index)
    for feature in present[cfg.mid_deaths: cfg.mid_deaths + cfg.last_deaths]:
        death[feature] = n - 1
    earliest = [feature for feature in born if birth[feature] == 1]
    for feature in earliest[: cfg.born_deaths]:
        death[feature] = n // 2 + 1
    # A pooled dictionary sees a feature born at checkpoint n-1 in 1 / (2n) of its tokens' worth;
    # rarer than this, no dictionary of this size learns it, which would test the fit, not births.
    late = [feature for feature in born if birth[feature] >= n - 2]
    rates[late] = np.maximum(rates[late], cfg.late_min_rate)

    sequence_id = np.repeat(np.arange(cfg.sequences, dtype=np.int64), cfg.positions)
    position = np.tile(np.arange(cfg.positions, dtype=np.int32), cfg.sequences)
    token_id = np.random.default_rng([cfg.seed, 4]).integers(0, cfg.vocab, cfg.n_tokens)
    return PlantedRun(
        config=cfg, directions=directions, checkpoint_directions=checkpoint_directions,
        firing_probability=rates, magnitude_scale=scales,
        birth_index=tuple(birth), death_index=tuple(death),
        sequence_id=sequence_id, position=position, token_id=token_id.astype(np.int64),
    )


def match_features(truth_directions: np.ndarray, learned_directions: np.ndarray) -> list[Match]:
    """For each planted direction (row of truth_directions), the learned row whose direction has
    the largest cosine with it, and that cosine. Several planted features may match one learned
    feature (a dictionary that merged them); all-zero learned rows never match."""
    truth = np.asarray(truth_directions, dtype=np.float64)
    learned = np.asarray(learned_directions, dtype=np.float64)
    if truth.ndim != 2 or learned.ndim != 2 or truth.shape[1] != learned.shape[1]:
        raise ValueError(f"directions must be 2-D with equal widths, got {truth.shape} and "
                         f"{learned.shape}")
    truth = truth / np.maximum(np.linalg.norm(truth, axis=1, keepdims=True), 1e-12)
    norms = np.linalg.norm(learned, axis=1, keepdims=True)
    cosines = truth @ (learned / np.maximum(norms, 1e-12)).T
    cosines[:, norms[:, 0] == 0] = -np.inf
    best = cosines.argmax(axis=1)
    return [Match(int(j), float(cosines[i, j])) for i, j in enumerate(best)]


# A planted feature counts as well matched from this decoder cosine up.
WELL_MATCHED_COSINE = 0.9


@dataclass(frozen=True)
class BirthScore:
    """How one birth rule's `births` rows of one basis agree with the planted truth."""

    births_planted: int  # features born at index >= 1
    births_within_one: int  # of those, detected within one checkpoint (censored ones included)
    births_censored: int  # of those detected, flagged birth_censored
    born_well_matched: int  # born features matched at cosine >= WELL_MATCHED_COSINE
    births_well_matched: int  # of those, detected within one checkpoint
    init_planted: int  # features present from the first checkpoint
    init_flagged: int  # of those, flagged present_at_init
    late_flagged_at_init: int  # born features flagged present_at_init
    deaths_planted: int
    deaths_within_one: int  # planted deaths detected within one checkpoint
    extra_births: int  # births of learned features that are no planted feature's best match
    match_cosine_mean: float
    match_cosine_min: float

    @property
    def births_share(self) -> float:
        return self.births_within_one / self.births_planted

    @property
    def init_share(self) -> float:
        return self.init_flagged / self.init_planted

    @property
    def late_at_init_share(self) -> float:
        return self.late_flagged_at_init / self.births_planted

    def to_dict(self) -> dict:
        return {**asdict(self), "births_share": self.births_share,
                "init_share": self.init_share, "late_at_init_share": self.late_at_init_share}


def score_births(run: PlantedRun, matches: dict[int, tuple[int, float]],
                 births: dict[int, dict]) -> BirthScore:
    """Score one rule's births against the truth. matches: planted feature -> (learned feature
    id, cosine), e.g. from match_features; births: learned feature id -> its `births` row (a
    dict with birth_step, present_at_init, death_step and, where stored, birth_censored)."""
    index = {step: j for j, step in enumerate(run.steps)}

    def row(feature: int) -> dict:
        return births[matches[feature][0]]

    def within_one(step: int | None, truth: int) -> bool:
        return step is not None and abs(index[step] - truth) <= 1

    found = {f: not row(f)["present_at_init"] and within_one(row(f)["birth_step"], b)
             for f, b in run.born.items()}
    well = [f for f in run.born if matches[f][1] >= WELL_MATCHED_COSINE]
    matched = {learned for learned, _ in matches.values()}
    cosines = [cosine for _, cosine in matches.values()]
    return BirthScore(
        births_planted=len(run.born),
        births_within_one=sum(found.values()),
        births_censored=sum(bool(row(f).get("birth_censored")) for f, ok in found.items() if ok),
        born_well_matched=len(well),
        births_well_matched=sum(found[f] for f in well),
        init_planted=len(run.present_from_init),
        init_flagged=sum(bool(row(f)["present_at_init"]) for f in run.present_from_init),
        late_flagged_at_init=sum(bool(row(f)["present_at_init"]) for f in run.born),
        deaths_planted=len(run.deaths),
        deaths_within_one=sum(within_one(row(f)["death_step"], d) for f, d in run.deaths.items()),
        extra_births=sum(r["birth_step"] is not None for f, r in births.items()
                         if f not in matched),
        match_cosine_mean=float(np.mean(cosines)),
        match_cosine_min=float(min(cosines)),
    )
