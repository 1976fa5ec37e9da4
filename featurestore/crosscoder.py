"""The crosscoder: one sparse dictionary shared by several aligned activation sources.

    x [batch, n_sources, d_model] --encode--> f [batch, d_hidden] --decode--> x_hat (as x)

Every source has its own encoder and decoder slice; the latent code f is shared, so latent i means
the same thing in every source, and how strongly each source's decoder uses it (its decoder norm)
says whether the feature is shared or exclusive to a source. With one source this is an ordinary
sparse autoencoder.

Five architectures:

    vanilla     f = ReLU(pre); penalty = sum_i f_i * sum_s ||W_dec[i, s]||: the decoder-norm-
                weighted L1 of the crosscoder paper, its coefficient warmed up by the trainer
    batchtopk   keep the k * batch largest decoder-norm-weighted activations across the whole
                batch; a running estimate of the smallest kept score becomes the threshold used
                after training, so encoding one token does not depend on its batch. The ranking
                uses the plain decoder norms: the shared latents' reduced penalty is an L1 notion,
                and ranking by it would keep them from ever being selected
    topk        keep each token's k largest ReLU activations (Gao et al.), ranked by the plain
                activation, not weighted by decoder norms, as sparsify's and SAELens' TopK do
    jumprelu    f = ReLU(pre) * (pre > exp(log_threshold)), one learned threshold per latent
                (Rajamanoharan et al. 2024), trained with straight-through pseudo-derivatives for
                the threshold and an L0 penalty, its coefficient warmed up like vanilla's
    matryoshka  BatchTopK's selection and threshold, and a dictionary of nested prefixes
                (group_sizes): the loss is the mean over the prefixes of the error of the
                reconstruction from that prefix's latents alone, so the first latents learn the
                broad features on their own (Bussmann et al. 2025)

Any of them can add the AuxK loss (dead latents learn to reconstruct the residual) and designated
shared latents: the first n_shared latents have one decoder vector for all sources and a reduced
sparsity penalty, as in Anthropic's February 2025 crosscoder update.

The model works internally on normalised activations (each source multiplied by its norm scale
from the activation sets); `encode` and `decode` take and return activations in original units.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from featurestore import ranges
from featurestore.dictionary_kinds import ARCHS, K_ARCHS, THRESHOLD_ARCHS
from featurestore.model import config_from_dict

WEIGHTS_FILE = "crosscoder.safetensors"
CONFIG_FILE = "crosscoder.json"


@dataclass(frozen=True)
class CrossCoderConfig:
    n_sources: int
    d_model: int
    d_hidden: int = 1024
    arch: Literal["vanilla", "batchtopk", "topk", "jumprelu", "matryoshka"] = "batchtopk"
    k: int = 32  # batchtopk, matryoshka: active latents per token on average; topk: per token
    aux_k: int = 0  # AuxK: dead latents used to reconstruct the residual (0: no auxiliary loss)
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 200_000  # a latent that has not fired for this many tokens is dead
    n_shared: int = 0  # designated shared latents (ids 0 .. n_shared-1), one decoder for all
    shared_penalty: float = 0.15  # their sparsity penalty relative to the other latents
    threshold_momentum: float = 0.99  # batchtopk, matryoshka: EMA of the smallest kept score
    # jumprelu, in normalised units, where a token's norm is about sqrt(d_model) and, at
    # initialisation (unit decoder rows, encoder = decoder transposed), a pre-activation is about
    # N(0, 1), while a feature that carries a share of the token is several units. The threshold
    # is learned through its logarithm, which Adam moves by about the learning rate a step, so
    # it has to start near its useful range: at 1 a latent fires on ~16% of tokens at first (none
    # starts dead) and the ReLU code's small noise is cut from the start; started near 0, as a
    # plain ReLU, it takes thousands of steps to rise and leaves spurious small activations.
    # The bandwidth is the window of pre-activations around a threshold whose tokens move it:
    # narrow beside a feature's activation, so that the gradient is local, wide enough that a
    # batch puts tokens in it.
    jumprelu_init_threshold: float = 1.0
    jumprelu_bandwidth: float = 0.1
    # matryoshka: the sizes of the nested groups of latents, in order, summing to d_hidden; the
    # prefixes are the first group, the first two, ..., the whole dictionary. Empty: the default,
    # default_group_sizes(d_hidden).
    group_sizes: tuple[int, ...] = ()
    decoder_init_norm: float = 1.0  # normalised units, where a token's norm is about sqrt(d_model)
    # Start every source's decoder vector of a latent in the same random direction: checkpoints of
    # one run, or a base model and its fine-tune, share a residual basis, and independent starts
    # leave the shared latents' decoders far apart long after the reconstruction has converged.
    same_init_across_sources: bool = True
    source_labels: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.n_sources < 1 or self.d_model < 1 or self.d_hidden < 1:
            raise ValueError("n_sources, d_model and d_hidden must be positive")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.arch in K_ARCHS and not 0 < self.k <= self.d_hidden:
            raise ValueError(f"k must be in 1..d_hidden ({self.d_hidden}), got {self.k}")
        if not 0 <= self.aux_k <= self.d_hidden:
            raise ValueError(f"aux_k must be in 0..d_hidden ({self.d_hidden}), got {self.aux_k}")
        if not 0 <= self.n_shared < self.d_hidden:
            raise ValueError(f"n_shared must be in 0..d_hidden-1, got {self.n_shared}")
        for name, allowed in (("aux_coeff", ranges.NON_NEGATIVE),
                              ("shared_penalty", ranges.NON_NEGATIVE),
                              ("threshold_momentum", ranges.FRACTION),
                              ("decoder_init_norm", ranges.POSITIVE),
                              ("jumprelu_init_threshold", ranges.POSITIVE),
                              ("jumprelu_bandwidth", ranges.POSITIVE)):
            if not allowed.contains(getattr(self, name)):
                raise ValueError(f"{name} must be {allowed.describe()}, got "
                                 f"{getattr(self, name)}")
        labels = self.source_labels or tuple(f"source_{i}" for i in range(self.n_sources))
        if len(labels) != self.n_sources or len(set(labels)) != len(labels):
            raise ValueError(f"need {self.n_sources} distinct source labels, got {labels}")
        object.__setattr__(self, "source_labels", tuple(labels))
        object.__setattr__(self, "group_sizes", self._checked_group_sizes())

    def _checked_group_sizes(self) -> tuple[int, ...]:
        """matryoshka: the given group sizes, or the default; other archs have none."""
        if self.arch != "matryoshka":
            if self.group_sizes:
                raise ValueError(f"group_sizes are for arch matryoshka, not {self.arch}")
            return ()
        sizes = tuple(self.group_sizes) or default_group_sizes(self.d_hidden)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"group_sizes must be positive integers, got {list(sizes)}")
        if sum(sizes) != self.d_hidden:
            raise ValueError(f"group_sizes {list(sizes)} sum to {sum(sizes)}, not to d_hidden "
                             f"({self.d_hidden})")
        return sizes

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["source_labels"] = list(self.source_labels)
        data["group_sizes"] = list(self.group_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrossCoderConfig:
        data = dict(data)
        data["source_labels"] = tuple(data.get("source_labels", ()))
        data["group_sizes"] = tuple(data.get("group_sizes", ()))
        return config_from_dict(cls, data)


DEFAULT_GROUPS = 5


def default_group_sizes(d_hidden: int) -> tuple[int, ...]:
    """Matryoshka groups doubling in size, g, 2g, 4g, 8g, 16g (the rest of d_hidden in the last),
    as in Bussmann et al.: each prefix about twice the one before, the first a 31st of the
    dictionary. A dictionary too small for five groups gets as many as fit."""
    groups = min(DEFAULT_GROUPS, (d_hidden + 1).bit_length() - 1)  # 2**groups - 1 <= d_hidden
    first = d_hidden // (2**groups - 1)
    sizes = [first * 2**i for i in range(groups)]
    sizes[-1] += d_hidden - sum(sizes)
    return tuple(sizes)


@dataclass
class ForwardOutput:
    """What one training forward pass produces; the trainer turns it into a loss."""

    latents: torch.Tensor  # [batch, d_hidden]
    reconstruction: torch.Tensor  # [batch, n_sources, d_model], normalised units
    sparsity: torch.Tensor  # scalar: the decoder-norm-weighted L1 (penalty before its coefficient)
    aux_loss: torch.Tensor  # scalar: AuxK reconstruction error of the residual (0 if unused)
    # jumprelu: the mean over tokens of the number of active latents, with the straight-through
    # pseudo-derivative for the thresholds (the L0 penalty before its coefficient)
    l0_penalty: torch.Tensor | None = None
    # matryoshka: the mean over the nested prefixes of the squared error of each prefix's own
    # reconstruction (the loss in place of the whole dictionary's squared error)
    prefix_l2: torch.Tensor | None = None


class CrossCoder(nn.Module):
    def __init__(self, config: CrossCoderConfig, norm_scales: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        s, d, h, n_shared = config.n_sources, config.d_model, config.d_hidden, config.n_shared
        self.W_enc = nn.Parameter(torch.empty(s, d, h))
        self.b_enc = nn.Parameter(torch.zeros(h))
        self.W_dec = nn.Parameter(torch.empty(h - n_shared, s, d))  # per-source latents
        self.W_dec_shared = nn.Parameter(torch.empty(n_shared, d))  # one vector for all sources
        self.b_dec = nn.Parameter(torch.zeros(s, d))
        scales = torch.ones(s) if norm_scales is None else torch.as_tensor(norm_scales).float()
        self.register_buffer("norm_scales", scales.reshape(s).clone())
        # batchtopk, matryoshka; < 0 means not learned
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(h, dtype=torch.long))
        if config.arch == "jumprelu":
            # Only JumpReLU has it, so that the saved weights of the other archs load as before.
            # Its logarithm is learned, so the threshold stays positive.
            self.log_threshold = nn.Parameter(torch.empty(h))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Decoder rows in random directions with a small norm; encoder = decoder transposed."""
        with torch.no_grad():
            self.W_dec.normal_()
            if self.config.same_init_across_sources:
                self.W_dec.copy_(self.W_dec[:, :1].expand_as(self.W_dec))
            self.W_dec_shared.normal_()
            for weight in (self.W_dec, self.W_dec_shared):
                weight.mul_(self.config.decoder_init_norm / weight.norm(dim=-1, keepdim=True))
            self.W_enc.copy_(self.decoder().permute(1, 2, 0))
            self.b_enc.zero_()
            self.b_dec.zero_()
            if self.config.arch == "jumprelu":
                self.log_threshold.fill_(math.log(self.config.jumprelu_init_threshold))

    # -- the dictionary -----------------------------------------------------------------------

    def decoder(self) -> torch.Tensor:
        """Every latent's decoder vector per source: [d_hidden, n_sources, d_model]."""
        shared = self.W_dec_shared[:, None, :].expand(-1, self.config.n_sources, -1)
        return torch.cat([shared, self.W_dec], dim=0)

    def decoder_norms(self, decoder: torch.Tensor | None = None) -> torch.Tensor:
        """||W_dec[i, s]|| for every latent and source: [d_hidden, n_sources]."""
        return (self.decoder() if decoder is None else decoder).norm(dim=-1)

    def penalty_weights(self, norms: torch.Tensor) -> torch.Tensor:
        """Per-latent L1 weight: the sum of its decoder norms, reduced for shared latents."""
        weights = norms.sum(dim=1)
        if self.config.n_shared:
            scale = torch.ones_like(weights)
            scale[: self.config.n_shared] = self.config.shared_penalty
            weights = weights * scale
        return weights

    # -- normalised-unit computations (what training uses) -------------------------------------

    # Both products are single 2-D GEMMs over the sources flattened into one n_sources * d_model
    # axis (free views of the row-major weights). Written as einsums, they ran as batched products
    # whose backward handed the ReLU a transposed [d_hidden, batch] gradient, and elementwise work
    # on mixed layouts is far slower than on contiguous ones.

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, n_sources, d_model] -> [batch, d_hidden], before the nonlinearity."""
        return torch.addmm(self.b_enc, x.reshape(x.shape[0], -1),
                           self.W_enc.reshape(-1, self.config.d_hidden))

    def reconstruct(self, latents: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        """latents [batch, d_hidden] and decoder [d_hidden, n_sources, d_model] -> as x."""
        flat = torch.addmm(self.b_dec.reshape(-1), latents, decoder.reshape(decoder.shape[0], -1))
        return flat.view(latents.shape[0], *decoder.shape[1:])

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        """The training pass on normalised activations [batch, n_sources, d_model]."""
        decoder = self.decoder()
        norms = self.decoder_norms(decoder)  # computed once per step, used by every term below
        weights = self.penalty_weights(norms)
        pre = self.pre_activations(x)
        acts = F.relu(pre)
        arch = self.config.arch
        l0_penalty = prefix_l2 = None
        if arch in K_ARCHS:
            active = (self._batch_top_k(acts, norms.sum(dim=1)) if arch in THRESHOLD_ARCHS
                      else self._top_k_per_token(acts))
            # Each token keeps about k of d_hidden latents, so the decode sums k decoder rows per
            # token instead of multiplying a mostly-zero [batch, d_hidden] matrix by the whole
            # decoder: O(batch * k) rows rather than O(batch * d_hidden), forward and backward.
            # The encoder's backward is sparse too (KeptPreActivations), and the kept values
            # are rectified on their own, so (without AuxK) no [batch, d_hidden] gradient forms.
            values = F.relu(KeptPreActivations.apply(self.W_enc, self.b_enc, x, pre.detach(),
                                                     active))
            latents = torch.zeros_like(acts).flatten().index_put_((active,), values).view_as(acts)
            if arch == "matryoshka":
                reconstruction, prefix_l2 = self._nested_reconstructions(x, values, active,
                                                                         decoder)
            else:
                reconstruction = sparse_reconstruct(values, active, acts.shape[0], decoder,
                                                    self.b_dec)
        elif arch == "jumprelu":
            # A JumpReLU code is not k-sparse per token (and early in training far from sparse):
            # the dense product, as for vanilla.
            latents, l0_penalty = JumpReLU.apply(pre, self.log_threshold.exp(),
                                                 self.config.jumprelu_bandwidth)
            reconstruction = self.reconstruct(latents, decoder)
        else:
            latents = acts  # vanilla's ReLU code is not k-sparse: the dense product is cheaper
            reconstruction = self.reconstruct(latents, decoder)
        # Summed over the batch first, the L1 term costs one [d_hidden] dot product instead of
        # [batch, d_hidden] products forward and backward, and the sums say which latents fired
        # (the code is non-negative, so a latent fired exactly where its sum is positive).
        totals = latents.sum(dim=0)
        sparsity = totals @ weights / latents.shape[0]
        aux = self._aux_loss(x, reconstruction, acts, decoder) if self.config.aux_k else (
            torch.zeros((), device=x.device))
        if self.training:
            self._track_firing(totals.detach() > 0, latents.shape[0])
        return ForwardOutput(latents, reconstruction, sparsity, aux, l0_penalty, prefix_l2)

    def _top_k_per_token(self, acts: torch.Tensor) -> torch.Tensor:
        """The flat indices into acts [batch, d_hidden] of each token's k largest, token by
        token (the grouping sparse_reconstruct needs)."""
        top = acts.topk(min(self.config.k, acts.shape[1]), dim=1, sorted=False)
        rows = torch.arange(acts.shape[0], device=acts.device)[:, None] * acts.shape[1]
        return (rows + top.indices).flatten()

    def _nested_reconstructions(self, x: torch.Tensor, values: torch.Tensor,
                                active: torch.Tensor, decoder: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the whole dictionary's reconstruction, the mean over the nested prefixes of the
        squared error of the reconstruction from the prefix's latents alone).

        Each group's latents are decoded once, and the prefixes' reconstructions are cumulative
        sums of those decodes; a prefix is never decoded from scratch. The mean (not the sum) over
        prefixes keeps the loss on the scale of the other archs' squared error, which the AuxK
        coefficient, the gradient clipping and the learning rate were chosen for.
        """
        groups = sparse_group_decodes(values, active, x.shape[0], decoder,
                                      self.config.group_sizes)  # [batch, groups, sources, d]
        prefixes = groups.cumsum(dim=1) + self.b_dec
        errors = (x[:, None] - prefixes).pow(2).sum(dim=(2, 3)).mean(dim=0)  # [groups]
        return prefixes[:, -1], errors.mean()

    def _batch_top_k(self, acts: torch.Tensor, norm_sums: torch.Tensor) -> torch.Tensor:
        """The flat indices into acts [batch, d_hidden] of the kept latents, in increasing order."""
        scores = acts * norm_sums
        keep = min(self.config.k * acts.shape[0], scores.numel())
        values, indices = top_k_flat(scores.flatten(), keep)
        if self.training:
            self._update_threshold(values)
        return indices.sort().values

    @torch.no_grad()
    def _update_threshold(self, kept_scores: torch.Tensor) -> None:
        """EMA of the smallest positive kept score; under torchrun, of its mean over processes."""
        positive = kept_scores[kept_scores > 0]
        # [smallest, 1] or [0, 0]: summed over processes, this gives the mean over those with one.
        found = (torch.stack([positive.min(), positive.new_ones(())]) if positive.numel()
                 else kept_scores.new_zeros(2))
        found = _sum_over_processes(found)
        if found[1] == 0:
            return
        smallest = found[0] / found[1]
        if self.threshold < 0:
            self.threshold.fill_(smallest)
        else:
            m = self.config.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * smallest)

    def _aux_loss(self, x, reconstruction, acts, decoder) -> torch.Tensor:
        """AuxK: the top aux_k dead latents of each token reconstruct the residual x - x_hat."""
        dead = self.tokens_since_fired >= self.config.dead_after_tokens
        if not dead.any():
            return torch.zeros((), device=x.device)
        residual = (x - reconstruction).detach()
        dead_acts = acts * dead
        k = min(self.config.aux_k, int(dead.sum()))
        top = dead_acts.topk(k, dim=1)
        # k latents per token, so decoded sparsely as the BatchTopK reconstruction is.
        rows = torch.arange(acts.shape[0], device=acts.device)[:, None] * acts.shape[1]
        predicted = sparse_reconstruct(top.values.flatten(), (rows + top.indices).flatten(),
                                       acts.shape[0], decoder)
        # Normalised as in Gao et al. (error relative to the residual's own size), then put back in
        # the main loss's units (the batch's total variance): unnormalised, the term shrinks with
        # the residual as training improves and stops reviving dead latents.
        relative = (residual - predicted).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-12)
        total_variance = (x - x.mean(dim=0)).pow(2).sum(dim=(1, 2)).mean().detach()
        return relative * total_variance

    @torch.no_grad()
    def _track_firing(self, fired: torch.Tensor, n_tokens: int) -> None:
        """fired [d_hidden] bool: the latents that fired on any of this batch's n_tokens."""
        tokens = torch.tensor([n_tokens], device=fired.device)
        # Under torchrun a latent fired if it fired in any process's share of the batch.
        counts = _sum_over_processes(torch.cat([fired.to(torch.long), tokens]))
        self.tokens_since_fired.add_(counts[-1])
        self.tokens_since_fired[counts[:-1] > 0] = 0

    @torch.no_grad()
    def init_decoder_bias(self, x: torch.Tensor, method: str = "geometric_median") -> None:
        """Set b_dec per source from a first batch of normalised activations."""
        if method == "mean":
            self.b_dec.copy_(x.mean(dim=0))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(x))
        else:
            raise ValueError(f"unknown decoder bias init {method!r} (geometric_median or mean)")

    # -- original-unit API (what analyses use) ---------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """Latents for activations [batch, n_sources, d_model] in original units (or normalised).

        BatchTopK and Matryoshka encode with their learned threshold, so a token's code does not
        depend on which other tokens share its batch.
        """
        if not normalized:
            x = x * self.norm_scales[:, None]
        pre = self.pre_activations(x)
        acts = F.relu(pre)
        arch = self.config.arch
        if arch in THRESHOLD_ARCHS:
            if self.threshold < 0:
                raise RuntimeError(f"this {arch} crosscoder has not learned its threshold yet")
            scores = acts * self.decoder_norms().sum(dim=1)
            acts = acts * (scores > self.threshold)
        elif arch == "topk":
            top = acts.topk(min(self.config.k, acts.shape[1]), dim=1)
            acts = torch.zeros_like(acts).scatter_(1, top.indices, top.values)
        elif arch == "jumprelu":
            acts = acts * (pre > self.log_threshold.exp())
        return acts

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """Reconstruction [batch, n_sources, d_model] in original units (or normalised)."""
        x_hat = self.reconstruct(latents, self.decoder())
        return x_hat if normalized else x_hat / self.norm_scales[:, None]

    # -- files: safetensors weights + JSON config, never a pickle ---------------------------------

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))

    @classmethod
    def load(cls, directory: Path) -> CrossCoder:
        from safetensors.torch import load_file

        config = CrossCoderConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(directory / WEIGHTS_FILE))
        return model.eval()


def sparse_reconstruct(values: torch.Tensor, active: torch.Tensor, batch_size: int,
                       decoder: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The decode of a sparse code: the same as reconstruct on the dense latents it stands for.

    The code is given as the flat indices `active` (into [batch_size, d_hidden], grouped by token
    in token order) of its nonzero entries and their `values`; a token may have none. One
    embedding_bag sums each token's weighted decoder rows [d_hidden, n_sources * d_model], and its
    backward touches only those rows, so both cost O(nnz * n_sources * d_model).
    """
    d_hidden, n_sources, d_model = decoder.shape
    tokens = torch.div(active, d_hidden, rounding_mode="floor")
    counts = torch.bincount(tokens, minlength=batch_size)
    offsets = counts.cumsum(0) - counts  # where each token's run of indices starts
    # Autocast leaves embedding_bag alone, but the values may come from its lower-precision
    # matmuls; a gather-and-sum gains nothing from bf16, so it runs in the decoder's dtype.
    summed = F.embedding_bag(active - tokens * d_hidden, decoder.reshape(d_hidden, -1), offsets,
                             mode="sum", per_sample_weights=values.to(decoder.dtype))
    x_hat = summed.view(batch_size, n_sources, d_model)
    return x_hat if bias is None else x_hat + bias


