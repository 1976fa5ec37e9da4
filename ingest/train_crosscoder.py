"""`featurestore train-crosscoder`: train a crosscoder on aligned activation sets, register it.

The sources are either all activation sets (LABEL=SET) or, with --tokens-from, all models
(LABEL=RUN@STEP:STAGE or LABEL=hf:DIR:STAGE) read through an activation buffer while training,
with no activation files written (featurestore.activation_buffer).

Outputs, in one commit: the weights under warehouse/bases/<name>/, and rows in `bases` (with
the fit-quality report), `features` (decoder geometry, activation statistics, latent scaling),
`decoder_directions` and `training_metrics`. The resumable training state lives in
warehouse/training/<name>/ while the job runs (it survives a kill, for --resume) and is removed
once the basis is registered.

A crosscoder that misses a quality bound (featurestore.fit_quality, the policy
shared-feature-fit applies too) registers nothing: its weights and report go to
warehouse/rejected/<name>/, and its training state stays, so --resume with a relaxed bound
registers those same weights without training again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featurestore import ranges
from featurestore.errors import FeaturestoreError, NotFoundError
from featurestore.fit_quality import REJECTED_DIR, FitBounds, reject_fit, rejected_path
from featurestore.results import Result
from featurestore.scratch import TRAINING_FOLDER, Claim
from featurestore.settings import check_name
from featurestore.warehouse import Warehouse, derived_from_basis
from featurestore.writer import utc_now

EVAL_TOKENS = 65_536  # tokens for the feature statistics and latent scaling pass
EVAL_BATCH = 4096
DEFAULT_POOL_BATCHES = 32  # the activation buffer's pool, in training batches


@dataclass
class CrossCoderJobResult(Result):
    name: str
    arch: str
    sources: list[str]
    d_hidden: int
    steps: int
    tokens: int
    final_metrics: dict
    seconds: float
    notes: list[str] = field(default_factory=list)  # about the token file (--tokens-from)

    def summary(self) -> str:
        metrics = self.final_metrics
        return (f"basis {self.name!r}: {self.arch}, {self.d_hidden} latents over "
                f"{', '.join(self.sources)}; {self.steps} steps in {self.seconds:.1f}s; "
                f"explained variance {metrics.get('explained_variance', float('nan')):.3f}, "
                f"L0 {metrics.get('l0_loss', float('nan')):.1f}")


def parse_source(text: str) -> tuple[str, str]:
    label, sep, target = text.partition("=")
    if not sep or not label or not target:
        raise FeaturestoreError(
            f"--source {text!r}: expected LABEL=SET, e.g. base=demo@1800:layer_2_post_mlp, or "
            "with --tokens-from LABEL=RUN@STEP:STAGE or LABEL=hf:DIR:STAGE"
        )
    check_name(label, "source label")
    return label, target


def check_source_kinds(parsed: list[tuple[str, str]], tokens_from: str | None) -> None:
    """One job reads activation sets only, or (with --tokens-from) models only."""
    from featurestore.activation_buffer import is_model_target

    if tokens_from is None:
        models = [f"{label}={target}" for label, target in parsed if target.startswith("hf:")]
        if models:
            raise FeaturestoreError(
                f"--source {models[0]} names a model: training from models needs --tokens-from "
                "(demo, or a tokenized dataset: a .parquet file or datasets folder)")
        return
    sets = [f"{label}={target}" for label, target in parsed
            if Path(target).expanduser().exists() or not is_model_target(target)]
    if sets:
        raise FeaturestoreError(
            f"--source {sets[0]} is not a model (RUN@STEP:STAGE or hf:DIR:STAGE), but "
            "--tokens-from trains from models; a job reads either activation sets or models, "
            "not a mix: give every source as a model, or drop --tokens-from to train on sets")


def resolve_source(wh: Warehouse, con, label: str, target: str):
    """A Source from a registered activation set name, or a path in the activation-set format."""
    from featurestore.activations import ActivationSet, norm_sample, norm_scale
    from featurestore.aligned import Source
    from featurestore.registry import get_activation_set_row, open_activation_set

    path = Path(target).expanduser()
    if path.exists():
        fmt = "parquet" if path.is_file() and path.suffix == ".parquet" else "hf_dataset"
        acts = ActivationSet(path.resolve(), fmt, name=str(path.resolve()))
        if len(acts) == 0:
            raise FeaturestoreError(f"--source {label}={target}: {path.resolve()} holds no rows")
        sample = norm_sample(acts.token_columns().position)
        acts.norm_scale = norm_scale(acts.rows(sample))
        info = {"activation_set": str(path.resolve()), "run": None, "step": None, "stage": None}
        return Source(label, acts), info
    try:
        row = get_activation_set_row(con, target)
    except NotFoundError:
        raise NotFoundError(
            f"--source {label}={target}: no activation set named {target!r} and no such path. "
            "List sets with `featurestore sql \"SELECT name FROM activation_sets\"`, or train "
            "straight from the model with --tokens-from."
        ) from None
    info = {"activation_set": row["name"], "run": row["run"], "step": row["step"],
            "stage": row["stage"]}
    return Source(label, open_activation_set(wh, row)), info


def train_crosscoder_job(
    name: str,
    sources: list[str],
    arch: str = "batchtopk",
    k: int = 32,
    aux_k: int | None = None,
    aux_coeff: float = 1 / 32,
    dict_size: int | None = None,
    steps: int | None = None,
    tokens: int | None = None,
    batch_size: int = 1024,
    lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    l1_coeff: float | None = None,
    l0_coeff: float | None = None,
    norm_loss_fraction: float | None = None,
    jumprelu_bandwidth: float | None = None,
    group_sizes: Sequence[int] | None = None,
    k_anneal_from: int = 0,
    n_shared: int = 0,
    log_every: int = 50,
    save_every: int = 500,
    resume: bool = False,
    seed: int = 0,
    tokens_from: str | None = None,
    pool_batches: int = DEFAULT_POOL_BATCHES,
    epochs: int = 1,
    text_column: str = "text",
    tokenizer: str | None = None,
    seq_len: int | None = None,
    splits: list[str] | tuple[str, ...] | None = None,
    min_explained_variance: float = FitBounds.min_explained_variance,
    max_active_fraction: float = FitBounds.max_active_fraction,
    max_dead_fraction: float = FitBounds.max_dead_fraction,
    wandb: bool = False,
    warehouse: str | None = None,
    progress: bool = True,
) -> CrossCoderJobResult:
    """Train and register a crosscoder. With tokens_from the sources are models, `tokens`
    bounds the token stream (each token used once per epoch, `epochs` times) and the pool holds
    pool_batches batches. The fit must reach the bounds (featurestore.fit_quality). arch is one
    of featurestore.crosscoder.ARCHS; l0_coeff and jumprelu_bandwidth are JumpReLU's,
    group_sizes Matryoshka's (None: their defaults)."""
    import time

    import torch

    from featurestore.activation_buffer import open_model_buffer
    from featurestore.aligned import AlignedActivations
    from featurestore.corpus import CorpusOptions
    from featurestore.crosscoder import CrossCoder, CrossCoderConfig
    from featurestore.crosscoder_training import (
        MIN_STEPS,
        Distributed,
        TrainerConfig,
        check_enough_steps,
        require_training_memory,
        train_crosscoder,
    )
    from featurestore.token_text import missing_token_strings

    check_name(name, "basis name")
    if steps is not None and tokens is not None:
        raise FeaturestoreError("give --steps or --tokens, not both")
    _check_numbers(steps=steps, tokens=tokens, pool_batches=pool_batches, epochs=epochs, k=k,
                   aux_k=aux_k, aux_coeff=aux_coeff, dict_size=dict_size, n_shared=n_shared,
                   seq_len=seq_len)
    arch_options = ArchOptions.checked(arch, jumprelu_bandwidth, group_sizes, dict_size)
    defaults = TrainerConfig()
    settings = dict(batch_size=batch_size, lr=lr if lr is not None else defaults.lr,
                    betas=tuple(betas),
                    l1_coeff=l1_coeff if l1_coeff is not None else defaults.l1_coeff,
                    l0_coeff=l0_coeff if l0_coeff is not None else defaults.l0_coeff,
                    norm_loss_fraction=(norm_loss_fraction if norm_loss_fraction is not None
                                        else defaults.norm_loss_fraction),
                    k_anneal_from=k_anneal_from, log_every=log_every, save_every=save_every,
                    seed=seed)
    TrainerConfig(**settings)  # checks every number before any work
    if epochs > 1 and tokens_from is None:
        raise FeaturestoreError(
            f"--epochs {epochs} replays the token stream of --tokens-from; activation sets are "
            "read for as many passes as --steps or --tokens need, so drop --epochs")
    bounds = FitBounds(min_explained_variance, max_active_fraction, max_dead_fraction)
    parsed = [parse_source(s) for s in sources]
    labels = [label for label, _ in parsed]
    if len(set(labels)) != len(labels):
        raise FeaturestoreError(f"--source labels repeat: {labels}")
    check_source_kinds(parsed, tokens_from)
    wh = Warehouse(warehouse)
    started = time.perf_counter()
    # Under torchrun, rank 0 holds the writer lock and registers the result; the other ranks
    # only train.
    distributed = Distributed.from_environment()
    lock = wh.writer(f"train-crosscoder {name}") if distributed.is_main else nullcontext()
    # The training state is locked while this job trains: a later job deletes a state only when
    # no job holds it and a basis of its name was registered after it was saved.
    state_dir = wh.root / TRAINING_FOLDER / name
    with lock as writer, Claim(state_dir) if distributed.is_main else nullcontext():
        with wh.connect() as con:
            if tokens_from is None:
                resolved = [resolve_source(wh, con, label, target) for label, target in parsed]
                d_model = resolved[0][0].activations.d_model
                require_training_memory(len(parsed), d_model, dict_size or 16 * d_model,
                                        batch_size)
                data = AlignedActivations([source for source, _ in resolved], seed=seed)
                source_rows = [{"label": source.label, **info,
                                "norm_scale": float(source.activations.norm_scale)}
                               for source, info in resolved]
                if steps is None and tokens is not None:
                    steps = math.ceil(tokens / batch_size)
                    fixes = [f"give more --tokens (at least {MIN_STEPS * batch_size})"]
                    if tokens // MIN_STEPS:
                        fixes.append(f"a smaller --batch-size (at most {tokens // MIN_STEPS})")
                    check_enough_steps(steps, f"--tokens {tokens} // --batch-size {batch_size}",
                                       fixes)
                steps = steps or defaults.steps
            else:
                options = CorpusOptions(text_column, seq_len,
                                        None if splits is None else tuple(splits))
                data, steps = open_model_buffer(wh, con, parsed, tokens_from, tokens,
                                                pool_batches * batch_size, seed, batch_size,
                                                steps, defaults.steps, epochs, options, tokenizer)
                require_training_memory(len(parsed), data.d_model,
                                        dict_size or 16 * data.d_model, batch_size)
                source_rows = [{"label": source.label, **source.info, "norm_scale": scale}
                               for source, scale in zip(data.sources, data.scales)]
                # The source runs' token strings, for any that has none yet (as collect does).
                string_rows = missing_token_strings(
                    con, [(s.run_info, s.folder) for s in data.sources if s.run_info], tokenizer)
        d_hidden = dict_size or 16 * data.d_model
        trainer = TrainerConfig(steps=steps, **settings)
        try:
            config = CrossCoderConfig(
                n_sources=len(labels), d_model=data.d_model, d_hidden=d_hidden, k=k,
                aux_k=default_aux_k(arch, k) if aux_k is None else aux_k,
                aux_coeff=aux_coeff, n_shared=n_shared, source_labels=tuple(labels),
                **arch_options.config_fields(d_hidden),
            )
        except ValueError as error:
            raise FeaturestoreError(f"train-crosscoder: {error}") from None
        torch.manual_seed(seed)
        model = CrossCoder(config, data.norm_scales)
        wandb_run = _wandb_run(name, config, trainer) if wandb and distributed.is_main else None
        on_log = None if wandb_run is None else (
            lambda row: wandb_run.log({k: v for k, v in row.items() if k != "step"},
                                      step=row["step"]))
        try:
            result = train_crosscoder(model, data, trainer, state_dir, resume=resume,
                                      progress=progress, on_log=on_log, distributed=distributed)
        finally:
            if wandb_run is not None:
                wandb_run.finish()
        if not distributed.is_main:
            return CrossCoderJobResult(name, arch, labels, d_hidden, result.steps, result.tokens,
                                       {}, time.perf_counter() - started)

        report, stats = fit_report(model, data)
        report["bounds"] = asdict(bounds)
        # Trained from models, the settings include where the tokens came from.
        trainer_config = (trainer.to_dict() if tokens_from is None else
                          {**trainer.to_dict(), "data": data.describe()})
        failed = bounds.failures(report, "source")
        if failed:
            reject_fit(wh, "train-crosscoder", name, report, failed, model.save, {
                "sources": source_rows, "config": config.to_dict(),
                "trainer_config": trainer_config, "final_metrics": result.final},
                advice=f"Train longer (--steps, --tokens{', --epochs' if tokens_from else ''}) "
                       f"or change the dictionary (--dict-size, --k, --l1-coeff, --l0-coeff). "
                       f"The training state stays in {state_dir}: the same command with a "
                       "relaxed bound and --resume registers these weights without training "
                       "again.")
        from featurestore.latent_scaling import latent_scaling

        scaling = latent_scaling(model, data.in_order(EVAL_BATCH, EVAL_TOKENS))
        model.save(writer.stage_dir(f"bases/{name}"))
        relative = writer.versioned(f"bases/{name}")
        if rejected_path(wh, name).exists():  # an earlier rejected fit is superseded
            writer.remove_dir(f"{REJECTED_DIR}/{name}")
        writer.put("bases", [{
            "name": name, "kind": "crosscoder", "arch": arch, "n_sources": len(labels),
            "d_model": data.d_model, "d_hidden": d_hidden,
            "k": basis_k(arch, k),
            "sources": source_rows,
            "config": json.dumps(config.to_dict()),
            "trainer_config": json.dumps(trainer_config),
            "path": relative, "steps": result.steps, "tokens": result.tokens,
            "final_metrics": json.dumps(result.final), "fit_quality": json.dumps(report),
            "created_at": utc_now(),
        }])
        writer.put("features", feature_rows(name, model, stats, scaling),
                   replace_where={"basis": name})
        writer.put("decoder_directions", direction_rows(name, model),
                   replace_where={"basis": name})
        writer.put("training_metrics", training_metric_rows(name, result.metrics),
                   replace_where={"basis": name})
        if tokens_from is not None and string_rows:
            writer.put("token_strings", string_rows)
        # Registered: the resume state goes once the commit stands. Rows computed from earlier
        # weights of this name (its sweep, model-diff contexts, lineage reading it upstream) go
        # in the commit.
        writer.remove_dir(f"{TRAINING_FOLDER}/{name}")
        for table, where in derived_from_basis(name):
            writer.put(table, [], replace_where=where)
    return CrossCoderJobResult(name, arch, labels, d_hidden, result.steps, result.tokens,
                               result.final, time.perf_counter() - started,
                               notes=list(data.tokens.notes) if tokens_from else [])


