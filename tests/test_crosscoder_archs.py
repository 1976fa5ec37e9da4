"""TopK, JumpReLU and Matryoshka crosscoders: encode semantics on hand examples, the training
terms against direct computations, planted-dictionary recovery, exact resume and the jobs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featurestore.aligned import AlignedActivations
from featurestore.cli import cli
from featurestore.crosscoder import CrossCoder, CrossCoderConfig, default_group_sizes
from featurestore.crosscoder_metrics import batch_metrics, total_loss
from featurestore.crosscoder_training import TrainerConfig, train_crosscoder
from featurestore.dictionary_kinds import ARCHS

from .conftest import RELAXED_FLAGS, TINY_RUN, basis_path, query, snapshot
from .test_crosscoder_recovery import (
    MIN_CORRECTLY_CLASSIFIED,
    MIN_MEAN_COSINE,
    K,
    correctly_classified,
    mean_best_cosines,
    planted,  # noqa: F401 (the planted-dictionary fixture)
    untrained,
)
from .test_crosscoder_training import TRAIN, make_sources, small_model

NEW_ARCHS = ["topk", "jumprelu", "matryoshka"]

# --- encode: hand examples against numpy ---------------------------------------------------------

# One source of d_model 2, four latents; pre-activations x @ W_ENC + B_ENC.
W_ENC = np.array([[1.0, 0.0, 1.0, -1.0], [0.0, 1.0, 1.0, 2.0]])
B_ENC = np.array([0.0, 0.0, -0.5, 0.1])
# Decoder norms far apart, so that ranking by activation x decoder norm would choose otherwise.
DECODER_NORMS = np.array([0.1, 1.0, 1.0, 5.0])
X = np.array([[3.0, 1.0], [0.7, 2.0], [-1.0, -1.0], [1.0, 1.2]])


def hand_model(arch: str, **config) -> CrossCoder:
    model = CrossCoder(CrossCoderConfig(n_sources=1, d_model=2, d_hidden=4, arch=arch,
                                        **{"k": 2, **config}))
    with torch.no_grad():
        model.W_enc.copy_(torch.tensor(W_ENC[None], dtype=torch.float32))
        model.b_enc.copy_(torch.tensor(B_ENC, dtype=torch.float32))
        model.W_dec.mul_(torch.tensor(DECODER_NORMS, dtype=torch.float32)[:, None, None]
                         / model.W_dec.norm(dim=-1, keepdim=True))
    return model


def encode(model: CrossCoder) -> np.ndarray:
    return model.encode(torch.tensor(X[:, None, :], dtype=torch.float32)).double().numpy()


def test_topk_keeps_each_tokens_k_largest_activations_unweighted_by_decoder_norms():
    relu = np.maximum(X @ W_ENC + B_ENC, 0)
    expected = np.zeros_like(relu)
    for token, row in enumerate(relu):
        kept = np.argsort(-row)[:2]
        expected[token, kept] = row[kept]
    got = encode(hand_model("topk"))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Weighted by decoder norms (0.3, 1, 3.5, 0) the first token would keep latents 1 and 2.
    assert got[0].nonzero()[0].tolist() == [0, 2]


def test_jumprelu_keeps_each_activation_above_its_latents_threshold():
    thresholds = np.array([0.5, 2.5, 1.0, 0.05])
    model = hand_model("jumprelu")
    with torch.no_grad():
        model.log_threshold.copy_(torch.tensor(np.log(thresholds), dtype=torch.float32))
    pre = X @ W_ENC + B_ENC
    expected = np.where(pre > thresholds, np.maximum(pre, 0), 0.0)
    np.testing.assert_allclose(encode(model), expected, rtol=1e-6)
    assert 0 < (expected > 0).sum() < np.maximum(pre, 0).astype(bool).sum()  # thresholds bite


def test_matryoshka_encodes_as_batchtopk_does():
    batchtopk, matryoshka = hand_model("batchtopk"), hand_model("matryoshka", group_sizes=(1, 3))
    for model in (batchtopk, matryoshka):
        model.threshold.fill_(1.3)  # no score within rounding of it
    np.testing.assert_array_equal(encode(matryoshka), encode(batchtopk))
    relu = np.maximum(X @ W_ENC + B_ENC, 0)
    np.testing.assert_allclose(encode(matryoshka), np.where(relu * DECODER_NORMS > 1.3, relu, 0),
                               rtol=1e-6)


def test_only_jumprelu_has_a_log_threshold_and_old_configs_still_load():
    assert set(hand_model("jumprelu").state_dict()) - set(hand_model("batchtopk").state_dict()) \
        == {"log_threshold"}
    for arch in ARCHS:
        if arch != "jumprelu":
            assert "log_threshold" not in hand_model(arch).state_dict()
    saved_before = {"n_sources": 1, "d_model": 2, "d_hidden": 4, "arch": "batchtopk", "k": 2,
                    "source_labels": ["x"]}  # a config written before these archs existed
    assert CrossCoderConfig.from_dict(saved_before).group_sizes == ()
    config = CrossCoderConfig(n_sources=1, d_model=2, d_hidden=128, arch="matryoshka")
    assert config.group_sizes == default_group_sizes(128) == (4, 8, 16, 32, 68)
    assert CrossCoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("d_hidden", [1, 2, 3, 7, 31, 100, 16384])
def test_default_group_sizes_double_and_sum_to_the_dictionary(d_hidden):
    sizes = default_group_sizes(d_hidden)
    assert sum(sizes) == d_hidden and all(n >= 1 for n in sizes)
    assert len(sizes) == min(5, int(math.log2(d_hidden + 1)))
    assert all(b == 2 * a for a, b in zip(sizes, sizes[1:-1]))


def test_bad_matryoshka_groups_are_refused():
    with pytest.raises(ValueError, match="sum to 6, not to d_hidden .8."):
        CrossCoderConfig(n_sources=1, d_model=2, d_hidden=8, arch="matryoshka", k=2,
                         group_sizes=(2, 4))
    with pytest.raises(ValueError, match="group_sizes are for arch matryoshka"):
        CrossCoderConfig(n_sources=1, d_model=2, d_hidden=8, arch="topk", k=2, group_sizes=(8,))


# --- the training terms against direct computations ----------------------------------------------


def test_the_jumprelu_threshold_gradient_is_the_rectangle_kernel_pseudo_derivative():
    torch.manual_seed(0)
    bandwidth, l0_coeff = 0.6, 0.3
    model = CrossCoder(CrossCoderConfig(n_sources=1, d_model=4, d_hidden=6, arch="jumprelu",
                                        jumprelu_bandwidth=bandwidth))
    with torch.no_grad():
        model.log_threshold.copy_(torch.linspace(-1.0, 0.5, 6))
    x = torch.randn(40, 1, 4) * 2
    weights = torch.randn(40, 6)  # an arbitrary linear function of the code
    out = model(x)
    (out.latents * weights).sum().add(l0_coeff * out.l0_penalty).backward()

    pre = (x[:, 0].double().numpy() @ model.W_enc.detach()[0].double().numpy()
           + model.b_enc.detach().double().numpy())
    t = model.log_threshold.detach().exp().double().numpy()
    g, xs = weights.double().numpy(), x[:, 0].double().numpy()
    active, window = pre > t, np.abs(pre - t) < bandwidth / 2
    assert window.sum() > 10  # the example exercises the kernel
    np.testing.assert_allclose(out.latents.detach().numpy(), pre * active, rtol=1e-5, atol=1e-6)
    assert out.l0_penalty.item() == pytest.approx(active.sum(axis=1).mean())
    # d/dt of the code: -(t / bandwidth) in the window; of the mean count: -(1 / bandwidth) / n.
    d_threshold = -(window * (g * t + l0_coeff / len(xs))).sum(axis=0) / bandwidth
    np.testing.assert_allclose(model.log_threshold.grad.double().numpy(), d_threshold * t,
                               rtol=1e-4, atol=1e-6)
    # pre-activations get the plain gradient through the active entries, none from the count
    np.testing.assert_allclose(model.b_enc.grad.double().numpy(), (g * active).sum(axis=0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.W_enc.grad[0].double().numpy(), xs.T @ (g * active),
                               rtol=1e-4, atol=1e-4)


def matryoshka_model() -> CrossCoder:
    torch.manual_seed(0)
    return CrossCoder(CrossCoderConfig(n_sources=2, d_model=5, d_hidden=14, arch="matryoshka",
                                       k=3, group_sizes=(2, 4, 8), source_labels=("a", "b")))


def test_the_matryoshka_loss_is_the_mean_of_the_prefix_reconstruction_errors():
    model = matryoshka_model()
    x = torch.randn(24, 2, 5) * 2
    out = model(x)
    f = out.latents.detach().double().numpy()
    assert 0 < (f > 0).sum() <= 3 * 24
    decoder = model.decoder().detach().double().numpy().reshape(14, -1)
    bias = model.b_dec.detach().double().numpy().reshape(-1)
    xs = x.double().numpy().reshape(24, -1)
    errors = [((xs - f[:, :m] @ decoder[:m] - bias) ** 2).sum(axis=1).mean() for m in (2, 6, 14)]
    assert out.prefix_l2.item() == pytest.approx(np.mean(errors), rel=1e-5)
    np.testing.assert_allclose(out.reconstruction.detach().double().numpy().reshape(24, -1),
                               f @ decoder + bias, rtol=1e-5, atol=1e-5)
    metrics = batch_metrics(model, x, out, l1_coeff=0.5, lr=1e-3)
    assert metrics["l2_loss"] == pytest.approx(errors[-1], rel=1e-5)
    assert metrics["prefix_l2_loss"] == pytest.approx(np.mean(errors), rel=1e-5)
    assert metrics["loss"] == pytest.approx(np.mean(errors), rel=1e-5)  # no L1 term, no AuxK


def test_the_matryoshka_gradients_equal_a_dense_decode_of_every_prefix():
    x = torch.randn(24, 2, 5) * 2
    fast = matryoshka_model()
    total_loss(fast, x, fast(x), l1_coeff=0.0)[0].backward()

    dense = matryoshka_model()
    kept = fast(x).latents.detach() > 0  # the same selection: same weights, same batch
    latents = torch.relu(dense.pre_activations(x)) * kept
    decoder = dense.decoder()
    errors = [(x - dense.reconstruct(latents[:, :m], decoder[:m])).pow(2).sum(dim=(1, 2)).mean()
              for m in (2, 6, 14)]
    torch.stack(errors).mean().backward()
    for name, parameter in dense.named_parameters():
        torch.testing.assert_close(dict(fast.named_parameters())[name].grad, parameter.grad,
                                   rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_training_selects_the_code_encode_gives(arch):
    torch.manual_seed(0)
    model = CrossCoder(CrossCoderConfig(n_sources=2, d_model=6, d_hidden=20, arch=arch, k=3,
                                        source_labels=("a", "b")))
    x = torch.randn(32, 2, 6) * 2
    torch.testing.assert_close(model(x).latents.detach(), model.encode(x, normalized=True))


# --- recovery of the planted dictionary (tests/test_crosscoder_recovery.py) ---------------------


def trained(arch: str, data: AlignedActivations, state_dir, l0_coeff: float = 1.0,
            **config) -> CrossCoder:
    """As test_crosscoder_recovery trains BatchTopK: 600 steps of 256 tokens, a few seconds."""
    model = untrained(arch, data, **config)
    trainer = TrainerConfig(steps=600, batch_size=256, lr=3e-3, warmup_steps=50,
                            l0_coeff=l0_coeff, log_every=600, save_every=600, seed=0)
    train_crosscoder(model, data, trainer, state_dir, progress=False)
    return model


def held_out_fit(model: CrossCoder, x: torch.Tensor, prefix: int | None = None
                 ) -> tuple[float, float]:
    """(L0, explained variance) of the inference code on held-out tokens, from the first
    `prefix` latents only if given."""
    codes = model.encode(x)
    if prefix is not None:
        codes[:, prefix:] = 0
    explained = 1 - (x - model.decode(codes)).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    return (codes > 0).sum(dim=1).float().mean().item(), explained.item()


def assert_recovered(model: CrossCoder, planted):  # noqa: F811
    cosines = mean_best_cosines(model, planted.truth)
    assert min(cosines.values()) >= MIN_MEAN_COSINE, cosines
    assert correctly_classified(model, planted.truth) >= MIN_CORRECTLY_CLASSIFIED


@pytest.mark.slow
def test_topk_recovers_the_planted_dictionary(planted, tmp_path):  # noqa: F811
    # Measured: mean best cosine 0.995, every feature classified.
    model = trained("topk", planted.data, tmp_path, k=K, aux_k=4 * K, dead_after_tokens=1024)
    assert_recovered(model, planted)
    l0, _ = held_out_fit(model, planted.held_out)
    assert l0 == pytest.approx(K, abs=0.05)  # exactly k a token, bar the odd token with fewer


@pytest.mark.slow
def test_jumprelu_recovers_the_planted_dictionary(planted, tmp_path):  # noqa: F811
    # The planted features are large beside the L0 price: in normalised units (d_model 32) a
    # feature's squared activation is tens. Measured: mean best cosine 1.000, L0 2.0 for K = 2,
    # 99.8% of the variance; with l0_coeff 1, the default, cosine 0.97 and L0 2.7.
    model = trained("jumprelu", planted.data, tmp_path, l0_coeff=10.0)
    assert_recovered(model, planted)
    l0, explained = held_out_fit(model, planted.held_out)
    assert K / 2 <= l0 <= 2 * K and explained >= 0.9, (l0, explained)
    # The L0 penalty raised the thresholds (measured: median 1.56 from 1).
    assert model.log_threshold.exp().median() > 1.2 * model.config.jumprelu_init_threshold


@pytest.mark.slow
def test_matryoshka_recovers_the_planted_dictionary_and_its_first_groups_stand_alone(
        planted, tmp_path):  # noqa: F811
    model = trained("matryoshka", planted.data, tmp_path, k=K, aux_k=4 * K,
                    dead_after_tokens=1024)
    assert model.config.group_sizes == (4, 8, 16, 32, 68)
    assert_recovered(model, planted)
    l0, explained = held_out_fit(model, planted.held_out)
    assert K / 2 <= l0 <= 2 * K and explained >= 0.9, (l0, explained)
    # The first two groups, latents for 12 of the 40 equally frequent features, carry their 30%
    # share of the variance on their own (measured: 37%); a BatchTopK dictionary's first 12
    # latents carry about nothing (measured: 5%), since it has no reason to put features there.
    _, first_groups = held_out_fit(model, planted.held_out, prefix=12)
    assert first_groups >= 0.2, first_groups


# --- resume, jobs and the command line -----------------------------------------------------------


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_a_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, arch):
    data = AlignedActivations(make_sources(tmp_path), seed=3)
    options = {"aux_k": 4, "dead_after_tokens": 128}
    trainer = TrainerConfig(**{**TRAIN.to_dict(), "betas": TRAIN.betas, "l0_coeff": 0.05})
    straight = small_model(arch, **options)
    uninterrupted = train_crosscoder(straight, data, trainer, tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill_at_14(step):
        if step == 14:
            raise Killed

    with pytest.raises(Killed):
        train_crosscoder(small_model(arch, **options), data, trainer, tmp_path / "b",
                         progress=False, on_step=kill_at_14)
    resumed_model = small_model(arch, **options)  # a fresh process
    resumed = train_crosscoder(resumed_model, data, trainer, tmp_path / "b", resume=True,
                               progress=False)
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[name]), name
    assert resumed.metrics == uninterrupted.metrics
    if arch == "jumprelu":
        assert not torch.equal(straight.log_threshold,
                               small_model(arch, **options).log_threshold)  # it was trained


STAGE = "layer_2_post_mlp"
BASE = f"base={TINY_RUN}@0:{STAGE}"


def run_cli(warehouse, *args):
    return CliRunner().invoke(cli, ["--warehouse", str(warehouse), "--threads", "1", *args,
                                    *RELAXED_FLAGS, "--json", "--quiet"])


def test_train_crosscoder_trains_and_registers_a_jumprelu_sae(warehouse_copy):
    result = run_cli(warehouse_copy, "train-crosscoder", "--name", "jr", "--source", BASE,
                     "--arch", "jumprelu", "--dict-size", "32", "--steps", "10",
                     "--batch-size", "64", "--log-every", "5", "--l0-coeff", "0.5",
                     "--jumprelu-bandwidth", "0.2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["arch"] == "jumprelu"
    ((arch, k, config, trainer, final),) = query(
        warehouse_copy, "SELECT arch, k, config, trainer_config, final_metrics FROM bases")
    assert (arch, k) == ("jumprelu", None)
    assert json.loads(config)["jumprelu_bandwidth"] == 0.2
    assert json.loads(trainer)["l0_coeff"] == 0.5
    assert json.loads(final)["l0_coeff"] == 0.5  # warmed up by the last step
    model = CrossCoder.load(basis_path(warehouse_copy, "jr"))
    assert model.config.arch == "jumprelu" and model.log_threshold.shape == (32,)
    metrics = {m for (m,) in query(warehouse_copy, "SELECT DISTINCT metric FROM training_metrics")}
    assert {"l0_coeff", "l0_loss", "explained_variance_base"} <= metrics


def test_shared_feature_fit_fits_a_matryoshka_basis(warehouse_copy):
    steps = [str(step) for (step,) in query(
        warehouse_copy, "SELECT step FROM activation_sets WHERE run = ? AND stage = ? "
        "ORDER BY step", [TINY_RUN, STAGE])]
    result = run_cli(warehouse_copy, "shared-feature-fit", "--run", TINY_RUN, "--stage", STAGE,
                     "--checkpoints", ",".join(steps), "--name", "nested", "--arch", "matryoshka",
                     "--dict-size", "64", "--group-sizes", "8,16,40", "--k", "4", "--steps",
                     "20", "--batch-size", "128")
    assert result.exit_code == 0, result.output
    ((arch, k, config, final),) = query(
        warehouse_copy, "SELECT arch, k, config, final_metrics FROM bases WHERE name = 'nested'")
    assert (arch, k, json.loads(config)["group_sizes"]) == ("matryoshka", 4, [8, 16, 40])
    assert json.loads(final)["prefix_l2_loss"] >= json.loads(final)["l2_loss"]
    model = CrossCoder.load(basis_path(warehouse_copy, "nested"))
    assert model.config.group_sizes == (8, 16, 40) and model.threshold > 0  # calibrated


@pytest.mark.parametrize("args, message", [
    (["--arch", "matryoshka", "--dict-size", "64", "--group-sizes", "8,16"],
     "--group-sizes 8,16 sum to 24, not to the dictionary's 64 latents"),
    (["--arch", "matryoshka", "--group-sizes", "8,x"], "--group-sizes '8,x': give the"),
    (["--arch", "matryoshka", "--dict-size", "64", "--group-sizes", "0,64"],
     "--group-sizes 0,64: give positive integers"),
    (["--arch", "batchtopk", "--group-sizes", "8,56"], "--group-sizes is Matryoshka's"),
    (["--arch", "topk", "--jumprelu-bandwidth", "0.1"], "--jumprelu-bandwidth is JumpReLU's"),
])
@pytest.mark.parametrize("command", ["train-crosscoder", "shared-feature-fit"])
def test_bad_arch_options_fail_naming_the_flag(warehouse_copy, command, args, message):
    where = (["--source", BASE] if command == "train-crosscoder"
             else ["--run", TINY_RUN, "--stage", STAGE])
    before = snapshot(warehouse_copy)
    result = run_cli(warehouse_copy, command, "--name", "bad", *where, *args)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception
    assert message in result.output, result.output
    assert snapshot(warehouse_copy) == before


def test_the_command_lines_offer_every_arch():
    for name in ("train-crosscoder", "shared-feature-fit"):
        (arch,) = [p for p in cli.commands[name].params if p.name == "arch"]
        assert sorted(arch.type.choices) == sorted(ARCHS)
