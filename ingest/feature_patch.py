"""`featurestore feature-patch`: is a feature causally important at a checkpoint?

The target checkpoint's model runs through nnsight. At the basis's stage its activations x are
encoded in the basis (f_target), and for a feature set S the site is overwritten with

    x' = x - decode(f_target[S]) + decode(f_new[S])  =  x + (f_new[S] - f_target[S]) W_dec[S]

(in raw units: the basis works in normalised units, x times the checkpoint's norm scale), so the
error term x - x_hat stays exactly as it was. f_new is the source checkpoint's activations on the
same tokens (patch), zero (zero), the feature's mean activation at the target (mean), or the
target's activations times --scale (scale). The rest of the model then runs on x'.

Every selected feature is patched alone, and the whole selection together. For each split the
job measures loss, accuracy, KL divergence from the clean next-token distribution and, for demo
tasks, the logit difference of the correct answer; every row also carries what the
approximation costs at that site (relative reconstruction error, the error term's share of the
norm, and the loss change of splicing the full reconstruction in), so an effect can be judged
against it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from featurestore import ranges
from featurestore.activations import check_finite
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.feature_ids import parse_features
from featurestore.ingest.feature_compare import DEFAULT_RANK_BY, RANK_BY
from featurestore.resources import TOKEN_BYTES, require_memory
from featurestore.results import Result
from featurestore.text_table import format_cell, format_table
from featurestore.warehouse import Warehouse
from featurestore.writer import utc_now

if TYPE_CHECKING:  # torch is imported when a job runs, not when the CLI starts
    import torch

MODES = ("patch", "zero", "mean", "scale")
METRICS = ("loss", "accuracy", "kl_divergence", "logit_diff")
DEFAULT_FEATURES = "top:5"


@dataclass
class PatchResult(Result):
    basis: str
    stage: str
    source_step: int
    target_step: int
    mode: str
    scale: float | None
    features: list[int]
    splits: list[str]
    n_tokens: int  # tokens run through the model, all splits together
    rows: int  # rows written to patches
    seconds: float
    tokens_per_second: float  # tokens x (feature sets + the spliced reconstruction) / seconds
    recon_rel_error: dict[str, float] = field(default_factory=dict)  # per split
    spliced_loss_delta: dict[str, float] = field(default_factory=dict)  # per split
    top: list[dict] = field(default_factory=list)  # the largest |loss delta| rows

    def summary(self) -> str:
        return "\n".join([
            f"basis {self.basis!r} at {self.stage}: features {self.features} of step "
            f"{self.target_step} patched ({self.mode}) on {self.n_tokens} tokens; {self.rows} rows "
            f"in patches ({self.tokens_per_second:,.0f} tokens/s).",
            "site reconstruction, per split: " + ", ".join(
                f"{s} rel. error {self.recon_rel_error[s]:.3f}, spliced loss delta "
                f"{self.spliced_loss_delta[s]:+.4f}" for s in self.splits),
            "largest loss changes:",
            format_table(["features", "split", "clean", "patched", "delta"],
                         [[r["feature_set"], r["split"], format_cell(r["clean"]),
                           format_cell(r["patched"]), format_cell(r["delta"])] for r in self.top])])


@dataclass
class PatchTokens:
    """The token sequences to run, by split, and which next-token predictions are graded."""

    tokens: dict[str, torch.Tensor]  # split -> LongTensor[n, n_ctx]
    graded: dict[str, torch.Tensor]  # split -> BoolTensor[n, n_ctx - 1]
    has_task: bool  # demo task: graded positions and a logit-difference metric exist


def feature_patch(basis: str, source: int, target: int, features: str = DEFAULT_FEATURES,
                  rank_by: str = DEFAULT_RANK_BY, mode: str = "patch", scale: float | None = None,
                  tokens: int = 2048, splits: str | None = None, seed: int = 0,
                  warehouse: str | None = None, progress: bool = True) -> PatchResult:
    """Patch features of `basis` in the `target` checkpoint's model; store `patches` rows."""
    import torch

    from featurestore.registry import get_checkpoints, get_run
    from featurestore.run_inputs import batch_sequences, open_reader
    from featurestore.shared_basis import load_shared_basis

    started = time.perf_counter()
    _check_options(mode, scale, tokens, seed)
    wh = Warehouse(warehouse)
    with wh.connect() as con:
        shared, sets = load_shared_basis(wh, con, basis)
        shared.require_pooled("--basis")
        steps = shared.steps
        shared.resolve_steps([source], "--source")
        shared.resolve_steps([target], "--target")
        chosen = _choose_features(con, basis, source, target, features, rank_by,
                                  shared.d_hidden)
        means = _mean_activations(con, basis, target, chosen) if mode == "mean" else None
        run = get_run(con, shared.run)
        by_step = {c.step: c for c in get_checkpoints(wh, con, shared.run,
                                                      sorted({source, target}))}

    target_reader = open_reader(run, by_step[target])
    target_reader.site(shared.stage)  # a stage the model lacks fails here, before any work
    source_reader = open_reader(run, by_step[source]) if mode == "patch" else None
    c_source, c_target = steps.index(source), steps.index(target)
    # Named in the refusal of a model whose weights give NaN/Inf: every metric would be NaN.
    target_name = f"checkpoint {shared.run}@{target} ({by_step[target].path})"
    source_name = f"checkpoint {shared.run}@{source} ({by_step[source].path})"
    patch_tokens = _patch_tokens(run, sets[c_target], tokens, splits, seed)
    scale_target = shared.checkpoints[c_target].norm_scale
    scale_source = shared.checkpoints[c_source].norm_scale
    decoder = torch.from_numpy(shared.decoder_directions(c_target)).float()  # [h, d]
    feature_sets = [[f] for f in chosen] + ([chosen] if len(chosen) > 1 else [])

    from tqdm import tqdm

    rows, per_split = [], {}
    per_batch = batch_sequences(next(iter(patch_tokens.tokens.values())).shape[1])  # one n_ctx
    total_batches = sum(-(-len(t) // per_batch) for t in patch_tokens.tokens.values())
    bar = tqdm(total=total_batches, desc=f"feature-patch {basis}", unit="batch",
               disable=None if progress else True)
    for split, split_tokens in patch_tokens.tokens.items():
        sums = _SplitSums(len(feature_sets))
        for start in range(0, len(split_tokens), per_batch):
            batch = split_tokens[start:start + per_batch]
            graded = patch_tokens.graded[split][start:start + per_batch]
            x, clean_logits = target_reader.run_with(batch, shared.stage)
            check_finite(x, f"{target_name} at {shared.stage}")
            check_finite(clean_logits, f"{target_name}: its output logits")
            flat = x.reshape(-1, x.shape[-1])
            f_target, x_hat = shared.encode([flat * scale_target], c_target)
            if mode == "patch":
                x_source, _ = source_reader.run_with(batch, shared.stage)
                check_finite(x_source, f"{source_name} at {shared.stage}")
                f_source, _ = shared.encode(
                    [x_source.reshape(-1, x.shape[-1]) * scale_source], c_source)
            x_hat = x_hat / scale_target  # raw units, as the model's own activations
            sums.begin_batch(flat, x_hat, clean_logits, batch, graded)
            _, spliced_logits = target_reader.run_with(batch, shared.stage,
                                                       x_hat.reshape(x.shape))
            sums.add("spliced", spliced_logits)
            for i, feature_set in enumerate(feature_sets):
                old = f_target[:, feature_set]
                if mode == "patch":
                    new = f_source[:, feature_set]
                elif mode == "zero":
                    new = torch.zeros_like(old)
                elif mode == "mean":
                    new = torch.tensor([means[f] for f in feature_set]).expand_as(old)
                else:
                    new = old * scale
                delta = (new - old) @ decoder[feature_set] / scale_target
                _, patched_logits = target_reader.run_with(
                    batch, shared.stage, x + delta.reshape(x.shape))
                sums.add(i, patched_logits)
            bar.update(1)
        per_split[split] = sums
        rows += sums.rows(split, feature_sets, patch_tokens.has_task)
    bar.close()

    created = utc_now()
    for row in rows:
        row.update(basis=basis, source_step=source, target_step=target, mode=mode,
                   scale=scale if mode == "scale" else None, created_at=created)
    with wh.writer(f"feature-patch {basis}") as writer:
        writer.put("patches", rows, replace_where={"basis": basis, "source_step": source,
                                                   "target_step": target, "mode": mode})

    seconds = time.perf_counter() - started
    n_tokens = sum(t.numel() for t in patch_tokens.tokens.values())
    loss_rows = sorted((r for r in rows if r["metric"] == "loss"),
                       key=lambda r: -abs(r["delta"]))
    return PatchResult(
        basis=basis, stage=shared.stage, source_step=source, target_step=target, mode=mode,
        scale=scale if mode == "scale" else None, features=chosen,
        splits=list(patch_tokens.tokens), n_tokens=n_tokens, rows=len(rows), seconds=seconds,
        tokens_per_second=n_tokens * (len(feature_sets) + 1) / seconds,
        recon_rel_error={s: v.recon_rel_error for s, v in per_split.items()},
        spliced_loss_delta={s: v.spliced_loss_delta for s, v in per_split.items()},
        top=[{k: r[k] for k in ("feature_set", "split", "clean", "patched", "delta")}
             for r in loss_rows[:10]])


class _SplitSums:
    """Running sums of one split's metrics: clean, spliced, and per feature set."""

    def __init__(self, n_sets: int):
        self.n_tokens = 0
        self.n_positions = 0  # next-token predictions (n_ctx - 1 per sequence)
        self.n_graded = 0
        self.relative_error = self.error_norm = self.site_norm = 0.0
        keys = [None, "spliced", *range(n_sets)]
        self.loss = dict.fromkeys(keys, 0.0)
        self.correct = dict.fromkeys(keys, 0.0)
        self.kl = dict.fromkeys(keys, 0.0)
        self.logit_diff = dict.fromkeys(keys, 0.0)

    def begin_batch(self, x, x_hat, clean_logits, tokens, graded) -> None:
        """Count a batch's site error and clean metrics; keep what every pass of the batch is
        compared with (the clean next-token distribution, the targets, the graded positions)."""
        import torch.nn.functional as F

        x, error = x.double(), (x - x_hat).double()
        norms, error_norms = x.norm(dim=1), error.norm(dim=1)
        self.n_tokens += len(x)
        self.relative_error += float((error_norms / norms.clamp_min(1e-12)).sum())
        self.error_norm += float(error_norms.sum())
        self.site_norm += float(norms.sum())
        targets = tokens[:, 1:]
        self.n_positions += targets.numel()
        self.n_graded += int(graded.sum())
        self._clean_log_p = F.log_softmax(clean_logits[:, :-1].double(), dim=-1)
        self._targets, self._graded = targets, graded
        self.add(None, clean_logits)

    def add(self, key, logits) -> None:
        """Metrics of one pass of the current batch (key: None clean, "spliced", or a set)."""
        import torch.nn.functional as F

        logits = logits[:, :-1].double()
        targets, graded = self._targets, self._graded
        log_p = F.log_softmax(logits, dim=-1)
        self.loss[key] += float(F.nll_loss(log_p.flatten(0, 1), targets.flatten(),
                                           reduction="sum"))
        self.correct[key] += float(((logits.argmax(-1) == targets) & graded).sum())
        self.kl[key] += float((self._clean_log_p.exp() * (self._clean_log_p - log_p)).sum())
        correct_logit = logits.gather(-1, targets[..., None])[..., 0]
        others = logits.scatter(-1, targets[..., None], float("-inf")).amax(-1)
        self.logit_diff[key] += float(((correct_logit - others) * graded).sum())

    @property
    def recon_rel_error(self) -> float:
        return self.relative_error / self.n_tokens

    @property
    def spliced_loss_delta(self) -> float:
        return (self.loss["spliced"] - self.loss[None]) / self.n_positions

    def metric(self, name: str, key) -> float:
        graded = max(self.n_graded, 1)
        return {"loss": self.loss[key] / self.n_positions,
                "accuracy": self.correct[key] / graded,
                "kl_divergence": self.kl[key] / self.n_positions,
                "logit_diff": self.logit_diff[key] / graded}[name]

    def rows(self, split: str, feature_sets: list[list[int]], has_task: bool) -> list[dict]:
        metrics = METRICS if has_task else METRICS[:3]
        rows = []
        for i, feature_set in enumerate(feature_sets):
            for name in metrics:
                clean, patched = self.metric(name, None), self.metric(name, i)
                rows.append({
                    "feature_set": ",".join(map(str, sorted(feature_set))),
                    "feature_ids": sorted(feature_set), "split": split, "metric": name,
                    "clean": clean, "patched": patched, "delta": patched - clean,
                    "recon_rel_error": self.recon_rel_error,
                    "error_norm_share": self.error_norm / self.site_norm,
                    "spliced_loss_delta": self.spliced_loss_delta, "n_tokens": self.n_tokens,
                })
        return rows


def _check_options(mode: str, scale: float | None, tokens: int, seed: int) -> None:
    if mode not in MODES:
        raise FeaturestoreError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "scale" and scale is None:
        raise FeaturestoreError("--mode scale needs --scale A (the factor, e.g. 2 or -1)")
    if mode != "scale" and scale is not None:
        raise FeaturestoreError(f"--scale is only used by --mode scale, not --mode {mode}")
    if scale is not None:
        ranges.ANY.check(scale, "--scale")
    ranges.COUNT.check(tokens, "--tokens")
    require_memory("--tokens", tokens, tokens * TOKEN_BYTES, "holding the token sequences")
    ranges.SEED.check(seed, "--seed")


def _choose_features(con, basis: str, source: int, target: int, features: str, rank_by: str,
                     n_features: int) -> list[int]:
    """Explicit ids, or the top N of the pair's `diffs` ranking."""
    choice = parse_features(features, basis, n_features)
    if choice.ids is not None:
        return choice.ids
    if rank_by not in RANK_BY:
        raise FeaturestoreError(f"--rank-by {rank_by!r}: choose one of {', '.join(RANK_BY)}")
    chosen = [f for (f,) in con.execute(
        f"SELECT feature_id FROM diffs WHERE basis = ? AND source_step = ? AND "
        f"target_step = ? ORDER BY {RANK_BY[rank_by]} LIMIT ?",
        [basis, source, target, choice.top]).fetchall()]
    if not chosen:
        raise NotFoundError(
            f"--features {features}: no diffs for basis {basis} from step {source} to "
            f"{target}; run `featurestore feature-compare --basis {basis} --source {source} "
            f"--target {target}` first, or give feature ids (--features 3,17)")
    return chosen


def _mean_activations(con, basis: str, target: int, chosen: list[int]) -> dict[int, float]:
    found = dict(con.execute(
        "SELECT feature_id, mean_activation FROM trajectories WHERE basis = ? AND step = ? "
        "AND list_contains(?, feature_id)", [basis, target, chosen]).fetchall())
    if len(found) < len(chosen):
        raise NotFoundError(
            f"--mode mean reads trajectories.mean_activation at step {target}, but basis {basis} "
            f"has no trajectory rows there; run `featurestore feature-trajectory-sweep --basis "
            f"{basis}` first")
    return found


def _patch_tokens(run, acts, n_tokens: int, splits: str | None, seed: int) -> PatchTokens:
    """Runs trained here: fresh sequences of each split of their task. Other runs: the target
    checkpoint's activation set's own token sequences (the tokens the basis was swept on)."""
    import torch

    wanted = None if splits is None else [s.strip() for s in splits.split(",") if s.strip()]
    if run.task_config is not None:
        from featurestore.tasks import task_from_config

        task = task_from_config(run.task_config)
        wanted = wanted or list(task.DEFAULT_SPLITS)
        unknown = [s for s in wanted if s not in task.SPLITS]
        if unknown:
            raise FeaturestoreError(f"--splits: unknown split {', '.join(unknown)}; valid "
                                    f"splits: {', '.join(task.SPLITS)}")
        per_split = max(1, -(-n_tokens // (task.n_ctx * len(wanted))))
        batches = {s: task.sample(s, per_split, seed) for s in wanted}
        return PatchTokens({s: b.tokens for s, b in batches.items()},
                           {s: b.scored[:, :-1] for s, b in batches.items()}, has_task=True)

    token_ids, split_of = acts.token_columns().sequences(acts.name, "feature-patch")
    length = token_ids.shape[1]
    names = wanted or sorted(set(split_of))
    unknown = [s for s in names if s not in set(split_of)]
    if unknown:
        raise FeaturestoreError(f"--splits: {', '.join(unknown)} not in activation set "
                                f"{acts.name}; its splits: {', '.join(sorted(set(split_of)))}")
    per_split = max(1, -(-n_tokens // (length * len(names))))
    tokens = {s: torch.from_numpy(token_ids[split_of == s][:per_split].copy()) for s in names}
    graded = {s: torch.ones(len(t), length - 1, dtype=torch.bool) for s, t in tokens.items()}
    return PatchTokens(tokens, graded, has_task=False)

