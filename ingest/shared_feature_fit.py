"""`featurestore shared-feature-fit`: one shared feature basis for one stage of one run.

Pools the stage's activations from the listed checkpoints (equal tokens per checkpoint, each
checkpoint normalised by its own norm scale), trains a dictionary on them with the crosscoder
trainer, checks that the fit is good enough to support claims about features, and registers it:
the weights under warehouse/bases/<name>/, rows in `bases` (with the fit-quality report),
`features`, `decoder_directions` and `training_metrics`. A fit that fails a quality bound
(featurestore.fit_quality, the policy train-crosscoder applies too) is reported, bound by bound,
registers nothing, and is kept under warehouse/rejected/<name>/ for inspection.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from featurestore import ranges
from featurestore.dictionary_kinds import BASIS_KINDS
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.fit_quality import REJECTED_DIR, FitBounds, reject_fit, rejected_path
from featurestore.results import Result
from featurestore.settings import check_name
from featurestore.warehouse import Warehouse, derived_from_basis
from featurestore.writer import utc_now

MIN_CHECKPOINTS = 3
EVAL_TOKENS_PER_CHECKPOINT = 16_384
EVAL_BATCH = 4096
MATCH_COSINE = 0.9  # features of two seeds' bases count as the same above this decoder cosine
# How checkpoints are weighted in a pooled fit (see checkpoint_weights), and the step-0
# checkpoint's weight on top of that.
WEIGHTINGS = ("novelty", "equal")
DEFAULT_WEIGHTING = "equal"
DEFAULT_INIT_WEIGHT = 1.0
NOVELTY_TOKENS = 4096  # tokens compared between consecutive checkpoints
MIN_NOVELTY_WEIGHT = 0.05  # every checkpoint adds something to the fit
# Above this share of the dictionary active at the first checkpoint and silent at the last,
# the fit says so.
FIRST_NOT_LAST_WARNING = 0.25


@dataclass
class SharedFitResult(Result):
    name: str
    run: str
    stage: str
    kind: str
    arch: str
    steps_fitted: list[int]
    d_hidden: int
    fit_quality: dict
    stability: float | None
    seconds: float
    seeds: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The fit in one line; `warnings` are not part of it (the CLI prints them to stderr)."""
        quality = self.fit_quality
        explained = quality["explained_variance"].values()
        stability = "" if self.stability is None else f", stability {self.stability:.2f}"
        return (f"basis {self.name!r}: {self.kind} {self.arch}, {self.d_hidden} features "
                f"over {len(self.steps_fitted)} checkpoints of {self.run} at {self.stage}; "
                f"explained variance {min(explained):.3f}-{max(explained):.3f}, "
                f"L0 {quality['l0']:.1f}, dead {quality['dead_fraction']:.1%}{stability} "
                f"({self.seconds:.1f}s)")


