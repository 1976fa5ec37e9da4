"""feature-patch on the tiny run: the patched metrics against an independent torch computation
(encode with numpy from the stored weights, run the rest of the model by hand), null patches,
the reported reconstruction error, bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.numpy import load_file

from featurestore.checkpoints import load_checkpoint
from featurestore.cli import cli
from featurestore.errors import FeaturestoreError
from featurestore.ingest.feature_patch import feature_patch
from featurestore.ingest.shared_feature_fit import shared_feature_fit
from featurestore.ingest.trajectory_sweep import feature_trajectory_sweep
from featurestore.tasks import SyntheticTask, TaskConfig
from featurestore.warehouse import Warehouse

from .conftest import TINY_RUN, query, snapshot

STAGE = "layer_2_post_mlp"
FIT = dict(dict_size=64, k=4, steps=150, batch_size=256, progress=False,
           min_explained_variance=-1.0, max_active_fraction=1.0, max_dead_fraction=1.0)
SPLIT, N_SEQUENCES = "modular", 8


@pytest.fixture(scope="module")
def patched_root(tmp_path_factory, trained_warehouse):
    root = tmp_path_factory.mktemp("patch") / "warehouse"
    shutil.copytree(trained_warehouse, root)
    shared_feature_fit(TINY_RUN, STAGE, "tiny-l2", checkpoints=",".join(map(str, steps_of(root))),
                       warehouse=root, **FIT)
    feature_trajectory_sweep("tiny-l2", warehouse=root, progress=False)
    return root


def steps_of(root) -> list[int]:
    return [s for (s,) in query(root, "SELECT step FROM activation_sets WHERE run = ? AND "
                                      "stage = ? ORDER BY step", [TINY_RUN, STAGE])]


def busiest_features(root, step: int, n: int) -> list[int]:
    return [f for (f,) in query(root, "SELECT feature_id FROM trajectories WHERE basis = "
                                      "'tiny-l2' AND step = ? ORDER BY energy DESC LIMIT ?",
                                [step, n])]


class Reference:
    """The patch computed without featurestore's patch code: numpy encoder from the stored
    weights, and the demo model's forward pass written out by hand after the site."""

    def __init__(self, root, step: int, n_tokens: int):
        wh = Warehouse(root)
        (path, sources), = query(root, "SELECT path, sources FROM bases WHERE name = 'tiny-l2'")
        self.scale = next(s["norm_scale"] for s in sources if s["step"] == step)
        self.weights = load_file(wh.path(path) / "crosscoder.safetensors")
        (checkpoint,), = query(root, "SELECT path FROM checkpoints WHERE run = ? AND step = ?",
                               [TINY_RUN, step])
        self.model = load_checkpoint(wh.path(checkpoint))
        (task_config,), = query(root, "SELECT task_config FROM runs WHERE run = ?", [TINY_RUN])
        task = SyntheticTask(TaskConfig.from_dict(json.loads(task_config)))
        per_split = math.ceil(n_tokens / task.config.n_ctx)
        batch = task.sample(SPLIT, per_split, 0)
        self.tokens, self.graded = batch.tokens, batch.scored[:, :-1]

    def site(self) -> np.ndarray:
        with torch.no_grad():
            x = self.model.wte(self.tokens) + self.model.wpe(torch.arange(self.tokens.shape[1]))
            for block in self.model.blocks[:3]:
                x = block(x)
        return x.double().numpy()

    def codes(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(feature values, reconstruction in raw units) of raw activations x [..., d]."""
        w = {k: v.astype(np.float64) for k, v in self.weights.items()}
        pre = (x * self.scale) @ w["W_enc"][0] + w["b_enc"]
        relu = np.maximum(pre, 0)
        decoder = np.concatenate([w["W_dec_shared"][:, None, :], w["W_dec"]])[:, 0]
        f = relu * (relu * np.linalg.norm(decoder, axis=1) > w["threshold"])
        return f, (f @ decoder + w["b_dec"][0]) / self.scale

    def decoder(self) -> np.ndarray:
        w = self.weights
        return np.concatenate([w["W_dec_shared"][:, None, :], w["W_dec"]])[:, 0].astype(
            np.float64)

    def metrics(self, x: np.ndarray) -> dict[str, float]:
        """Loss, accuracy and logits of the model run on from the site with value x."""
        with torch.no_grad():
            h = torch.from_numpy(x).float()
            for block in self.model.blocks[3:]:
                h = block(h)
            logits = self.model.unembed(self.model.ln_f(h))[:, :-1].double()
        targets = self.tokens[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
        correct = ((logits.argmax(-1) == targets) & self.graded).sum().item()
        # The correct token's logit minus the largest other one, at the graded positions.
        scores = logits.numpy()
        answer = np.take_along_axis(scores, targets.numpy()[..., None], axis=-1)[..., 0]
        rivals = scores.copy()
        np.put_along_axis(rivals, targets.numpy()[..., None], -np.inf, axis=-1)
        margin = answer - rivals.max(axis=-1)
        return {"loss": loss, "accuracy": correct / self.graded.sum().item(),
                "logit_diff": margin[self.graded.numpy()].mean(), "logits": logits}


def kl_divergence(clean_logits: torch.Tensor, patched_logits: torch.Tensor) -> float:
    """Mean over positions of KL(clean || patched) of the next-token distributions, in numpy."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(clean_logits.numpy()), log_softmax(patched_logits.numpy())
    return float((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())


def stored(root, mode: str, feature_set: str) -> dict[str, tuple]:
    rows = query(root, "SELECT metric, clean, patched, delta, recon_rel_error, "
                       "spliced_loss_delta, n_tokens FROM patches WHERE basis = 'tiny-l2' AND "
                       "mode = ? AND feature_set = ? AND split = ?", [mode, feature_set, SPLIT])
    return {metric: rest for metric, *rest in rows}


def test_zero_matches_an_independent_computation(patched_root):
    last = steps_of(patched_root)[-1]
    n_tokens = N_SEQUENCES * 16
    reference = Reference(patched_root, last, n_tokens)
    x = reference.site()
    f, x_hat = reference.codes(x)
    # The two features that write the most on these tokens: patching them must matter.
    features = sorted(np.argsort(-f.sum(axis=(0, 1)))[:2].tolist())
    result = feature_patch("tiny-l2", last, last, features=",".join(map(str, features)),
                           mode="zero", tokens=n_tokens, splits=SPLIT, warehouse=patched_root,
                           progress=False)
    assert result.features == features and result.n_tokens == n_tokens

    clean = reference.metrics(x)
    errors = np.linalg.norm(x - x_hat, axis=-1) / np.linalg.norm(x, axis=-1)
    spliced = reference.metrics(x_hat)
    decoder = reference.decoder()
    for feature_set in [[features[0]], [features[1]], sorted(features)]:
        removed = (f[..., feature_set] @ decoder[feature_set]) / reference.scale
        patched = reference.metrics(x - removed)
        rows = stored(patched_root, "zero", ",".join(map(str, feature_set)))
        assert rows["loss"][0] == pytest.approx(clean["loss"], rel=1e-4)
        assert rows["loss"][1] == pytest.approx(patched["loss"], rel=1e-3, abs=1e-4)
        assert rows["loss"][2] == pytest.approx(patched["loss"] - clean["loss"], abs=2e-4)
        assert rows["accuracy"][1] == pytest.approx(patched["accuracy"], abs=1 / 64)
        assert rows["loss"][3] == pytest.approx(errors.mean(), rel=1e-3)
        assert rows["loss"][4] == pytest.approx(spliced["loss"] - clean["loss"], abs=2e-4)
        assert rows["loss"][5] == n_tokens
        # Patching something real must move the output, or the check above proves nothing.
        assert rows["kl_divergence"][1] > 1e-4
    assert set(rows) == {"loss", "accuracy", "kl_divergence", "logit_diff"}


def test_patch_between_checkpoints_matches_an_independent_computation(patched_root, tmp_path):
    """The default mode across two checkpoints: the source model's own activations are encoded
    with the source's norm scale and patched into the target model at the target's scale."""
    root = tmp_path / "warehouse"
    shutil.copytree(patched_root, root)  # the null-patch test counts this module's patch rows
    first, last = steps_of(root)[0], steps_of(root)[-1]
    n_tokens = N_SEQUENCES * 16
    source, target = Reference(root, first, n_tokens), Reference(root, last, n_tokens)
    # Different norm scales, so a source encoded at the target's scale would show.
    assert torch.equal(source.tokens, target.tokens) and source.scale != target.scale
    x = target.site()
    f_target, _ = target.codes(x)
    f_source, _ = source.codes(source.site())
    # The two features whose activations differ most between the checkpoints on these tokens:
    # patching them must move the output.
    moved = np.abs(f_source - f_target).sum(axis=(0, 1))
    features = sorted(np.argsort(-moved)[:2].tolist())
    feature_patch("tiny-l2", first, last, features=",".join(map(str, features)), mode="patch",
                  tokens=n_tokens, splits=SPLIT, warehouse=root, progress=False)

    clean = target.metrics(x)
    decoder = target.decoder()
    for feature_set in [[features[0]], [features[1]], features]:
        change = f_source[..., feature_set] - f_target[..., feature_set]
        patched = target.metrics(x + change @ decoder[feature_set] / target.scale)
        rows = stored(root, "patch", ",".join(map(str, feature_set)))
        assert set(rows) == {"loss", "accuracy", "kl_divergence", "logit_diff"}
        # Both sides run the same float32 model, so they agree to about 1e-8; the tolerances
        # are far below the deltas (1e-3 and up), so a wrong patch cannot pass.
        for metric in ("loss", "accuracy", "logit_diff"):
            assert rows[metric][0] == pytest.approx(clean[metric], rel=1e-5), metric
            assert rows[metric][1] == pytest.approx(patched[metric], rel=1e-5), metric
            assert rows[metric][2] == pytest.approx(patched[metric] - clean[metric],
                                                    abs=1e-5), metric
        kl = kl_divergence(clean["logits"], patched["logits"])
        clean_kl, patched_kl, kl_delta = rows["kl_divergence"][:3]
        assert clean_kl == 0 and patched_kl == kl_delta == pytest.approx(kl, rel=1e-5)
        # Patching something real must move the output, or the checks above prove nothing.
        assert kl > 1e-4


@pytest.mark.parametrize("mode, scale", [("patch", None), ("scale", 1.0)])
def test_a_null_patch_changes_nothing(patched_root, mode, scale):
    last = steps_of(patched_root)[-1]
    features = busiest_features(patched_root, last, 3)
    feature_patch("tiny-l2", last, last, features=",".join(map(str, features)), mode=mode,
                  scale=scale, tokens=128, splits=SPLIT, warehouse=patched_root, progress=False)
    rows = query(patched_root, "SELECT metric, delta FROM patches WHERE basis = 'tiny-l2' AND "
                               "mode = ?", [mode])
    assert len(rows) == 4 * 4  # three features alone, all three together; four metrics
    for metric, delta in rows:
        assert abs(delta) < 1e-5, metric


def test_scale_zero_equals_zero_and_mean_uses_the_trajectory(patched_root):
    steps = steps_of(patched_root)
    features = ",".join(map(str, busiest_features(patched_root, steps[-1], 2)))
    common = dict(features=features, tokens=128, splits=SPLIT, warehouse=patched_root,
                  progress=False)
    feature_patch("tiny-l2", steps[0], steps[-1], mode="zero", **common)
    feature_patch("tiny-l2", steps[0], steps[-1], mode="scale", scale=0.0, **common)
    sql = ("SELECT feature_set, metric, patched FROM patches WHERE basis = 'tiny-l2' AND "
           "source_step = ? AND mode = ? ORDER BY ALL")
    zero = query(patched_root, sql, [steps[0], "zero"])
    scaled = query(patched_root, sql, [steps[0], "scale"])
    assert [r[:2] for r in zero] == [r[:2] for r in scaled]
    np.testing.assert_allclose([r[2] for r in zero], [r[2] for r in scaled], rtol=1e-9)

    # mean: every token gets the feature's mean activation at the target, from trajectories.
    feature_patch("tiny-l2", steps[0], steps[-1], mode="mean", **common)
    feature = int(features.split(",")[0])
    (mean,), = query(patched_root, "SELECT mean_activation FROM trajectories WHERE basis = "
                                   "'tiny-l2' AND step = ? AND feature_id = ?",
                     [steps[-1], feature])
    reference = Reference(patched_root, steps[-1], 128)
    x = reference.site()
    f, _ = reference.codes(x)
    moved = (mean - f[..., [feature]]) @ reference.decoder()[[feature]] / reference.scale
    expected = reference.metrics(x + moved)["loss"]
    assert stored(patched_root, "mean", str(feature))["loss"][1] == pytest.approx(expected,
                                                                                  rel=1e-3)


def test_rerunning_replaces_and_top_n_reads_diffs(patched_root, tmp_path):
    from featurestore.ingest.feature_compare import compare_features

    root = tmp_path / "warehouse"
    shutil.copytree(patched_root, root)
    steps = steps_of(root)
    compare_features("tiny-l2", steps[0], steps[-1], warehouse=root)
    top = [f for (f,) in query(root, "SELECT feature_id FROM diffs WHERE basis = 'tiny-l2' "
                                     "ORDER BY rank_by_energy_change LIMIT 2")]
    args = ("tiny-l2", steps[0], steps[-1])
    options = dict(features="top:2", rank_by="energy_change", tokens=64, splits=SPLIT,
                   warehouse=root, progress=False)
    first = feature_patch(*args, **options)
    assert first.features == top
    count = query(root, "SELECT count(*) FROM patches WHERE mode = 'patch' AND source_step = ?",
                  [steps[0]])[0][0]
    feature_patch(*args, **options)
    assert query(root, "SELECT count(*) FROM patches WHERE mode = 'patch' AND source_step = ?",
                 [steps[0]])[0][0] == count == 3 * 4


def test_cli_json(patched_root, tmp_path):
    root = tmp_path / "warehouse"
    shutil.copytree(patched_root, root)
    last = steps_of(root)[-1]
    feature = busiest_features(root, last, 1)[0]
    result = CliRunner().invoke(cli, [
        "--warehouse", str(root), "feature-patch", "--basis", "tiny-l2", "--source", str(last),
        "--target", str(last), "--features", str(feature), "--mode", "zero", "--tokens", "64",
        "--splits", "modular,bigram", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["features"] == [feature] and payload["splits"] == ["modular", "bigram"]
    assert payload["rows"] == 2 * 4 and set(payload["recon_rel_error"]) == {"modular", "bigram"}


@pytest.fixture(scope="module")
def missing_stage_root(patched_root, tmp_path_factory):
    """The tiny run plus a basis fitted on activations registered under a stage its model
    lacks (layer_9_post_mlp: it has four blocks)."""
    from featurestore.ingest.register import register_activations

    root = tmp_path_factory.mktemp("nostage") / "warehouse"
    shutil.copytree(patched_root, root)
    wh = Warehouse(root)
    for step, path in query(root, "SELECT step, path FROM activation_sets WHERE stage = ?",
                            [STAGE]):
        register_activations(str(wh.path(path)), run=TINY_RUN, step=step,
                             stage="layer_9_post_mlp", warehouse=root)
    shared_feature_fit(TINY_RUN, "layer_9_post_mlp", "tiny-l9",
                       checkpoints=",".join(map(str, steps_of(root))), warehouse=root, **FIT)
    return root


@pytest.mark.parametrize("basis, source, target, options, error", [
    ("nope", 0, -1, {}, "--basis 'nope': no such basis"),
    ("tiny-l2", 1, -1, {}, "--source: basis tiny-l2 was not fitted on step 1"),
    ("tiny-l2", 0, 3, {}, "--target: basis tiny-l2 was not fitted on step 3"),
    ("tiny-l2", 0, -1, {"features": "3,64"}, "feature id 64 is out of range"),
    ("tiny-l2", 0, -1, {"features": "top:3"}, "no diffs for basis tiny-l2"),
    ("tiny-l2", 0, -1, {"features": "a,b"}, "give feature ids"),
    ("tiny-l2", 0, -1, {"mode": "scale"}, "--mode scale needs --scale"),
    ("tiny-l2", 0, -1, {"mode": "zero", "scale": 2.0}, "--scale is only used by --mode scale"),
    ("tiny-l2", 0, -1, {"splits": "nope"}, "--splits: unknown split nope"),
    ("tiny-l9", 0, -1, {}, "unknown stage 'layer_9_post_mlp'"),
])
def test_bad_input_fails_and_writes_nothing(missing_stage_root, basis, source, target, options,
                                            error):
    root = missing_stage_root
    steps = steps_of(root)
    target = steps[-1] if target == -1 else target
    options = {"features": "1", "tokens": 32, **options}
    before = snapshot(root)
    with pytest.raises(FeaturestoreError, match=error):
        feature_patch(basis, source, target, warehouse=root, progress=False, **options)
    assert snapshot(root) == before
