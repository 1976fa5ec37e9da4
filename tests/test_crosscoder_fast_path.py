"""The fast training pass (flat GEMMs, batch-summed L1, sparse encoder backward) computes what the
crosscoder's definitions say: checked in float64 against the formulas written out with einsum."""

from __future__ import annotations

import pytest
import torch

from featurestore.crosscoder import CrossCoder, CrossCoderConfig, KeptPreActivations
from featurestore.crosscoder_metrics import total_loss


def model_of(arch: str, n_shared: int = 0, **kwargs) -> CrossCoder:
    torch.manual_seed(0)
    config = CrossCoderConfig(n_sources=3, d_model=5, d_hidden=24, arch=arch, k=3,
                              n_shared=n_shared, **kwargs)
    model = CrossCoder(config).double()
    with torch.no_grad():  # non-zero biases, so their gradients are compared too
        model.b_dec.normal_()
        model.b_enc.normal_(std=0.1)
    return model


def batch(seed: int = 7, tokens: int = 16) -> torch.Tensor:
    return torch.randn(tokens, 3, 5, dtype=torch.float64, generator=torch.Generator()
                       .manual_seed(seed))


def gradients(model: CrossCoder, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.numel()}


@pytest.mark.parametrize("n_shared", [0, 4])
def test_vanilla_pass_matches_the_einsum_definitions(n_shared):
    model = model_of("vanilla", n_shared).train()
    with torch.no_grad():
        model.b_enc[-5:] = -100.0  # latents that cannot fire, so the firing count sees both kinds
    x = batch()
    before = model.tokens_since_fired.clone()
    out = model(x)
    fast = gradients(model, total_loss(model, x, out, l1_coeff=0.7)[0])

    # The dictionary and its L1 weights as the crosscoder's docstring defines them, from the raw
    # parameters: a latent's weight is the sum over sources of its decoder norms; the designated
    # shared latents (the first n_shared) have one decoder vector for every source and pay
    # shared_penalty times that sum.
    n_sources = x.shape[1]
    shared = model.W_dec_shared[:, None, :].expand(-1, n_sources, -1)
    decoder = torch.cat([shared, model.W_dec])
    weights = torch.cat([model.config.shared_penalty * n_sources * model.W_dec_shared.norm(dim=-1),
                         model.W_dec.norm(dim=-1).sum(dim=1)])
    acts = torch.relu(torch.einsum("bsd,sdh->bh", x, model.W_enc) + model.b_enc)
    reconstruction = torch.einsum("bh,hsd->bsd", acts, decoder) + model.b_dec
    sparsity = (acts * weights).sum(dim=1).mean()
    torch.testing.assert_close(out.latents, acts)
    torch.testing.assert_close(out.reconstruction, reconstruction)
    torch.testing.assert_close(out.sparsity, sparsity)
    l2 = (x - reconstruction).pow(2).sum(dim=(1, 2)).mean()
    expected = gradients(model, l2 + 0.7 * sparsity)
    assert fast.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(fast[name], expected[name], msg=name)

    fired = (acts > 0).any(dim=0)
    assert 0 < int(fired.sum()) < model.config.d_hidden  # both cases occur
    assert model.tokens_since_fired[fired].eq(0).all()
    assert torch.equal(model.tokens_since_fired[~fired], before[~fired] + len(x))


def test_kept_pre_activations_gradients_match_finite_differences():
    model = model_of("batchtopk")
    x = batch(tokens=6).requires_grad_(True)
    active = torch.tensor([0, 5, 23, 30, 31, 47, 100, 143])  # flat indices, token order; some none
    W, b = model.W_enc.detach().clone(), model.b_enc.detach().clone()

    def kept(W, b, x):
        pre = torch.addmm(b, x.reshape(len(x), -1), W.reshape(-1, W.shape[-1]))
        return KeptPreActivations.apply(W, b, x, pre.detach(), active)

    assert torch.autograd.gradcheck(kept, (W.requires_grad_(), b.requires_grad_(), x))


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_a_bf16_autocast_step_is_close_to_float32(arch):
    """The GPU benchmark's bf16 path, run on CPU: the dtypes meet, the loss stays close."""
    config = CrossCoderConfig(2, 16, 64, arch=arch, k=4, aux_k=4, dead_after_tokens=1)
    x = torch.randn(64, 2, 16, generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for autocast in (False, True):
        torch.manual_seed(0)
        model = CrossCoder(config).train()
        with torch.no_grad():
            model.tokens_since_fired[::2] = 5  # half the latents dead, so AuxK runs too
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = total_loss(model, x, model(x), l1_coeff=1.0)[0]
        losses.append(loss.item())
        grads.append(gradients(model, loss))
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    for name, grad in grads[1].items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
