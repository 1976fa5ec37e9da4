"""BatchTopK's sparse decode and selection give the dense decode's and topk's results."""

from __future__ import annotations

import pytest
import torch

from featurestore.crosscoder import CrossCoder, CrossCoderConfig, sparse_reconstruct, top_k_flat


def model_of(n_shared: int, seed: int = 0, **kwargs) -> CrossCoder:
    torch.manual_seed(seed)
    config = CrossCoderConfig(n_sources=3, d_model=5, d_hidden=24, k=3, n_shared=n_shared,
                              **kwargs)
    model = CrossCoder(config).double()
    with torch.no_grad():  # non-zero biases, so their gradients are compared too
        model.b_dec.normal_()
        model.b_enc.normal_(std=0.1)
    return model


def random_code(batch: int, d_hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, sorted flat indices): a random number of latents per token, none for some."""
    generator = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, d_hidden, generator=generator) < 0.2
    active[::3] = False  # every third token has no active latent
    active[1, :] = True  # and one has every latent active
    indices = active.flatten().nonzero().squeeze(1)
    values = torch.rand(indices.numel(), generator=generator, dtype=torch.float64) + 0.1
    return values, indices


def params(model: CrossCoder) -> dict[str, torch.Tensor]:
    return {"W_dec": model.W_dec, "W_dec_shared": model.W_dec_shared, "b_dec": model.b_dec}


@pytest.mark.parametrize("n_shared", [0, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_reconstruct_matches_dense(n_shared, seed):
    model = model_of(n_shared, seed)
    batch, h = 10, model.config.d_hidden
    values, indices = random_code(batch, h, seed)
    target = torch.randn(batch, 3, 5, dtype=torch.float64, generator=torch.Generator()
                         .manual_seed(seed + 100))

    def loss_and_grads(sparse: bool):
        model.zero_grad(set_to_none=True)
        v = values.clone().requires_grad_(True)
        if sparse:
            x_hat = sparse_reconstruct(v, indices, batch, model.decoder(), model.b_dec)
        else:
            dense = torch.zeros(batch * h, dtype=v.dtype).index_put((indices,), v).view(batch, h)
            x_hat = model.reconstruct(dense, model.decoder())
        (x_hat - target).pow(2).sum().backward()
        grads = {name: p.grad.clone() for name, p in params(model).items() if p.numel()}
        return x_hat.detach(), {**grads, "values": v.grad.clone()}

    sparse_out, sparse_grads = loss_and_grads(True)
    dense_out, dense_grads = loss_and_grads(False)
    torch.testing.assert_close(sparse_out, dense_out)
    assert sparse_out[0].eq(model.b_dec.detach()).all()  # no active latent: the bias alone
    assert sparse_grads.keys() == dense_grads.keys()
    assert ("W_dec_shared" in sparse_grads) == bool(n_shared)
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], msg=name)


def dense_forward(model: CrossCoder, x: torch.Tensor) -> torch.Tensor:
    """The BatchTopK reconstruction as it was written before the sparse decode."""
    decoder = model.decoder()
    acts = torch.relu(model.pre_activations(x))
    scores = acts * model.decoder_norms(decoder).sum(dim=1)
    top = scores.flatten().topk(model.config.k * x.shape[0], sorted=False).indices
    mask = torch.zeros_like(scores).flatten().scatter_(0, top, 1.0).view_as(scores)
    return model.reconstruct(acts * mask, decoder)


@pytest.mark.parametrize("n_shared", [0, 4])
def test_batchtopk_forward_and_gradients_match_dense_decode(n_shared):
    model = model_of(n_shared).eval()  # eval: no threshold update, so both passes see the same
    x = torch.randn(16, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def run(forward):
        model.zero_grad(set_to_none=True)
        reconstruction = forward(x)
        (x - reconstruction).pow(2).sum().backward()
        return reconstruction.detach(), {name: p.grad.clone()
                                         for name, p in model.named_parameters() if p.numel()}

    sparse_out, sparse_grads = run(lambda x: model(x).reconstruction)
    dense_out, dense_grads = run(lambda x: dense_forward(model, x))
    torch.testing.assert_close(sparse_out, dense_out)
    assert sparse_grads.keys() == dense_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], msg=name)
    # The reported code is still the dense one, k per token on average.
    assert (model(x).latents > 0).sum() <= model.config.k * x.shape[0]


@pytest.mark.parametrize("arch", ["vanilla", "batchtopk"])
def test_aux_loss_matches_dense_decode(arch):
    model = model_of(2, arch=arch, aux_k=4, dead_after_tokens=1).train()
    with torch.no_grad():
        model.tokens_since_fired[::2] = 5  # half the latents dead
    x = torch.randn(12, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = model(x)
    model.zero_grad(set_to_none=True)
    out.aux_loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # The same loss with the dense decode of the aux code, from the state before the step.
    model2 = model_of(2, arch=arch, aux_k=4, dead_after_tokens=1).train()
    with torch.no_grad():
        model2.tokens_since_fired[::2] = 5
    dead = model2.tokens_since_fired >= model2.config.dead_after_tokens
    decoder = model2.decoder()
    acts = torch.relu(model2.pre_activations(x))
    if arch == "batchtopk":
        reconstruction = dense_forward(model2, x)
    else:
        reconstruction = model2.reconstruct(acts, decoder)
    residual = (x - reconstruction).detach()
    top = (acts * dead).topk(4, dim=1)
    code = torch.zeros_like(acts).scatter(1, top.indices, top.values)
    predicted = torch.einsum("bh,hsd->bsd", code, decoder)
    relative = (residual - predicted).pow(2).sum() / residual.pow(2).sum()
    expected = relative * (x - x.mean(dim=0)).pow(2).sum(dim=(1, 2)).mean()
    torch.testing.assert_close(out.aux_loss, expected)
    expected.backward()
    dense_grads = {n: p.grad.clone() for n, p in model2.named_parameters() if p.grad is not None}
    assert sparse_grads.keys() == dense_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], msg=name)


@pytest.mark.parametrize("case", ["random", "few_positive", "all_equal", "skewed", "large_keep"])
def test_top_k_flat_selects_what_topk_selects(case):
    generator = torch.Generator().manual_seed(5)
    scores = torch.relu(torch.randn(64, 200, generator=generator))
    keep = 64 * 8
    if case == "few_positive":  # fewer positive scores than keep: ties at zero fill the rest
        scores = scores * (torch.rand(64, 200, generator=generator) < 0.02)
    elif case == "all_equal":
        scores = torch.ones(64, 200)
    elif case == "skewed":  # the sample sees only large scores: its bound is too high, and the
        scores.view(-1)[::17] += 10  # full topk has to run
    elif case == "large_keep":
        keep = 64 * 150
    values, indices = top_k_flat(scores.flatten(), keep)
    expected = scores.flatten().topk(keep, sorted=False)
    assert indices.numel() == keep == indices.unique().numel()
    torch.testing.assert_close(values.sort().values, expected.values.sort().values)
    torch.testing.assert_close(scores.flatten()[indices], values)
    if case in ("random", "skewed", "large_keep"):  # no ties: the very same latents
        assert torch.equal(indices.sort().values, expected.indices.sort().values)
