"""`featurestore experiment grokking`: the phases of grokking (Nanda et al., 2023), found with the
store's own jobs.

Trains a one-layer transformer on a + b mod p (grokking_run), collects the residual stream after
the MLP and the final norm on every problem, fits a shared basis per stage on the pooled
checkpoints, sweeps, finds births, compares the first and last checkpoints, reads each feature's
dominant frequency (feature_frequencies), patches the features that changed most into the last
checkpoint, maps them to the heads and neurons that write them, and writes the report. The
result answers, from SQL: when were the features that follow the key frequencies born, against
the step at which test accuracy jumps?
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from featurestore.birth_rules import default_births_rule
from featurestore.grokking import (
    BASIS_FIT_STEPS,
    BASIS_K_DIVISOR,
    BASIS_WIDTH,
    DENSE_EVERY,
    GrokkingConfig,
)
from featurestore.ingest.birth_analysis import analyze_births
from featurestore.ingest.collect import collect
from featurestore.ingest.feature_compare import compare_features
from featurestore.ingest.feature_frequencies import feature_frequencies
from featurestore.ingest.feature_lineage import feature_lineage
from featurestore.ingest.feature_patch import feature_patch
from featurestore.ingest.grokking_run import train_grokking_run
from featurestore.ingest.shared_feature_fit import shared_feature_fit
from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep
from featurestore.results import Result
from featurestore.schema import load_query
from featurestore.text_table import format_cell, format_table
from featurestore.warehouse import connect

DEFAULT_RUN = "grok"
STAGES = ("layer_0_post_mlp", "final_norm")
PATCH_FEATURES, PATCH_TOKENS = 5, 1024


@dataclass
class FeatureKind:
    """Features of one kind (frequency_births.follows) and their births, default births rule."""

    features: int
    born: int  # not present at init, born under the rule
    born_before_jump: int | None  # None: test accuracy never jumped
    share_born_before_jump: float | None
    median_birth_step: float | None


@dataclass
class BasisFindings:
    """One basis's answer to the grokking question."""

    basis: str
    stage: str
    kinds: dict[str, FeatureKind]  # by frequency_births.follows: 'key frequency', 'answer', ...
    answer_features_key_share: float | None  # answer_feature_frequencies.key_frequency_share


@dataclass
class GrokkingExperimentResult(Result):
    run: str
    p: int
    train_fraction: float
    steps: int
    checkpoints: int
    key_frequencies: list[int]
    memorised_step: int | None
    jump_step: int | None
    grokked_step: int | None
    final_train_accuracy: float
    final_test_accuracy: float
    bases: list[BasisFindings] = field(default_factory=list)
    report: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"run {self.run!r}: a + b mod {self.p}, {self.steps} steps, {self.checkpoints} "
            f"checkpoints, key frequencies {self.key_frequencies}",
            f"memorised at step {self.memorised_step}, test accuracy jump at step "
            f"{self.jump_step}, grokked at step {self.grokked_step} (final test accuracy "
            f"{self.final_test_accuracy:.3f})",
            format_table(
                ["basis", "features follow", "features", "born", "born before the jump", "share",
                 "median birth step"],
                [[b.basis, follows, str(k.features), str(k.born), format_cell(k.born_before_jump),
                  "" if k.share_born_before_jump is None else f"{k.share_born_before_jump:.0%}",
                  format_cell(k.median_birth_step)]
                 for b in self.bases for follows, k in b.kinds.items()])]
        lines += [f"{b.basis}: the answer features' decoders put {b.answer_features_key_share:.0%} "
                  "of their variation over the answer in the key frequencies"
                  for b in self.bases if b.answer_features_key_share is not None]
        lines.append(f"report: {self.report}  ({self.seconds:.0f}s)")
        return "\n".join(lines)


def basis_name(run: str, stage: str) -> str:
    return f"{run}-{'fn' if stage == 'final_norm' else 'l0'}"


DEFAULTS = GrokkingConfig()