@dataclass(frozen=True)
class ArchOptions:
    """The architecture and its own options, as both fitting jobs take them (train-crosscoder,
    shared-feature-fit), checked with the flags' names."""

    arch: str
    jumprelu_bandwidth: float | None
    group_sizes: tuple[int, ...] | None

    @classmethod
    def checked(cls, arch: str, jumprelu_bandwidth: float | None,
                group_sizes: Sequence[int] | None, dict_size: int | None) -> ArchOptions:
        """Refuse an unknown arch or options it does not take; with --dict-size given, group
        sizes that do not sum to it (else config_fields checks them, once d_model is known)."""
        from featurestore.dictionary_kinds import ARCHS

        if arch not in ARCHS:
            raise FeaturestoreError(f"--arch {arch!r}: use one of {', '.join(ARCHS)}")
        if jumprelu_bandwidth is not None:
            if arch != "jumprelu":
                raise FeaturestoreError(
                    "--jumprelu-bandwidth is JumpReLU's: drop it, or use --arch jumprelu")
            ranges.POSITIVE.check(jumprelu_bandwidth, "--jumprelu-bandwidth")
        if group_sizes is not None:
            if arch != "matryoshka":
                raise FeaturestoreError(
                    "--group-sizes is Matryoshka's: drop it, or use --arch matryoshka")
            group_sizes = tuple(group_sizes)
            if not group_sizes or not all(ranges.COUNT.contains(n) for n in group_sizes):
                raise FeaturestoreError(
                    f"--group-sizes {','.join(map(str, group_sizes))}: give positive integers, "
                    "e.g. 64,128,256,512")
        options = cls(arch, jumprelu_bandwidth, group_sizes)
        if dict_size is not None:
            options.config_fields(dict_size)
        return options

    def config_fields(self, d_hidden: int) -> dict:
        """The CrossCoderConfig fields these options set, for a dictionary of d_hidden latents."""
        fields = {"arch": self.arch}
        if self.jumprelu_bandwidth is not None:
            fields["jumprelu_bandwidth"] = self.jumprelu_bandwidth
        if self.group_sizes is not None:
            total = sum(self.group_sizes)
            if total != d_hidden:
                raise FeaturestoreError(
                    f"--group-sizes {','.join(map(str, self.group_sizes))} sum to {total}, not to "
                    f"the dictionary's {d_hidden} latents (--dict-size, by default 16 x d_model): "
                    "give sizes that sum to --dict-size, or leave --group-sizes out for the "
                    "default doubling groups")
            fields["group_sizes"] = self.group_sizes
        return fields


