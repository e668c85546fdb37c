"""ReLU SAE with the April-2024 Anthropic recipe: L1 penalty weighted by decoder row norms,
linear sparsity warmup, no decoder norm constraint, no pre-encoder bias, small-norm init."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from saesweep.configtools import above, alias
from saesweep.sae.base import StackedSAE
from saesweep.sae.codes import Codes, DenseCodes
from saesweep.sae.registry import register

if TYPE_CHECKING:
    from saesweep.sae.config import SAEConfig


@dataclass(frozen=True)
class ReLUConfig:
    """ReLU's options: `sae.relu.*`."""

    init_norm: float = field(default=0.1, metadata=above(0) | alias("relu_init_norm"))
    """With free decoder norms: initial L2 norm of every decoder row (April-2024 Anthropic
    recipe)."""


@register
class ReLUSAE(StackedSAE):
    """f = relu(x W_enc + b_enc); penalty sum_i f_i * |W_dec[i]|."""

    arch = "relu"
    sae_lens_architecture = "standard"
    subtract_b_dec = False
    default_decoder_norm = "free"

    def init_dec_norm(self, cfg: SAEConfig) -> float:
        return 1.0 if self.unit_norm_decoder else cfg.relu.init_norm

    def encode(self, x: Tensor) -> DenseCodes:
        return DenseCodes(self.linear_pre(x))

    def penalties(
        self, x: Tensor, target: Tensor, recon: Tensor, codes: Codes, step: int, variance: Tensor
    ) -> dict:
        return {"sparsity_loss": (self.sparsity_at(step), self.weighted_l1(codes.acts))}

    def weighted_l1(self, acts: Tensor) -> Tensor:
        """[n] mean over tokens of sum_i acts_i * decoder_norms()_i."""
        return (acts * self.decoder_norms().unsqueeze(1)).sum(-1).mean(-1)

    def decoder_norms(self) -> Tensor:
        """[n, d_sae] the norm that weighs each latent's L1: its decoder row's, |W_dec[i]|."""
        return self.W_dec.norm(dim=-1)

    def _sae_lens_extra(self) -> dict:
        return {"activation_fn_str": "relu", "activation_fn_kwargs": {}}
