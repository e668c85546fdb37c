"""JumpReLU SAE (Rajamanoharan et al. 2024): learned per-latent thresholds trained with a
straight-through estimator (rectangle kernel of bandwidth eps), L0 sparsity penalty.

Training costs one dense matmul once the codes are sparse, as TopK's: the pre-activations are
computed without autograd, and everything after works on each token's entries within reach
of a threshold (pre-activation above threshold - eps / 2), the active latents and the kernel
window, which hold every nonzero gradient of both straight-through estimators. A member with
many such entries per token (sparse.DENSE_ABOVE; early in training, from a small initial
threshold) takes the dense path instead; each member's path is its own, so its arithmetic
does not depend on its peers'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saesweep.configtools import above, alias
from saesweep.sae.base import LossResult, StackedSAE
from saesweep.sae.codes import Codes, DenseCodes, MemberGroups, SparseCodes
from saesweep.sae.matmul import member_bmm
from saesweep.sae.registry import register
from saesweep.sae.sparse import (
    is_dense,
    select_entries,
    with_dense_encoder_grad,
    with_encoder_grad,
)
from saesweep.sae.stacking import per_member

if TYPE_CHECKING:
    from saesweep.sae.config import SAEConfig


@dataclass(frozen=True)
class JumpReLUConfig:
    """JumpReLU's options: `sae.jumprelu.*`."""

    bandwidth: float = field(default=0.001, metadata=above(0) | alias("jumprelu_bandwidth"))
    """Width of the rectangle kernel of the straight-through threshold gradient."""
    init_threshold: float = field(
        default=0.001, metadata=above(0) | alias("jumprelu_init_threshold") | per_member()
    )
    """Initial threshold of every latent, on the pre-activations' scale, which
    init_encoder_scale sets (0.1 by default for jumprelu: a threshold chosen with the encoder
    at the decoder's transpose needs init_encoder_scale 1). May differ inside a stack."""


PATH_TOKENS = 512
"""Tokens of a batch on which each member's mean entries per token choose its path."""


class JumpReLUFn(torch.autograd.Function):
    """(acts, token_l0) of pre-activations z [n, B, w]: acts z * H(z - threshold) and [n, B]
    each token's L0, sum_j H(z_j - threshold_j), with thresholds of z's shape or broadcast to it.
    z grad g H(z - threshold) from acts only; threshold grad through the rectangle kernel
    K((z - threshold) / eps) = [|z - threshold| < eps / 2], -(threshold g + g_l0) K / eps, summed
    over what was broadcast. z must be finite (padding: a large negative value), so that a
    masked entry is z * 0 = 0."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth):
        active = z > threshold
        ctx.save_for_backward(z, threshold, active)
        ctx.bandwidth = bandwidth
        return z * active, active.sum(-1, dtype=z.dtype)

    @staticmethod
    def backward(ctx, g, g_l0):
        z, threshold, active = ctx.saved_tensors
        in_window = (z - threshold).abs_() < ctx.bandwidth / 2
        grad_t = torch.addcmul(g_l0.unsqueeze(-1), g, threshold).mul_(in_window)
        grad_t = grad_t.sum_to_size(threshold.shape).mul_(-1 / ctx.bandwidth)
        return g * active, grad_t, None


@dataclass(frozen=True)
class JumpReLUEntryCodes(SparseCodes):
    """The sparse path's codes: each token's entries within reach of a threshold (values 0
    where inactive)."""

    token_l0: Tensor | None = None
    """[n, B] each token's L0, differentiable in the thresholds (JumpReLUFn)."""


@dataclass(frozen=True)
class JumpReLUDenseCodes(DenseCodes):
    """The dense path's codes."""

    token_l0: Tensor | None = None
    """[n, B] each token's L0, differentiable in the thresholds (JumpReLUFn)."""


