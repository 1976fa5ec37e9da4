"""`featurestore demo`: the main job end to end on the built-in default.

Trains the demo run, fine-tunes demo-ft from its last checkpoint, collects the two first-class
stages for every checkpoint of both runs on one shared token set, trains a BatchTopK crosscoder
on the base / fine-tuned pair at layer_2_post_mlp (with its latents' per-source statistics and
contexts), fits a shared feature basis per stage on the
demo run's checkpoints (sweep, births, first-vs-last compare), patches the features of
demo-l2 that changed most into the last checkpoint's model, maps them to the heads and neurons
that write them (and demo-fn's features to demo-l2's), exports graphs, plots, the artifact layout
and a feature-dynamics report per basis and the model-diff report of the crosscoder, and summarises
the warehouse.
"""

from __future__ import annotations

from collections.abc import Callable

from featurestore.birth_rules import default_births_rule
from featurestore.ingest.birth_analysis import analyze_births
from featurestore.ingest.collect import DEFAULT_TOKENS, collect
from featurestore.ingest.crosscoder_sweep import crosscoder_sweep
from featurestore.ingest.feature_compare import compare_features
from featurestore.ingest.feature_lineage import feature_lineage
from featurestore.ingest.feature_patch import feature_patch
from featurestore.ingest.shared_feature_fit import shared_feature_fit
from featurestore.ingest.train_crosscoder import train_crosscoder_job
from featurestore.ingest.train_model import DEFAULT_FINETUNE_STEPS, finetune, train_model
from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep
from featurestore.queries.artifacts import DEFAULT_OUT, export_artifacts
from featurestore.queries.report import used_parameters, write_report
from featurestore.schema import load_query
from featurestore.text_table import format_table
from featurestore.warehouse import connect

BASE_RUN = "demo"
FINETUNED_RUN = "demo-ft"
STAGES = ("layer_2_post_mlp", "final_norm")
DIFF_BASIS = "demo-diff"
DIFF_STAGE = "layer_2_post_mlp"
DIFF_STEPS = 1000
# In model order, so the earlier stage is fitted and reported first.
SHARED_BASES = {"layer_2_post_mlp": "demo-l2", "final_norm": "demo-fn"}
SHARED_FIT_STEPS = 800
PATCH_BASIS, PATCH_FEATURES, PATCH_TOKENS = "demo-l2", 5, 1024

# The summary's tables: title -> its query, sql/demo/<name>.sql.
SUMMARY_QUERIES = {
    "runs": "runs",
    "accuracy by split at the last checkpoint": "last_checkpoint_accuracy",
    "model diff (demo-diff: base vs fine-tuned at layer_2_post_mlp)": "model_diff_classes",
    "top exclusive features (most frequent)": "top_exclusive_features",
    "shared bases: fit quality per checkpoint (first, middle, last)": "fit_quality",
    "births per basis under the demo's rule (feature-birth-analyze's defaults) against the "
    "shuffled-order null; censored: born in the last K-1 checkpoints, present to the last":
        "births",
    "top born features under that rule (most active at the last checkpoint)":
        "top_born_features",
    "patching demo-l2's most changed features into the last checkpoint (largest loss changes)":
        "patch_effects",
    "which heads and neurons write them (direct feature attribution, strongest first)":
        "lineage_sources",
    "activation sets": "activation_sets",
}