def shared_feature_fit(
    run: str,
    stage: str,
    name: str,
    checkpoints: str = "all",
    kind: str = "pooled",
    arch: str = "batchtopk",
    k: int = 32,
    dict_size: int | None = None,
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float | None = None,
    l1_coeff: float | None = None,
    l0_coeff: float | None = None,
    norm_loss_fraction: float | None = None,
    jumprelu_bandwidth: float | None = None,
    group_sizes: Sequence[int] | None = None,
    seeds: int = 1,
    seed: int = 0,
    weighting: str = DEFAULT_WEIGHTING,
    init_weight: float = DEFAULT_INIT_WEIGHT,
    min_explained_variance: float = FitBounds.min_explained_variance,
    max_active_fraction: float = FitBounds.max_active_fraction,
    max_dead_fraction: float = FitBounds.max_dead_fraction,
    warehouse: str | None = None,
    progress: bool = True,
) -> SharedFitResult:
    import torch

    from featurestore.aligned import AlignedActivations, PooledActivations
    from featurestore.crosscoder import CrossCoder, CrossCoderConfig
    from featurestore.crosscoder_training import (
        TrainerConfig,
        require_training_memory,
        train_crosscoder,
    )
    from featurestore.ingest.train_crosscoder import ArchOptions, basis_k, default_aux_k
    from featurestore.shared_basis import seed_folder

    check_name(name, "basis name")
    if kind not in BASIS_KINDS:
        raise FeaturestoreError(f"--kind must be pooled or crosscoder, got {kind!r}")
    ranges.COUNT.check(k, "--k")
    if dict_size is not None:
        ranges.COUNT.check(dict_size, "--dict-size")
    arch_options = ArchOptions.checked(arch, jumprelu_bandwidth, group_sizes, dict_size)
    if seeds < 1:
        raise FeaturestoreError(f"--seeds must be at least 1, got {seeds}")
    if ranges.SEED.contains(seed) and seed + seeds - 1 > ranges.MAX_SEED:
        raise FeaturestoreError(
            f"--seed {seed} --seeds {seeds}: the seeds {seed}..{seed + seeds - 1} go past "
            f"{ranges.MAX_SEED}, the largest seed")
    defaults = TrainerConfig()
    # Every trainer setting is checked here, before any work.
    trainer = TrainerConfig(
        steps=steps, batch_size=batch_size, lr=lr if lr is not None else defaults.lr,
        l1_coeff=l1_coeff if l1_coeff is not None else defaults.l1_coeff,
        l0_coeff=l0_coeff if l0_coeff is not None else defaults.l0_coeff,
        norm_loss_fraction=(norm_loss_fraction if norm_loss_fraction is not None
                            else defaults.norm_loss_fraction),
        log_every=max(1, min(50, steps)), save_every=steps + 1, seed=seed)
    if weighting not in WEIGHTINGS:
        raise FeaturestoreError(
            f"--weighting {weighting!r}: use novelty (each checkpoint weighted by how much its "
            "activations changed since the one before) or equal")
    if not 0 <= init_weight <= 1:
        raise FeaturestoreError(
            f"--init-weight {init_weight}: give a share in [0, 1] of the tokens the step-0 "
            "checkpoint contributes to the fit (1: as many as every other checkpoint, 0: none)")
    bounds = FitBounds(min_explained_variance, max_active_fraction, max_dead_fraction)
    started = time.perf_counter()
    wh = Warehouse(warehouse)
    with wh.writer(f"shared-feature-fit {name}") as writer:
        with wh.connect() as con:
            chosen = resolve_checkpoints(wh, con, run, stage, checkpoints)
        sources = [source for source, _ in chosen]
        steps_chosen = [row["step"] for _, row in chosen]
        d_model = sources[0].activations.d_model
        require_training_memory(1 if kind == "pooled" else len(sources), d_model,
                                dict_size or 16 * d_model, batch_size)
        if kind == "pooled":
            weights = checkpoint_weights(sources, steps_chosen, weighting, init_weight)
            data = PooledActivations(sources, seed=seed, weights=weights)
        else:
            weights = [1.0] * len(sources)  # a crosscoder's code is joint: every step, every row
            data = AlignedActivations(sources, seed=seed)
        try:
            d_hidden = dict_size or 16 * data.d_model
            config = CrossCoderConfig(
                n_sources=len(data.labels), d_model=data.d_model, d_hidden=d_hidden, k=k,
                aux_k=default_aux_k(arch, k), source_labels=tuple(data.labels),
                **arch_options.config_fields(d_hidden))
        except ValueError as error:
            raise FeaturestoreError(f"shared-feature-fit: {error}") from None

        models, results = [], []
        for offset in range(seeds):
            torch.manual_seed(seed + offset)
            model = CrossCoder(config, data.norm_scales)
            seeded = dataclasses.replace(trainer, seed=seed + offset)
            results.append(train_crosscoder(model, data.with_seed(seed + offset), seeded,
                                            writer.tmp_dir / f"fit-{offset}",
                                            progress=progress))
            models.append(model)
        model, result = models[0], results[0]

        from featurestore.shared_basis import BasisCheckpoint, SharedBasis

        basis = SharedBasis(name, kind, run, stage, model,
                            [BasisCheckpoint(row["step"], row["name"], row["norm_scale"])
                             for _, row in chosen])
        report, stats = fit_report(basis, sources)
        report["bounds"] = asdict(bounds)
        report["checkpoint_weights"] = {str(step): w for step, w in zip(steps_chosen, weights)}
        report["unfitted_steps"] = [str(step) for step, w in zip(steps_chosen, weights)
                                    if w == 0]
        failed = bounds.failures(report, "step", report["unfitted_steps"])
        if failed:
            def save_weights(folder):
                model.save(folder)
                for offset, other in enumerate(models[1:], start=1):
                    other.save(folder / seed_folder(seed + offset))

            reject_fit(wh, "shared-feature-fit", name, report, failed, save_weights, {
                "run": run, "stage": stage, "kind": kind, "config": config.to_dict(),
                "trainer_config": trainer.to_dict(), "seeds": list(range(seed, seed + seeds))},
                advice="Train longer (--steps) or change the dictionary (--dict-size, --k, "
                       "--l1-coeff, --l0-coeff).")
        stability = seed_stability(models) if seeds > 1 else None

        from featurestore.ingest.train_crosscoder import (
            direction_rows,
            feature_rows,
            training_metric_rows,
        )

        staged = writer.stage_dir(f"bases/{name}")
        relative = writer.versioned(f"bases/{name}")
        model.save(staged)
        # The other seeds' weights go with the basis: the sweep encodes every checkpoint in them
        # too, so that feature-birth-analyze can say how far births agree across seeds.
        for offset, other in enumerate(models[1:], start=1):
            other.save(staged / seed_folder(seed + offset))
        if rejected_path(wh, name).exists():  # an earlier rejected fit is superseded
            writer.remove_dir(f"{REJECTED_DIR}/{name}")
        writer.put("bases", [{
            "name": name, "kind": kind, "arch": arch, "n_sources": config.n_sources,
            "d_model": data.d_model, "d_hidden": config.d_hidden,
            "k": basis_k(arch, k),
            "sources": [{"label": f"step_{row['step']}", "activation_set": row["name"],
                         "run": run, "step": row["step"], "stage": stage,
                         "norm_scale": float(row["norm_scale"])} for _, row in chosen],
            "config": json.dumps(config.to_dict()),
            "trainer_config": json.dumps(trainer.to_dict()),
            "path": relative, "steps": result.steps, "tokens": result.tokens,
            "final_metrics": json.dumps(result.final), "run": run, "stage": stage,
            "fit_quality": json.dumps(report), "stability": stability,
            "seeds": list(range(seed, seed + seeds)), "created_at": utc_now(),
        }])
        writer.put("features", feature_rows(name, model, stats), replace_where={"basis": name})
        writer.put("decoder_directions", direction_rows(name, model),
                   replace_where={"basis": name})
        writer.put("training_metrics", training_metric_rows(name, result.metrics),
                   replace_where={"basis": name})
        # A basis of this name may have been analysed before: every row computed from its old
        # weights (sweeps, births, diffs, patches, lineage) goes in the same commit.
        for table, where in derived_from_basis(name):
            writer.put(table, [], replace_where=where)
    warnings = []
    share = report["first_not_last_share"]
    if share > FIRST_NOT_LAST_WARNING:
        warnings.append(
            f"{share:.0%} of the dictionary fires at the first checkpoint (step "
            f"{steps_chosen[0]}) and never at the last: features the model had at the start and "
            "lost. They are real features of those checkpoints, and birth-analyze will count "
            "them present at init; if they crowd out what you study, compare a fit with "
            "--weighting novelty or --init-weight 0.")
    return SharedFitResult(name, run, stage, kind, arch, steps_chosen, config.d_hidden, report,
                           stability, time.perf_counter() - started,
                           list(range(seed, seed + seeds)), warnings)