@register
class JumpReLUSAE(StackedSAE):
    """f = pre * (pre > threshold); penalty L0 through the same STE, or its squared distance
    from a target (ObjectiveConfig.target_l0).

    The threshold is trained itself, kept >= 0 after every step, as SAELens and
    dictionary_learning train it; the paper trains its log, which Adam moves by about lr per
    step, so a threshold moves by a fraction lr of itself: from a small initial value it
    hardly moves in a run of a few thousand steps (docs/training.md has the measurement).

    Both straight-through estimators see the raw pre-activation, as in the paper and SAELens
    (dictionary_learning applies its L0 step function to the JumpReLU output instead, whose
    zeros sit inside the kernel window whenever threshold < bandwidth / 2): a ReLU before them
    would make every negative pre-activation such an atom at 0.

    The encoder reads x - b_dec (StackedSAE.subtract_b_dec, as SAELens's default); the
    paper and dictionary_learning encode x itself.
    """

    arch = "jumprelu"
    sae_lens_architecture = "jumprelu"
    adam_betas = (0.0, 0.999)  # the paper's and dictionary_learning's: no momentum
    default_b_dec_init = "zeros"  # SAELens's and dictionary_learning's; docs/training.md
    default_init_encoder_scale = 0.1  # SAELens's in effect; docs/training.md

    def register_member_buffers(self) -> None:
        """Also the L0 target [n] of the quadratic penalty (0: none)."""
        super().register_member_buffers()
        self.member_buffer("target_l0", [o.target_l0 for o in self.objectives])

    def init_member(self, gen: torch.Generator, cfg: SAEConfig) -> dict[str, Tensor]:
        member = super().init_member(gen, cfg)
        return member | {"threshold": torch.full((self.d_sae,), cfg.jumprelu.init_threshold)}

    @torch.no_grad()
    def after_optimizer_step(self, result: LossResult, update_mask: Tensor | None = None) -> None:
        """The base's step, then every threshold projected onto >= 0: below 0 the gate would
        pass negative pre-activations (a projection, not a clamp in the graph, which would
        stop the gradient of a threshold at 0 for good)."""
        super().after_optimizer_step(result, update_mask)
        self.threshold.clamp_(min=0.0)

    def encode(self, x: Tensor) -> Codes:
        """Pre-activations in float32 even under autocast: bf16's spacing near a threshold
        (2^-7 at 1.0) is wider than the kernel, whose window would then hold no value or many."""
        with torch.autocast(x.device.type, enabled=False):
            x_in, bias = self.encoder_grad_inputs(x.to(self.W_enc.dtype))
            with torch.no_grad():
                pre = member_bmm(x_in, self.W_enc, self.b_enc.unsqueeze(1))
        dense = self._dense_members(pre)
        if len(set(dense)) == 1:
            path = self._dense_codes if dense[0] else self._entry_codes
            return path(slice(None), x_in, bias, pre)
        groups = []
        for flag, path in ((True, self._dense_codes), (False, self._entry_codes)):
            m = torch.tensor([i for i, d in enumerate(dense) if d == flag], device=x.device)
            groups.append((m, path(m, x_in[m], bias[m], pre[m])))
        return MemberGroups(tuple(groups), self.n)

    def _reach(self, pre: Tensor, m) -> Tensor:
        """[m, B, d_sae] bool: pre-activations within reach of members m's thresholds."""
        return pre > self.threshold[m].unsqueeze(1) - self.cfg.jumprelu.bandwidth / 2

    def _dense_members(self, pre: Tensor) -> list[bool]:
        """Per member: whether it takes the dense path, from its own mean entries within
        reach per token on the batch's first PATH_TOKENS tokens."""
        sample = self._reach(pre[:, :PATH_TOKENS], slice(None))
        widths = sample.view(torch.uint8).sum((1, 2), dtype=torch.int64) / sample.shape[1]
        return [is_dense(w, self.d_sae) for w in widths.tolist()]

    def _dense_codes(self, m, x_in: Tensor, bias: Tensor, pre: Tensor) -> JumpReLUDenseCodes:
        """Members m's codes over all latents (x_in, bias: encoder_grad_inputs's)."""
        eps, thresholds = self.cfg.jumprelu.bandwidth, self.threshold[m].unsqueeze(1)
        z = with_dense_encoder_grad(pre, x_in, self.W_enc[m], bias)
        acts, token_l0 = JumpReLUFn.apply(z, thresholds, eps)
        return JumpReLUDenseCodes(acts, token_l0=token_l0)

    def _entry_codes(self, m, x_in: Tensor, bias: Tensor, pre: Tensor) -> JumpReLUEntryCodes:
        """Members m's codes over each token's entries within reach of a threshold (x_in,
        bias: encoder_grad_inputs's)."""
        eps = self.cfg.jumprelu.bandwidth
        indices, real = select_entries(self._reach(pre, m))
        pre = pre.gather(2, indices).where(real, torch.finfo(pre.dtype).min)
        width = math.ceil(real.sum().item() / real[..., 0].numel())
        z = with_encoder_grad(pre, indices, x_in, self.W_enc[m], bias, width)
        thresholds = self.threshold[m].gather(1, indices.flatten(1)).view_as(indices)
        acts, token_l0 = JumpReLUFn.apply(z, thresholds, eps)
        return JumpReLUEntryCodes(acts, indices, self.d_sae, width, real=real, token_l0=token_l0)

    def penalties(
        self,
        x: Tensor,
        target: Tensor,
        recon: Tensor,
        codes: Codes,
        step: int,
        variance: Tensor,
    ) -> dict:
        if isinstance(codes, MemberGroups):
            l0 = codes.merged(lambda m, group: group.token_l0)
        else:
            l0 = codes.token_l0
        target = self.target_l0.unsqueeze(-1)
        quadratic = 2 / target.clamp_min(1e-12) * (l0 - target).pow(2)
        per_token = torch.where(target > 0, quadratic, l0)
        return {"sparsity_loss": (self.sparsity_at(step), per_token.mean(-1))}

    def _export_extra(self, i: int, s: float) -> dict[str, Tensor]:
        return {"threshold": self.threshold[i].clone()}

    def _sae_lens_extra(self) -> dict:
        return {"jumprelu_bandwidth": self.cfg.jumprelu.bandwidth}

    @staticmethod
    def exported_acts(cfg: dict, sd: dict[str, Tensor], x_in: Tensor, pre: Tensor) -> Tensor:
        """pre where it exceeds its latent's threshold."""
        return pre * (pre > sd["threshold"])
