"""The causal layer: feature patching throughput and lineage time per checkpoint.

A demo-sized run (d_model 64, 4 blocks) is trained briefly, layer_2_post_mlp is collected at three
checkpoints, and a pooled basis of 1,024 features is fitted, swept and compared first-vs-last.
Then, interleaved round-robin on the same 64 sequences of 16 tokens:

    plain forward                the model called directly: the floor of any patched run.
    nnsight clean pass           StageReader.run_with without a replacement: reading the site
                                 and the logits through nnsight (baseline: plain forward).
    patch one feature set        one patched pass as feature-patch does it: encode the site in
                                 the basis, the delta of the set, the model run on x + delta
                                 (baseline: plain forward).
    feature-patch, 5 features    the job end to end (model loading, both checkpoints read, six
                                 feature sets and the spliced reconstruction, registration):
                                 tokens x passes / s.
    feature-lineage, 1 checkpoint  the job end to end with its defaults (the 16 features of
                                 highest energy, 2,048 tokens) at the last checkpoint: tokens/s
                                 against the plain forward (the note gives seconds each).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from harness import BenchmarkResult, Figure, RunOptions, measure

from featurestore.ingest.collect import collect
from featurestore.ingest.feature_compare import compare_features
from featurestore.ingest.feature_lineage import feature_lineage
from featurestore.ingest.feature_patch import feature_patch
from featurestore.ingest.shared_feature_fit import shared_feature_fit
from featurestore.ingest.train_model import train_model
from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep
from featurestore.registry import get_checkpoints, get_run
from featurestore.shared_basis import load_shared_basis
from featurestore.tasks import SyntheticTask, TaskConfig
from featurestore.warehouse import Warehouse

RUN, STAGE, BASIS = "bench", "layer_2_post_mlp", "bench-l2"
TRAIN_STEPS, QUICK_TRAIN_STEPS = 300, 100
COLLECT_TOKENS = 8192
SEQUENCES = 64
PATCH_FEATURES = 5
PATCH_TOKENS, QUICK_PATCH_TOKENS = 2048, 512
LINEAGE_FEATURES, LINEAGE_TOKENS = 16, 2048  # feature_lineage's defaults


def run(options: RunOptions) -> BenchmarkResult:
    from featurestore.ingest.collect import open_reader

    patch_tokens = QUICK_PATCH_TOKENS if options.quick else PATCH_TOKENS
    with tempfile.TemporaryDirectory(prefix="bench-causal-") as tmp:
        root = Path(tmp) / "warehouse"
        trained = train_model(RUN, steps=QUICK_TRAIN_STEPS if options.quick else TRAIN_STEPS,
                              warehouse=root, progress=False)
        steps = trained.checkpoint_steps
        chosen = f"{steps[0]},{steps[len(steps) // 2]},{steps[-1]}"
        collect(RUN, [STAGE], checkpoints=chosen, tokens=COLLECT_TOKENS, warehouse=root,
                progress=False)
        shared_feature_fit(RUN, STAGE, BASIS, checkpoints=chosen, steps=100, warehouse=root,
                           progress=False, min_explained_variance=-1.0,
                           max_active_fraction=1.0, max_dead_fraction=1.0)
        feature_trajectory_sweep(BASIS, warehouse=root, progress=False)
        compare_features(BASIS, steps[0], steps[-1], warehouse=root)

        wh = Warehouse(root)
        con = wh.connect()
        basis, _ = load_shared_basis(wh, con, BASIS)
        run_row = get_run(con, RUN)
        (checkpoint,) = get_checkpoints(wh, con, RUN, [steps[-1]])
        con.close()
        reader = open_reader(run_row, checkpoint)
        task = SyntheticTask(TaskConfig.from_dict(run_row.task_config))
        tokens = task.sample("heldout", SEQUENCES, 0).tokens
        n_tokens = tokens.numel()
        last = len(basis.checkpoints) - 1
        norm_scale = basis.checkpoints[last].norm_scale
        decoder = torch.from_numpy(basis.decoder_directions(last)).float()
        feature_set = list(range(PATCH_FEATURES))

        def plain_forward() -> float:
            with torch.no_grad():
                reader.module(tokens)
            return n_tokens

        def clean_pass() -> float:
            reader.run_with(tokens, STAGE)
            return n_tokens

        def patch_one_set() -> float:
            x, _ = reader.run_with(tokens, STAGE)
            f, _ = basis.encode([x.reshape(-1, x.shape[-1]) * norm_scale], last)
            delta = -f[:, feature_set] @ decoder[feature_set] / norm_scale
            reader.run_with(tokens, STAGE, x + delta.reshape(x.shape))
            return n_tokens

        def patch_job() -> float:
            result = feature_patch(BASIS, steps[0], steps[-1], features=f"top:{PATCH_FEATURES}",
                                   tokens=patch_tokens, warehouse=root, progress=False)
            return result.n_tokens * (PATCH_FEATURES + 2)  # sets alone, together, spliced

        def lineage_job() -> float:
            result = feature_lineage(BASIS, steps=str(steps[-1]), warehouse=root,
                                     progress=False)
            return result.n_tokens

        figures = [
            Figure("plain forward", "tokens/s", plain_forward),
            Figure("nnsight clean pass", "tokens/s", clean_pass, baseline="plain forward"),
            Figure("patch one feature set", "tokens/s", patch_one_set, baseline="plain forward",
                   note=f"{PATCH_FEATURES} features, mode zero, one batch of {n_tokens} tokens"),
            Figure("feature-patch job", "tokens/s", patch_job, baseline="plain forward",
                   note=f"top {PATCH_FEATURES}, mode patch, {patch_tokens} tokens; tokens x "
                        "passes per second, model loading and registration included"),
            Figure("feature-lineage job, 1 checkpoint", "tokens/s", lineage_job,
                   baseline="plain forward",
                   note=f"top {LINEAGE_FEATURES} features by energy, {LINEAGE_TOKENS} tokens, "
                        "one backward pass per feature, registration included"),
        ]
        measurements = measure(figures, options)

    result = BenchmarkResult(
        name="causal",
        description=(f"feature-patch and feature-lineage on a {basis.d_hidden}-feature basis at "
                     f"{STAGE} of a d_model 64, 4-block demo model"),
        measurements=measurements,
        config={"sequences": SEQUENCES, "patch_features": PATCH_FEATURES,
                "patch_tokens": patch_tokens, "dict_size": basis.d_hidden},
    )
    lineage = result.measurement("feature-lineage job, 1 checkpoint")
    result.notes.append(f"feature-lineage: {LINEAGE_TOKENS / lineage.median:.2f} s per "
                        "checkpoint (median)")
    return result
