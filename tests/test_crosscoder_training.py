"""The crosscoder trainer: exact resume, divergence, metrics against numpy, bad sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurestore.activations import ActivationSet, TokenColumns, write_activation_set
from featurestore.aligned import AlignedActivations, Source
from featurestore.crosscoder import CrossCoder, CrossCoderConfig
from featurestore.crosscoder_metrics import batch_metrics
from featurestore.crosscoder_training import TrainerConfig, norm_loss_at, train_crosscoder
from featurestore.errors import FeaturestoreError, InvalidActivationsError


def tokens(n: int, seed: int = 0) -> TokenColumns:
    rng = np.random.default_rng(seed)
    return TokenColumns(np.arange(n) // 8, (np.arange(n) % 8).astype(np.int32),
                        rng.integers(0, 50, n), np.array(["s"] * n, dtype=object))


def make_sources(tmp_path, n=512, d=8, n_sources=2, seed=0, overrides=None):
    overrides = overrides or {}
    rng = np.random.default_rng(seed)
    token_columns = tokens(n)
    sources = []
    for i in range(n_sources):
        values = overrides.get(i, rng.standard_normal((n, d)).astype(np.float32))
        columns = overrides.get(f"tokens{i}", token_columns)
        write_activation_set(tmp_path / f"s{i}", values, columns)
        sources.append(Source(f"S{i}", ActivationSet(tmp_path / f"s{i}", norm_scale=1.5,
                                                     name=f"s{i}")))
    return sources


def small_model(arch="batchtopk", **kwargs):
    torch.manual_seed(0)
    config = CrossCoderConfig(n_sources=2, d_model=8, d_hidden=32, arch=arch, k=4,
                              source_labels=("S0", "S1"), **kwargs)
    return CrossCoder(config, torch.tensor([1.5, 1.5]))


TRAIN = TrainerConfig(steps=24, batch_size=64, warmup_steps=3, log_every=4, save_every=6)


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_a_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, arch):
    data = AlignedActivations(make_sources(tmp_path), seed=3)
    straight = small_model(arch, aux_k=4, dead_after_tokens=128)
    uninterrupted = train_crosscoder(straight, data, TRAIN, tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill_at_14(step):
        if step == 14:
            raise Killed

    interrupted = small_model(arch, aux_k=4, dead_after_tokens=128)
    with pytest.raises(Killed):
        train_crosscoder(interrupted, data, TRAIN, tmp_path / "b", progress=False,
                         on_step=kill_at_14)
    resumed_model = small_model(arch, aux_k=4, dead_after_tokens=128)  # a fresh process
    resumed = train_crosscoder(resumed_model, data, TRAIN, tmp_path / "b", resume=True,
                               progress=False)
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name
    assert resumed.metrics == uninterrupted.metrics


def test_resume_refuses_changed_settings_or_a_missing_state(tmp_path):
    data = AlignedActivations(make_sources(tmp_path))
    train_crosscoder(small_model(), data, TRAIN, tmp_path / "state", progress=False)
    with pytest.raises(FeaturestoreError, match="different settings .lr"):
        train_crosscoder(small_model(), data, TrainerConfig(**{**TRAIN.to_dict(), "lr": 0.5,
                                                              "betas": TRAIN.betas}),
                         tmp_path / "state", resume=True, progress=False)
    with pytest.raises(FeaturestoreError, match="no saved training state"):
        train_crosscoder(small_model(), data, TRAIN, tmp_path / "none", resume=True,
                         progress=False)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_state(tmp_path):
    data = AlignedActivations(make_sources(tmp_path))
    model = small_model("vanilla")

    def poison(step):
        if step == 13:
            with torch.no_grad():
                model.W_enc.fill_(float("nan"))

    with pytest.raises(FeaturestoreError, match="diverged at step 13.*state .step 12"):
        train_crosscoder(model, data, TRAIN, tmp_path / "state", progress=False, on_step=poison)


def test_metrics_equal_an_independent_numpy_computation(tmp_path):
    model = small_model("vanilla")
    x = torch.randn(32, 2, 8)
    out = model(x)
    metrics = batch_metrics(model, x, out, l1_coeff=0.5, lr=1e-3)
    xn, rn = x.numpy().astype(np.float64), out.reconstruction.detach().numpy().astype(np.float64)
    f = out.latents.detach().numpy().astype(np.float64)
    dec = model.decoder().detach().numpy().astype(np.float64)
    weights = np.linalg.norm(dec, axis=2).sum(axis=1)
    l2 = ((xn - rn) ** 2).sum(axis=(1, 2)).mean()
    l1 = (f * weights).sum(axis=1).mean()
    assert metrics["l2_loss"] == pytest.approx(l2, rel=1e-5)
    assert metrics["l1_loss"] == pytest.approx(l1, rel=1e-5)
    assert metrics["loss"] == pytest.approx(l2 + 0.5 * l1, rel=1e-5)
    assert metrics["l0_loss"] == pytest.approx((f > 0).sum(axis=1).mean())
    for s, label in enumerate(["S0", "S1"]):
        ev = 1 - ((xn[:, s] - rn[:, s]) ** 2).sum() / ((xn[:, s] - xn[:, s].mean(0)) ** 2).sum()
        assert metrics[f"explained_variance_{label}"] == pytest.approx(ev, rel=1e-5, abs=1e-6)
    total = 1 - ((xn - rn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert metrics["explained_variance"] == pytest.approx(total, rel=1e-5, abs=1e-6)


def test_the_end_of_training_minimises_the_error_norm_for_the_archs_with_a_k():
    """The last norm_loss_fraction of the steps: BatchTopK's loss is the mean over tokens and
    sources of ||x_s - x_hat_s|| (numpy); vanilla keeps its squared error and L1."""
    x = torch.randn(32, 2, 8)
    for arch in ("batchtopk", "vanilla"):
        model = small_model(arch)
        out = model(x)
        metrics = batch_metrics(model, x, out, l1_coeff=0.5, lr=1e-3, norm_loss=True)
        error = (x - out.reconstruction).detach().numpy().astype(np.float64)
        l2 = (error ** 2).sum(axis=(1, 2)).mean()
        assert metrics["l2_loss"] == pytest.approx(l2, rel=1e-5)
        if arch == "batchtopk":  # no AuxK here, no penalty
            expected = np.linalg.norm(error, axis=2).mean()
        else:
            expected = l2 + 0.5 * metrics["l1_loss"]
        assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    config = TrainerConfig(steps=10, norm_loss_fraction=0.2)
    assert [norm_loss_at(step, config) for step in range(10)] == [False] * 8 + [True] * 2
    assert not any(norm_loss_at(step, TrainerConfig(steps=10, norm_loss_fraction=0.0))
                   for step in range(10))


def test_the_shuffle_covers_every_row_once_per_epoch(tmp_path):
    data = AlignedActivations(make_sources(tmp_path, n=100), seed=1)
    rows = np.concatenate([data.indices_for_step(s, 30) for s in range(10)])  # 3 epochs
    for epoch in range(3):
        assert sorted(rows[epoch * 100:(epoch + 1) * 100]) == list(range(100))
    assert not np.array_equal(rows[:100], rows[100:200])
    batch = data.batch(data.indices_for_step(2, 30))
    expected = data.sources[1].activations.rows(data.indices_for_step(2, 30), normalized=True)
    np.testing.assert_array_equal(batch[:, 1].numpy(), expected)


def test_bad_sources_fail_before_training(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((512, 16)).astype(np.float32)
    with pytest.raises(InvalidActivationsError, match="d_model mismatch"):
        AlignedActivations(make_sources(tmp_path / "a", overrides={1: wide}))
    with pytest.raises(InvalidActivationsError, match="different tokens .first difference"):
        AlignedActivations(make_sources(tmp_path / "b", overrides={"tokens1": tokens(512, seed=9)}))
    bad = rng.standard_normal((512, 8)).astype(np.float32)
    bad[100, 3] = np.nan
    with pytest.raises(InvalidActivationsError, match="NaN/Inf.*first bad row 100"):
        AlignedActivations(make_sources(tmp_path / "c", overrides={0: bad}))
    short = rng.standard_normal((256, 8)).astype(np.float32)
    with pytest.raises(InvalidActivationsError, match="has 512 tokens but S1 has 256"):
        AlignedActivations(make_sources(tmp_path / "d",
                                        overrides={1: short, "tokens1": tokens(256)}))
    with pytest.raises(InvalidActivationsError, match="at least one"):
        AlignedActivations([])
    # An empty set, as Parquet (datasets cannot even save an empty table).
    import pyarrow as pa
    import pyarrow.parquet as pq

    no_rows = pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), 8)
    pq.write_table(pa.table({"activations": no_rows, "sequence_id": pa.array([], pa.int64()),
                             "position": pa.array([], pa.int32()),
                             "token_id": pa.array([], pa.int64()),
                             "split": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    empty = ActivationSet(tmp_path / "empty.parquet", "parquet", norm_scale=1.0)
    with pytest.raises(InvalidActivationsError, match="S0: the activation set is empty"):
        AlignedActivations([Source("S0", empty), Source("S1", empty)])