def checkpoint_weights(sources, steps: list[int], weighting: str, init_weight: float
                       ) -> list[float]:
    """The share of its tokens each checkpoint adds to a pooled fit.

    equal: every checkpoint all of them. novelty: checkpoint c in proportion to how far its
    activations moved since checkpoint c-1 on the same tokens, mean ||x_c - x_c-1|| / mean
    ||x_c|| (normalised units), relative to the checkpoint that moved most; the first checkpoint
    counts as new. Log-spaced checkpoints crowd the start of training, where the model has
    barely moved from its initialisation: with equal weights, four checkpoints of a near-random
    model take a quarter of the dictionary, spent on features that die as training starts.
    Then the step-0 checkpoint's weight is multiplied by init_weight.
    """
    weights = [1.0] * len(sources)
    if weighting == "novelty":
        n = len(sources[0].activations)
        sample = np.unique(np.linspace(0, n - 1, min(n, NOVELTY_TOKENS)).astype(np.int64))
        rows = [source.activations.rows(sample, normalized=True).astype(np.float64)
                for source in sources]
        moved = [float(np.linalg.norm(b - a, axis=1).mean()
                       / max(np.linalg.norm(b, axis=1).mean(), 1e-12))
                 for a, b in zip(rows, rows[1:])]
        most = max(moved) if moved and max(moved) > 0 else 1.0
        weights = [1.0] + [max(m / most, MIN_NOVELTY_WEIGHT) for m in moved]
    return [w * init_weight if step == 0 else w for w, step in zip(weights, steps)]


