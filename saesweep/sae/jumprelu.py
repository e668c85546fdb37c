"""JumpReLU SAE (Rajamanoharan et al. 2024): learned per-latent thresholds trained with a
straight-through estimator (rectangle kernel of bandwidth eps), L0 sparsity penalty.

Training costs one dense matmul, as TopK's: the pre-activations are computed without
autograd, and everything after works on each token's entries within reach of a threshold
(pre-activation above threshold - eps / 2): the active latents and the kernel window, which
hold every nonzero gradient of the straight-through estimators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saesweep.sae.base import LossResult, SAEConfig, StackedSAE
from saesweep.sae.codes import SparseCodes
from saesweep.sae.sparse import select_entries, with_encoder_grad


def _in_window(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """[n, B, d_sae] bool: where the rectangle kernel K((z - threshold) / eps) is 1, i.e.
    |z - threshold| < eps / 2 (K on (-1/2, 1/2), eps the bandwidth)."""
    return (z - threshold).abs() < bandwidth / 2


class JumpReLUFn(torch.autograd.Function):
    """z * H(z - threshold), z [n, B, w] and thresholds of z's shape or broadcast to it; z grad
    g H(z - threshold), threshold grad -(threshold / eps) K((z - threshold) / eps) g, summed
    over what was broadcast."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        active = z > threshold
        ctx.save_for_backward(z, threshold, active)
        ctx.bandwidth = bandwidth
        return torch.where(active, z, 0.0)

    @staticmethod
    def backward(ctx, g):
        z, threshold, active = ctx.saved_tensors
        in_window = _in_window(z, threshold, ctx.bandwidth)
        grad_t = torch.where(in_window, g * (-threshold / ctx.bandwidth), 0.0)
        return torch.where(active, g, 0.0), grad_t.sum_to_size(threshold.shape), None


class L0Fn(torch.autograd.Function):
    """[n, B] each token's L0, sum over its entries of H(z - threshold) (shapes as for
    JumpReLUFn); threshold grad -(1 / eps) K((z - threshold) / eps) g, no z grad."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).sum(-1).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, threshold = ctx.saved_tensors
        in_window = _in_window(z, threshold, ctx.bandwidth)
        grad_t = torch.where(in_window, g.unsqueeze(-1) / -ctx.bandwidth, 0.0)
        return None, grad_t.sum_to_size(threshold.shape), None


@dataclass(frozen=True)
class JumpReLUCodes(SparseCodes):
    """Sparse codes over each token's entries within reach of a threshold (values 0 where
    inactive), with what the L0 penalty's estimator needs."""

    entry_pre: Tensor | None = None
    """[n, B, w] raw pre-activations at the entries (-inf on padding)."""
    entry_thresholds: Tensor | None = None
    """[n, B, w] the entries' thresholds, differentiable in JumpReLUSAE.threshold."""


class JumpReLUSAE(StackedSAE):
    """f = pre * (pre > threshold); penalty L0 through the same STE, or its squared distance
    from a target (ObjectiveConfig.target_l0).

    The threshold is trained itself, kept >= 0 after every step, as SAELens and
    dictionary_learning train it; the paper trains its log, which Adam moves by about lr per
    step, so a threshold moves by a fraction lr of itself: from a small initial value it
    hardly moves in a run of a few thousand steps (docs/training.md has the measurement).

    Both straight-through estimators see the raw pre-activation, as in the paper, SAELens and
    dictionary_learning: a ReLU before them would make every negative pre-activation an atom at
    0, inside the kernel window whenever threshold < bandwidth / 2.
    """

    arch = "jumprelu"
    sae_lens_architecture = "jumprelu"
    adam_betas = (0.0, 0.999)  # the paper's and dictionary_learning's: no momentum
    default_b_dec_init = "zeros"  # SAELens's and dictionary_learning's; docs/training.md

    def init_member(self, gen: torch.Generator, cfg: SAEConfig) -> dict[str, Tensor]:
        member = super().init_member(gen, cfg)
        return member | {"threshold": torch.full((self.d_sae,), cfg.jumprelu_init_threshold)}

    @torch.no_grad()
    def after_optimizer_step(self, result: LossResult, update_mask: Tensor | None = None) -> None:
        """The base's step, then every threshold projected onto >= 0: below 0 the gate would
        pass negative pre-activations (a projection, not a clamp in the graph, which would
        stop the gradient of a threshold at 0 for good)."""
        super().after_optimizer_step(result, update_mask)
        self.threshold.clamp_(min=0.0)

    def encode(self, x: Tensor) -> JumpReLUCodes:
        """Pre-activations in float32 even under autocast: bf16's spacing near a threshold
        (2^-7 at 1.0) is wider than the kernel, whose window would then hold no value or many.
        Each member's backward takes the dense path when its own mean entries per token are
        many (sparse.DENSE_ABOVE): early in training, from a small initial threshold."""
        eps = self.cfg.jumprelu_bandwidth
        with torch.autocast(x.device.type, enabled=False):
            x_in = self.encoder_input(x.to(self.W_enc.dtype))
            with torch.no_grad():
                pre = torch.baddbmm(self.b_enc.unsqueeze(1), x_in, self.W_enc)
        indices, real = select_entries(pre > self.threshold.unsqueeze(1) - eps / 2)
        pre = pre.gather(2, indices).where(real, -torch.inf)
        widths = (real.sum((1, 2)) / real.shape[1]).tolist()
        z = with_encoder_grad(pre, indices, x_in, self.W_enc, self.b_enc, widths)
        thresholds = self.threshold.gather(1, indices.flatten(1)).view_as(indices)
        acts = JumpReLUFn.apply(z, thresholds, eps)
        return JumpReLUCodes(
            acts, indices, self.d_sae, widths, entry_pre=pre, entry_thresholds=thresholds
        )

    def penalties(
        self,
        x: Tensor,
        target: Tensor,
        recon: Tensor,
        codes: JumpReLUCodes,
        step: int,
        variance: Tensor,
    ) -> dict:
        eps = self.cfg.jumprelu_bandwidth
        l0 = L0Fn.apply(codes.entry_pre, codes.entry_thresholds, eps)
        target = self.target_l0.unsqueeze(-1)
        quadratic = 2 / target.clamp_min(1e-12) * (l0 - target).pow(2)
        per_token = torch.where(target > 0, quadratic, l0)
        return {"sparsity_loss": (self.sparsity_at(step), per_token.mean(-1))}

    def _export_extra(self, i: int, s: float) -> dict[str, Tensor]:
        return {"threshold": self.threshold[i].clone()}

    def _import_extra(self, i: int, sd: dict[str, Tensor], s: float) -> None:
        self.threshold[i] = sd["threshold"]

    def _sae_lens_extra(self) -> dict:
        return {"jumprelu_bandwidth": self.cfg.jumprelu_bandwidth}