def sparse_group_decodes(values: torch.Tensor, active: torch.Tensor, batch_size: int,
                         decoder: torch.Tensor, group_sizes: tuple[int, ...]) -> torch.Tensor:
    """Each token's decode from each group of consecutive latents alone, without a bias:
    [batch_size, n_groups, n_sources, d_model], summing over the groups to sparse_reconstruct.

    The code is as sparse_reconstruct takes it, but `active` must be in increasing order: then
    the entries of one token and group are consecutive, and one embedding_bag, with a bag per
    (token, group), decodes every group at once.
    """
    d_hidden, n_sources, d_model = decoder.shape
    tokens = torch.div(active, d_hidden, rounding_mode="floor")
    latents = active - tokens * d_hidden
    ends = torch.tensor(group_sizes, device=active.device).cumsum(0)
    bags = tokens * len(group_sizes) + torch.bucketize(latents, ends, right=True)
    counts = torch.bincount(bags, minlength=batch_size * len(group_sizes))
    summed = F.embedding_bag(latents, decoder.reshape(d_hidden, -1), counts.cumsum(0) - counts,
                             mode="sum", per_sample_weights=values.to(decoder.dtype))
    return summed.view(batch_size, len(group_sizes), n_sources, d_model)


class JumpReLU(torch.autograd.Function):
    """apply(pre, threshold, bandwidth) -> (latents, l0): the JumpReLU code of pre [batch,
    d_hidden], pre * (pre > threshold), and the mean over tokens of its count of active latents.

    Both are step functions of the threshold [d_hidden], whose true gradient is zero almost
    everywhere; the backward uses the straight-through pseudo-derivatives of Rajamanoharan et al.
    (2024), a rectangle kernel of width `bandwidth` around the threshold: only tokens whose
    pre-activation lies within bandwidth / 2 of it move it, the code by -(threshold / bandwidth)
    and the count by -(1 / bandwidth) per token. The gradient for pre is the ordinary one of
    the code (through the active entries); the count passes none to pre.
    """

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        active = pre > threshold
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * active, active.sum(dim=1, dtype=pre.dtype).mean()

    @staticmethod
    def backward(ctx, grad_latents, grad_l0):
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        window = (pre - threshold).abs() < bandwidth / 2
        grad_pre = grad_latents * (pre > threshold)
        # Per token in the window, d code / d threshold is -(threshold / bandwidth) and
        # d (count / batch) / d threshold is -(1 / bandwidth) / batch; the threshold is one per
        # latent, so both are summed over the batch before they are scaled.
        in_window = (grad_latents * window).sum(dim=0)
        counts = window.sum(dim=0, dtype=pre.dtype)
        grad_threshold = -(in_window * threshold + counts * grad_l0 / pre.shape[0]) / bandwidth
        return grad_pre, grad_threshold, None