def run_grokking_experiment(run: str = DEFAULT_RUN, p: int = DEFAULTS.p,
                            train_fraction: float = DEFAULTS.train_fraction,
                            steps: int = DEFAULTS.steps, d_model: int = DEFAULTS.d_model,
                            weight_decay: float = DEFAULTS.weight_decay, seed: int = DEFAULTS.seed,
                            dense_every: int = DENSE_EVERY, fit_steps: int = BASIS_FIT_STEPS,
                            warehouse: str | None = None, out: str | None = None,
                            progress: bool = True, log: Callable[[str], None] = print
                            ) -> GrokkingExperimentResult:
    """Run the whole experiment; returns its findings (also in the warehouse and the report)."""
    from featurestore.queries.grokking_report import write_grokking_report

    started = time.perf_counter()
    config = GrokkingConfig(p=p, train_fraction=train_fraction, steps=steps, d_model=d_model,
                            weight_decay=weight_decay, seed=seed)
    log(f"[1/6] training {run!r} on a + b mod {config.p} ({config.steps} full-batch steps, "
        f"{config.train_fraction:.0%} of the pairs)")
    trained = train_grokking_run(run, config, dense_every, warehouse=warehouse, progress=progress)
    log(f"      {len(trained.checkpoint_steps)} checkpoints, key frequencies "
        f"{trained.key_frequencies}, final test accuracy "
        f"{trained.final['test_accuracy']:.3f}, {trained.seconds:.1f}s")
    task = config.task()
    log(f"[2/6] collecting {', '.join(STAGES)} on all {task.p}^2 problems")
    # Enough tokens that each split's sample is the whole split (ModularAddition.sample).
    every_problem = len(task.SPLITS) * task.n_ctx * task.p ** 2
    collected = collect(run, list(STAGES), tokens=every_problem, warehouse=warehouse,
                        progress=progress)
    log(f"      {len(collected.sets)} sets, {collected.tokens_per_second:,.0f} tokens/s")
    first, last = trained.checkpoint_steps[0], trained.checkpoint_steps[-1]
    for stage in STAGES:
        name = basis_name(run, stage)
        log(f"[3/6] shared basis {name!r} at {stage}: fit, sweep, births, compare, frequencies")
        fit = shared_feature_fit(run, stage, name, k=max(1, d_model // BASIS_K_DIVISOR),
                                 dict_size=BASIS_WIDTH * d_model,
                                 steps=fit_steps, warehouse=warehouse, progress=progress)
        explained = fit.fit_quality["explained_variance"].values()
        log(f"      fit: explained variance {min(explained):.3f}-{max(explained):.3f}, "
            f"{fit.seconds:.1f}s")
        feature_trajectory_sweep(name, warehouse=warehouse, progress=progress)
        births = analyze_births(name, warehouse=warehouse)
        log(f"      births: {births.births} (null {births.null_births_mean:.1f})")
        compare_features(name, first, last, warehouse=warehouse)
        found = feature_frequencies(name, warehouse=warehouse)
        log(f"      {found.n_following} features follow one frequency, "
            f"{found.n_key_frequency} of them a key frequency; {found.n_answer_features} look "
            "the answer up" + ("" if found.answer_features_key_share is None else
                               f", their decoders {found.answer_features_key_share:.0%} in the "
                               "key frequencies"))
    patched_basis = basis_name(run, STAGES[0])
    log(f"[4/6] patching the {PATCH_FEATURES} features of {patched_basis!r} that changed most "
        f"from step {first} to {last}")
    patched = feature_patch(patched_basis, first, last, features=f"top:{PATCH_FEATURES}",
                            tokens=PATCH_TOKENS, warehouse=warehouse, progress=progress)
    log(f"      {patched.rows} rows")
    log(f"[5/6] lineage of those features at step {last}")
    lineage = feature_lineage(patched_basis, steps=str(last),
                              features=",".join(map(str, patched.features)),
                              warehouse=warehouse, progress=progress)
    log(f"      {lineage.edges} edges")
    log("[6/6] report")
    report = write_grokking_report(run, out=out, warehouse=warehouse)
    log(f"      {report.html}")
    result = findings(run, config, warehouse)
    result.report = str(report.html)
    result.seconds = time.perf_counter() - started
    return result


def findings(run: str, config: GrokkingConfig, warehouse: str | None = None
             ) -> GrokkingExperimentResult:
    """The experiment's answer, read back from the warehouse's views."""
    with connect(warehouse) as con:
        phases = con.execute(load_query("grokking_experiment/phases"), {"run": run}).fetchone()
        keys, memorised, jump, grokked, checkpoints, train_acc, test_acc = phases
        result = GrokkingExperimentResult(
            run=run, p=config.p, train_fraction=config.train_fraction, steps=config.steps,
            checkpoints=checkpoints, key_frequencies=list(keys), memorised_step=memorised,
            jump_step=jump, grokked_step=grokked, final_train_accuracy=train_acc,
            final_test_accuracy=test_acc)
        for stage in STAGES:
            name = basis_name(run, stage)
            kinds = {}
            for follows, features, born, before, median in con.execute(
                    load_query("grokking_experiment/feature_kinds"),
                    {"basis": name, **default_births_rule()}).fetchall():
                # Without a jump (test accuracy never reached half) nothing is before it.
                before = None if jump is None else before
                kinds[follows] = FeatureKind(
                    features, born, before,
                    before / born if born and before is not None else None, median)
            shares = con.execute(load_query("grokking_experiment/answer_share"),
                                 {"basis": name}).fetchall()
            result.bases.append(BasisFindings(name, stage, kinds,
                                              shares[0][0] if shares else None))
        return result