def parse_group_sizes(text: str | None) -> tuple[int, ...] | None:
    """--group-sizes 64,128,256: the sizes, or None when the flag is not given."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise FeaturestoreError(
            f"--group-sizes {text!r}: give the Matryoshka group sizes as integers separated by "
            "commas, summing to --dict-size, e.g. 64,128,256,512") from None


def default_aux_k(arch: str, k: int) -> int:
    """AuxK's dead latents per token unless --aux-k says: 2k for the archs with a k (Gao et al.
    pair AuxK with TopK), none for vanilla and JumpReLU (--aux-k can still add it)."""
    from featurestore.dictionary_kinds import K_ARCHS

    return 2 * k if arch in K_ARCHS else 0


def basis_k(arch: str, k: int) -> int | None:
    """bases.k: the k of the archs that have one, NULL for the others."""
    from featurestore.dictionary_kinds import K_ARCHS

    return k if arch in K_ARCHS else None


def _check_numbers(steps, tokens, pool_batches, epochs, k, aux_k, aux_coeff, dict_size,
                   n_shared, seq_len) -> None:
    """The job's counts and coefficients, before any work (the trainer's own settings are
    checked by TrainerConfig)."""
    for flag, value, allowed in (
            ("--steps", steps, ranges.COUNT), ("--tokens", tokens, ranges.COUNT),
            ("--pool-batches", pool_batches, ranges.COUNT), ("--epochs", epochs, ranges.COUNT),
            ("--k", k, ranges.COUNT), ("--aux-k", aux_k, ranges.NON_NEGATIVE_COUNT),
            ("--aux-coeff", aux_coeff, ranges.NON_NEGATIVE),
            ("--dict-size", dict_size, ranges.COUNT),
            ("--shared-latents", n_shared, ranges.NON_NEGATIVE_COUNT),
            ("--seq-len", seq_len, ranges.COUNT)):
        if value is not None:  # None: the default
            allowed.check(value, flag)


def fit_report(model, data) -> tuple[dict, dict[str, np.ndarray]]:
    """The fit-quality report (explained variance per source, L0, active and dead fraction) and
    the feature statistics (frequency, mean when active, max activation of every latent), in one
    pass over the first EVAL_TOKENS tokens with the inference rule, in normalised units."""
    import torch

    from featurestore.shared_basis import ReconstructionSums

    h = model.config.d_hidden
    count, total, peak, seen = np.zeros(h), np.zeros(h), np.zeros(h), 0
    sums = [ReconstructionSums() for _ in model.config.source_labels]
    with torch.no_grad():
        for x in data.in_order(EVAL_BATCH, EVAL_TOKENS):
            latents = model.encode(x, normalized=True)
            x_hat = model.decode(latents, normalized=True).double().numpy()
            f = latents.double().numpy()
            count += (f > 0).sum(axis=0)
            total += f.sum(axis=0)
            peak = np.maximum(peak, f.max(axis=0))
            seen += f.shape[0]
            for s, source_sums in enumerate(sums):
                source_sums.add(x[:, s].double().numpy(), x_hat[:, s])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, np.nan)
    l0 = count.sum() / seen
    report = {"explained_variance": {label: source_sums.explained_variance for label, source_sums
                                     in zip(model.config.source_labels, sums)},
              "l0": float(l0), "active_fraction": float(l0 / h),
              "dead_fraction": float((count == 0).mean()), "eval_tokens": seen}
    return report, {"frequency": count / seen, "mean": mean, "max": peak}


def feature_rows(name, model, stats, scaling=None) -> list[dict]:
    """`features` rows; the latent-scaling columns stay NULL without `scaling` (shared bases)."""
    norms = model.decoder_norms().detach().double().numpy()  # [h, sources]
    decoder = model.decoder().detach().double().numpy()
    unscaled = dict.fromkeys(["reference_source", "beta_recon", "beta_error", "nu_recon",
                              "nu_error"])
    scaled = (scaling.rows(list(model.config.source_labels)) if scaling is not None
              else [unscaled] * model.config.d_hidden)
    rows = []
    for i in range(model.config.d_hidden):
        relative = cosine = None
        if model.config.n_sources == 2:
            relative = float(norms[i, 1] / (norms[i].sum() or np.nan))
            a, b = decoder[i, 0], decoder[i, 1]
            denominator = np.linalg.norm(a) * np.linalg.norm(b)
            cosine = float(a @ b / denominator) if denominator > 0 else None
        rows.append({
            "basis": name, "feature_id": i, "designated_shared": i < model.config.n_shared,
            "decoder_norms": norms[i].tolist(),
            "relative_decoder_norm": None if relative is None or math.isnan(relative) else relative,
            "decoder_cosine": cosine, "frequency": float(stats["frequency"][i]),
            "mean_activation": None if np.isnan(stats["mean"][i]) else float(stats["mean"][i]),
            "max_activation": float(stats["max"][i]), "dead": bool(stats["frequency"][i] == 0),
            "reference_source": scaled[i]["reference_source"],
            "beta_recon": scaled[i]["beta_recon"], "beta_error": scaled[i]["beta_error"],
            "nu_recon": scaled[i]["nu_recon"], "nu_error": scaled[i]["nu_error"],
        })
    return rows


def training_metric_rows(name: str, metrics: list[dict]) -> list[dict]:
    """`training_metrics` rows (one per logged step and metric) from the trainer's log."""
    return [{"basis": name, "step": row["step"], "tokens": row["tokens"], "metric": key,
             "value": value}
            for row in metrics for key, value in row.items() if key not in ("step", "tokens")]


def direction_rows(name, model) -> list[dict]:
    decoder = model.decoder().detach().float().numpy()
    norms = np.linalg.norm(decoder, axis=2)
    return [
        {"basis": name, "feature_id": i, "source": label, "source_index": s,
         "norm": float(norms[i, s]), "direction": decoder[i, s].tolist()}
        for i in range(decoder.shape[0])
        for s, label in enumerate(model.config.source_labels)
    ]


def _wandb_run(name, config, trainer):
    try:
        import wandb
    except ImportError:
        raise FeaturestoreError(
            "--wandb needs the wandb package: pip install wandb (runs offline unless WANDB_MODE "
            "says otherwise)"
        ) from None
    os.environ.setdefault("WANDB_MODE", "offline")
    return wandb.init(project="featurestore", name=name,
                      config={"crosscoder": config.to_dict(), "trainer": trainer.to_dict()})