class KeptPreActivations(torch.autograd.Function):
    """The kept entries of the pre-activations, with a backward that touches only those.

    apply(W_enc, b_enc, x, pre, active): pre [batch, d_hidden] is x's pre-activations, already
    computed (without gradient) to choose the kept entries; this returns pre.flatten()[active].
    The gradient of W_enc is x^T G for a G that is zero but at the kept k entries a token, so one
    sparse-dense product (k * batch * n_sources * d_model multiply-adds) gives it, where the dense
    x^T G costs d_hidden / k times as much, as much as the encoder's forward product.
    """

    @staticmethod
    def forward(ctx, W_enc, b_enc, x, pre, active):
        ctx.save_for_backward(W_enc, x, active)
        return pre.flatten()[active]

    @staticmethod
    def backward(ctx, grad):
        W_enc, x, active = ctx.saved_tensors
        d_hidden = W_enc.shape[-1]
        tokens = torch.div(active, d_hidden, rounding_mode="floor")
        latents = active - tokens * d_hidden
        grad = grad.to(W_enc.dtype)  # under autocast it comes in the matmuls' lower precision
        x_flat, W_flat = x.reshape(x.shape[0], -1), W_enc.reshape(-1, d_hidden)
        # G^T [d_hidden, batch] as a sparse matrix, so that G^T x is [d_hidden, n_sources*d_model].
        code = torch.sparse_coo_tensor(torch.stack([latents, tokens]), grad,
                                       (d_hidden, x.shape[0]), check_invariants=False)
        grad_W = torch.sparse.mm(code, x_flat.to(grad.dtype)).t().reshape(W_enc.shape)
        grad_b = torch.zeros(d_hidden, dtype=grad.dtype, device=grad.device).index_add_(
            0, latents, grad)
        grad_x = (torch.sparse.mm(code.t(), W_flat.t()).view_as(x)
                  if ctx.needs_input_grad[2] else None)
        return grad_W, grad_b, grad_x, None, None


