"""JumpReLU SAE (Rajamanoharan et al. 2024): learned per-latent thresholds trained with a
straight-through estimator (rectangle kernel of bandwidth eps), L0 sparsity penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from saesweep.sae.base import LossResult, SAEConfig, StackedSAE
from saesweep.sae.codes import DenseCodes


def _rectangle(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """K((z - threshold) / eps) / eps with K the rectangle kernel on (-1/2, 1/2)."""
    return ((z - threshold).abs() < bandwidth / 2).to(z.dtype) / bandwidth


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    return grad.sum(dim=1, keepdim=True) if shape[1] == 1 else grad


class JumpReLUFn(torch.autograd.Function):
    """z * H(z - threshold); threshold grad -(threshold / eps) K((z - threshold) / eps)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, g):
        z, threshold = ctx.saved_tensors
        grad_z = g * (z > threshold)
        grad_t = -(threshold * _rectangle(z, threshold, ctx.bandwidth)) * g
        return grad_z, _sum_to(grad_t, threshold.shape), None


class StepFn(torch.autograd.Function):
    """H(z - threshold); threshold grad -(1 / eps) K((z - threshold) / eps), no z grad."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, threshold = ctx.saved_tensors
        grad_t = -_rectangle(z, threshold, ctx.bandwidth) * g
        return None, _sum_to(grad_t, threshold.shape), None


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

    def init_member(self, gen: torch.Generator, cfg: SAEConfig) -> dict[str, Tensor]:
        member = super().init_member(gen, cfg)
        return member | {"threshold": torch.full((self.d_sae,), cfg.jumprelu_init_threshold)}

    def thresholds(self) -> Tensor:
        """[n, 1, d_sae] thresholds."""
        return self.threshold.unsqueeze(1)

    @torch.no_grad()
    def after_optimizer_step(self, result: LossResult, update_mask: Tensor | None = None) -> None:
        """The base's step, then every threshold projected onto >= 0: below 0 the gate would
        pass negative pre-activations (a projection, not a clamp in the graph, which would
        stop the gradient of a threshold at 0 for good)."""
        super().after_optimizer_step(result, update_mask)
        self.threshold.clamp_(min=0.0)

    def encode(self, x: Tensor) -> DenseCodes:
        """Pre-activations in float32 even under autocast: bf16's spacing near a threshold
        (2^-7 at 1.0) is wider than the kernel, whose window would then hold no value or many."""
        with torch.autocast(x.device.type, enabled=False):
            pre = self.linear(x.to(self.W_enc.dtype))
        acts = JumpReLUFn.apply(pre, self.thresholds(), self.cfg.jumprelu_bandwidth)
        return DenseCodes(acts, pre=pre)

    def penalties(
        self,
        x: Tensor,
        target: Tensor,
        recon: Tensor,
        codes: DenseCodes,
        step: int,
        variance: Tensor,
    ) -> dict:
        l0 = StepFn.apply(codes.pre, self.thresholds(), self.cfg.jumprelu_bandwidth).sum(-1)
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