def run_demo(steps: int | None = None, finetune_steps: int = DEFAULT_FINETUNE_STEPS,
             tokens: int = DEFAULT_TOKENS, warehouse: str | None = None,
             artifacts_out: str = DEFAULT_OUT, progress: bool = True,
             log: Callable[[str], None] = print) -> str:
    """Run the whole pipeline; returns the text summary."""
    log(f"[1/8] training {BASE_RUN!r}")
    trained = train_model(BASE_RUN, steps=steps, warehouse=warehouse, progress=progress)
    log(f"      {trained.steps} steps, {len(trained.checkpoint_steps)} checkpoints, "
        f"{trained.seconds:.1f}s")
    log(f"[2/8] fine-tuning {FINETUNED_RUN!r} from {BASE_RUN}@LAST")
    tuned = finetune(FINETUNED_RUN, f"{BASE_RUN}@LAST", steps=finetune_steps,
                     warehouse=warehouse, progress=progress)
    log(f"      {tuned.steps} steps, {tuned.seconds:.1f}s")
    for number, run in ((3, BASE_RUN), (4, FINETUNED_RUN)):
        log(f"[{number}/8] collecting {', '.join(STAGES)} for {run!r}")
        result = collect(run, list(STAGES), tokens=tokens, warehouse=warehouse,
                         progress=progress)
        log(f"      {len(result.sets)} sets, {result.tokens_per_second:,.0f} tokens/s")
    log(f"[5/8] training crosscoder {DIFF_BASIS!r} on {BASE_RUN} vs {FINETUNED_RUN} "
        f"at {DIFF_STAGE}")
    diff = train_crosscoder_job(
        DIFF_BASIS,
        [f"base={BASE_RUN}@{trained.checkpoint_steps[-1]}:{DIFF_STAGE}",
         f"ft={FINETUNED_RUN}@{tuned.checkpoint_steps[-1]}:{DIFF_STAGE}"],
        steps=DIFF_STEPS, warehouse=warehouse, progress=progress)
    log(f"      {diff.steps} steps, {diff.seconds:.1f}s, explained variance "
        f"{diff.final_metrics['explained_variance']:.3f}")
    inspected = crosscoder_sweep(DIFF_BASIS, warehouse=warehouse, progress=progress)
    log(f"      per-source statistics and contexts of {inspected.live_latents} live latents, "
        f"{inspected.seconds:.1f}s")
    for stage, name in SHARED_BASES.items():
        log(f"[6/8] shared feature basis {name!r} on {BASE_RUN}'s checkpoints at {stage}")
        fit = shared_feature_fit(BASE_RUN, stage, name, steps=SHARED_FIT_STEPS,
                                 warehouse=warehouse, progress=progress)
        explained = fit.fit_quality["explained_variance"].values()
        log(f"      fit: explained variance {min(explained):.3f}-{max(explained):.3f}, "
            f"L0 {fit.fit_quality['l0']:.1f}, {fit.seconds:.1f}s")
        sweep = feature_trajectory_sweep(name, warehouse=warehouse, progress=progress)
        log(f"      sweep: {sweep.tokens_per_second:,.0f} tokens/s, "
            f"{sweep.activation_rows:,} activation rows")
        births = analyze_births(name, warehouse=warehouse)
        log(f"      births: {births.births} (null {births.null_births_mean:.1f}), "
            f"{births.present_at_init} present at init")
        compare_features(name, trained.checkpoint_steps[0], trained.checkpoint_steps[-1],
                         warehouse=warehouse)
    first, last = trained.checkpoint_steps[0], trained.checkpoint_steps[-1]
    log(f"[7/8] patching the {PATCH_FEATURES} features of {PATCH_BASIS!r} that changed most "
        f"from step {first} to {last}, and their lineage")
    patched = feature_patch(PATCH_BASIS, first, last, features=f"top:{PATCH_FEATURES}",
                            tokens=PATCH_TOKENS, warehouse=warehouse, progress=progress)
    log(f"      {patched.rows} rows, {patched.tokens_per_second:,.0f} tokens/s; site "
        f"reconstruction error {min(patched.recon_rel_error.values()):.3f}-"
        f"{max(patched.recon_rel_error.values()):.3f}")
    lineage = feature_lineage(PATCH_BASIS, steps=str(last), features=",".join(
        map(str, patched.features)), warehouse=warehouse, progress=progress)
    log(f"      lineage at step {last}: {lineage.edges} edges, {lineage.seconds:.1f}s")
    feature_lineage(SHARED_BASES["final_norm"], steps=str(last), upstream=PATCH_BASIS,
                    warehouse=warehouse, progress=progress)
    log("[8/8] exporting graphs, plots, the artifact layout and the feature-dynamics reports")
    for name in SHARED_BASES.values():
        artifacts = export_artifacts(name, out=artifacts_out, warehouse=warehouse)
        report = write_report(name, warehouse=warehouse)
        log(f"      {name}: {len(artifacts.files)} files in {artifacts.directory}")
        log(f"      {name}: report {report.html} ({artifacts.seconds + report.seconds:.1f}s)")
    report = write_report(DIFF_BASIS, warehouse=warehouse)
    log(f"      {DIFF_BASIS}: model-diff report {report.html} ({report.seconds:.1f}s)")
    return summary(warehouse)


def summary(warehouse: str | None = None) -> str:
    # The births tables count the demo's own rule (analyze_births ran with feature-birth-analyze's
    # defaults), not every rule stored: births of several rules would be summed.
    params = {"diff_basis": DIFF_BASIS, "patch_basis": PATCH_BASIS, **default_births_rule()}
    with connect(warehouse) as con:
        parts = []
        for title, name in SUMMARY_QUERIES.items():
            sql = load_query(f"demo/{name}")
            cursor = con.execute(sql, used_parameters(sql, params))
            header = [d[0] for d in cursor.description]
            rows = [["" if v is None else str(v) for v in row] for row in cursor.fetchall()]
            parts.append(f"{title}\n{format_table(header, rows)}")
        return "\n\n".join(parts)