def top_k_flat(scores: torch.Tensor, keep: int,
               sample_stride: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the `keep` largest of the 1-D `scores`, in no particular order.

    The same selection as scores.topk(keep), faster when keep is a small share of the scores (a
    BatchTopK batch keeps k of d_hidden per token): a strided sample gives a bound that about 1.5x
    keep scores reach, and the exact topk runs on those alone. Were the sample so unlucky that
    fewer than keep reach it, the full topk runs instead, so the result never depends on it.
    """
    sample = scores[::sample_stride]
    rank = min(int(1.5 * keep * sample.numel() / scores.numel()) + 1, sample.numel())
    if 2 * rank > sample.numel():  # keep is a large share: filtering would save little
        top = scores.topk(keep, sorted=False)
        return top.values, top.indices
    bound = sample.topk(rank, sorted=False).values.min()
    candidates = (scores >= bound).nonzero().squeeze(1)
    if candidates.numel() < keep:
        top = scores.topk(keep, sorted=False)
        return top.values, top.indices
    top = scores[candidates].topk(keep, sorted=False)
    return top.values, candidates[top.indices]


def _sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) under torchrun, so every process keeps the same training buffers."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def geometric_median(x: torch.Tensor, iterations: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Per-source geometric median of x [batch, n_sources, d_model] by Weiszfeld's iteration.

    More robust than the mean to the outlier tokens residual streams have.
    """
    median = x.mean(dim=0)
    for _ in range(iterations):
        distances = (x - median).norm(dim=-1, keepdim=True).clamp_min(eps)  # [batch, sources, 1]
        weights = 1.0 / distances
        updated = (weights * x).sum(dim=0) / weights.sum(dim=0)
        if (updated - median).norm() < eps * median.norm().clamp_min(1.0):
            return updated
        median = updated
    return median