def resolve_checkpoints(wh, con, run: str, stage: str, spec: str) -> list[tuple]:
    """(Source, activation_sets row) per checkpoint, in step order, after checking them: one
    run, no duplicates, at least three, the stage collected at each."""
    from featurestore.aligned import Source
    from featurestore.registry import (
        get_checkpoints,
        get_stage_activation_sets,
        open_activation_set,
        parse_steps,
    )

    steps = []
    for part in spec.split(",") if spec.strip().lower() != "all" else []:
        other, sep, step = part.strip().rpartition("@")
        if sep and other != run:
            raise FeaturestoreError(
                f"--checkpoints: {part.strip()!r} belongs to run {other!r}, not --run {run}; a "
                "shared basis pools checkpoints of one run")
        steps.append(step if sep else part.strip())
    step_list = parse_steps(",".join(steps)) if steps else None
    checkpoints = get_checkpoints(wh, con, run, step_list)
    if len(checkpoints) < MIN_CHECKPOINTS:
        raise FeaturestoreError(
            f"--checkpoints: a shared basis needs at least {MIN_CHECKPOINTS} checkpoints, got "
            f"{len(checkpoints)} ({', '.join(str(c.step) for c in checkpoints)})")
    rows = get_stage_activation_sets(con, run, stage)
    missing = [c.step for c in checkpoints if c.step not in rows]
    if missing:
        if not rows:
            stages = [s for (s,) in con.execute(
                "SELECT DISTINCT stage FROM activation_sets WHERE run = ? ORDER BY 1",
                [run]).fetchall()]
            raise NotFoundError(
                f"--stage {stage}: run {run!r} has no activation sets at this stage (collected "
                f"stages: {', '.join(stages) or 'none'}). Collect it with `featurestore collect "
                f"--run {run} --stage {stage}`")
        raise NotFoundError(
            f"--stage {stage} is missing for run {run!r} at step "
            f"{', '.join(map(str, missing))}. Collect it with `featurestore collect --run {run} "
            f"--stage {stage} --checkpoints {','.join(map(str, missing))}` (on the same tokens), "
            "or leave those steps out of --checkpoints")
    return [(Source(f"step_{c.step}", open_activation_set(wh, rows[c.step])), rows[c.step])
            for c in checkpoints]


def fit_report(basis, sources) -> tuple[dict, dict]:
    """Explained variance per checkpoint, L0, active and dead fraction, on up to
    EVAL_TOKENS_PER_CHECKPOINT tokens of each checkpoint; plus the feature statistics (frequency,
    mean and max activation over all of them) for the `features` table. One pass: each batch of
    tokens is read once from every checkpoint and encoded for all of them together."""
    import torch

    from featurestore.shared_basis import ReconstructionSums

    h = basis.d_hidden
    n = min(len(sources[0].activations), EVAL_TOKENS_PER_CHECKPOINT)
    count, total, peak = np.zeros(h), np.zeros(h), np.zeros(h)
    first_count, last_count = np.zeros(h), np.zeros(h)  # firings at the first and last checkpoint
    sums = [ReconstructionSums() for _ in basis.checkpoints]
    for start in range(0, n, EVAL_BATCH):
        index = np.arange(start, min(start + EVAL_BATCH, n))
        rows = [torch.from_numpy(source.activations.rows(index, normalized=True))
                for source in sources]
        for c, (values, x_hat) in enumerate(basis.encode_all(rows)):
            f = values.double().numpy()
            if c == 0:
                first_count += (f > 0).sum(axis=0)
            if c == len(sources) - 1:
                last_count += (f > 0).sum(axis=0)
            count += (f > 0).sum(axis=0)
            total += f.sum(axis=0)
            peak = np.maximum(peak, f.max(axis=0))
            sums[c].add(rows[c].double().numpy(), x_hat.double().numpy())
    seen = n * len(sources)
    l0 = count.sum() / seen
    report = {"explained_variance": {str(checkpoint.step): s.explained_variance
                                     for checkpoint, s in zip(basis.checkpoints, sums)},
              "l0": float(l0), "active_fraction": float(l0 / h),
              "dead_fraction": float((count == 0).mean()), "eval_tokens_per_checkpoint": n,
              # features active at the first checkpoint and silent at the last: what the fit
              # spent on a state of the model that training left behind
              "first_not_last_share": float(((first_count > 0) & (last_count == 0)).mean())}
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
    return report, {"frequency": count / seen, "mean": mean, "max": peak}


def seed_stability(models) -> float:
    """Mean over the other seeds of the share of the first seed's features matched (Hungarian
    assignment on decoder cosine) at cosine >= MATCH_COSINE."""
    shares = [float((match_features(models[0], other)[1] >= MATCH_COSINE).mean())
              for other in models[1:]]
    return float(math.fsum(shares) / len(shares))


def match_features(reference, other) -> tuple[np.ndarray, np.ndarray]:
    """(feature of `reference` paired with each feature of `other`, their decoder cosine): the
    one-to-one assignment (Hungarian) that maximises the summed cosine of the two dictionaries'
    decoders, every source's slice together."""
    from scipy.optimize import linear_sum_assignment

    def unit_decoder(model) -> np.ndarray:
        decoder = model.decoder().detach().double().numpy().reshape(model.config.d_hidden, -1)
        return decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)

    cosine = unit_decoder(other) @ unit_decoder(reference).T
    rows, cols = linear_sum_assignment(cosine, maximize=True)
    matched = np.empty(len(rows), dtype=np.int64)
    matched[rows] = cols
    return matched, cosine[np.arange(len(matched)), matched]
