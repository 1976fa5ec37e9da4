"""Crosscoder metrics: one definition for training logs, evaluation and the warehouse.

All in normalised units, over one batch x [batch, n_sources, d_model]:

    l2_loss               mean over tokens of sum over sources and dims of (x - x_hat)^2
    prefix_l2_loss        matryoshka: the mean over the nested prefixes of their own l2_loss
    l1_loss               the decoder-norm-weighted L1 of the latents (before its coefficient)
    l0_loss               mean number of active latents per token
    aux_loss              the AuxK loss (0 when unused)
    loss                  l2_loss (matryoshka: prefix_l2_loss; batchtopk and topk at the end of
                          training: the mean over tokens and sources of ||x_s - x_hat_s||)
                          + aux_coeff * aux_loss
                          + l1_coeff * l1_loss (vanilla) or + l0_coeff * l0_loss (jumprelu)
    l1_coeff, l0_coeff    the sparsity coefficients at this step (l0_coeff for jumprelu only)
    explained_variance    1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, the mean over the batch
    explained_variance_<label>   the same for one source
    dead_fraction         share of latents that have not fired for dead_after_tokens tokens
"""

from __future__ import annotations

import torch

from featurestore.crosscoder import CrossCoder, ForwardOutput


def total_loss(model: CrossCoder, x: torch.Tensor, out: ForwardOutput, l1_coeff: float,
               l0_coeff: float = 0.0, norm_loss: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, l2 part). Vanilla's sparsity penalty is the L1 and JumpReLU's the L0;
    the archs with a k get their sparsity from it, and no penalty. With norm_loss, BatchTopK and
    TopK minimise the mean of each source's error norm instead of the squared error (the end of
    training, TrainerConfig.norm_loss_fraction); the others' penalty coefficients and
    Matryoshka's prefix losses are set against the squared error, so they keep it."""
    error = x - out.reconstruction
    l2 = error.pow(2).sum(dim=(1, 2)).mean()
    reconstruction = l2 if out.prefix_l2 is None else out.prefix_l2
    if norm_loss and model.config.arch in ("batchtopk", "topk"):
        reconstruction = error.norm(dim=-1).mean()
    loss = reconstruction + model.config.aux_coeff * out.aux_loss
    if model.config.arch == "vanilla":
        loss = loss + l1_coeff * out.sparsity
    elif model.config.arch == "jumprelu":
        loss = loss + l0_coeff * out.l0_penalty
    return loss, l2


def explained_variance(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per source and overall: returns [n_sources + 1], the overall value last."""
    residual = (x - reconstruction).pow(2).sum(dim=(0, 2))
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum(dim=(0, 2))
    per_source = 1 - residual / total
    overall = 1 - residual.sum() / total.sum()
    return torch.cat([per_source, overall[None]])


@torch.no_grad()
def batch_metrics(model: CrossCoder, x: torch.Tensor, out: ForwardOutput, l1_coeff: float,
                  lr: float, l0_coeff: float = 0.0, norm_loss: bool = False
                  ) -> dict[str, float]:
    loss, l2 = total_loss(model, x, out, l1_coeff, l0_coeff, norm_loss)
    ev = explained_variance(x, out.reconstruction)
    metrics = {
        "loss": loss.item(),
        "l2_loss": l2.item(),
        "l1_loss": out.sparsity.item(),
        "l0_loss": (out.latents > 0).float().sum(dim=1).mean().item(),
        "aux_loss": out.aux_loss.item(),
        "l1_coeff": l1_coeff,
        "lr": lr,
        "explained_variance": ev[-1].item(),
        "dead_fraction": (model.tokens_since_fired >= model.config.dead_after_tokens)
        .float().mean().item(),
    }
    if model.config.arch == "jumprelu":
        metrics["l0_coeff"] = l0_coeff
    if out.prefix_l2 is not None:
        metrics["prefix_l2_loss"] = out.prefix_l2.item()
    for label, value in zip(model.config.source_labels, ev[:-1]):
        metrics[f"explained_variance_{label}"] = value.item()
    return metrics
