"""TopK SAE (Gao et al. 2024): ReLU then top-k, AuxK loss on dead latents, unit-norm decoder.

Objective FVU + aux_coeff * AuxK, both over the batch's total variance (EleutherAI's sparsify):
the weight of AuxK against reconstruction does not depend on the data's scale.

Training costs one dense matmul: the pre-activations are computed without autograd, and the
gradient reaches the encoder through the selected latents only (sparse.with_encoder_grad).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saesweep.sae.base import StackedSAE, check, squared_error
from saesweep.sae.codes import Codes, SparseCodes
from saesweep.sae.matmul import member_bmm
from saesweep.sae.registry import register
from saesweep.sae.sparse import AUXK_PATH, dead_latent_codes, sparse_decode, with_encoder_grad

if TYPE_CHECKING:
    from saesweep.sae.config import SAEConfig


@register
class TopKSAE(StackedSAE):
    """Keeps the k largest ReLU pre-activations per token; encoder backward and decoding
    are sparse."""

    arch = "topk"
    sae_lens_architecture = "topk"
    fvu_objective = True

    @classmethod
    def check_shape(cls, cfg: SAEConfig, d_in: int) -> None:
        d_sae = cfg.width(d_in)
        check(0 < cfg.k <= d_sae, f"k={cfg.k} must lie in [1, d_sae={d_sae}]")

    def _set_shape(self) -> None:
        self.k, self.aux_k = self.cfg.k, self.cfg.resolved_aux_k(self.d_in)

    def encode(self, x: Tensor) -> Codes:
        x_in, bias = self.encoder_grad_inputs(x)
        pre = self.detached_pre(x_in)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        values = with_encoder_grad(values, indices, x_in, self.W_enc, bias)
        return SparseCodes(values, indices, self.d_sae, pre=pre)

    @torch.no_grad()
    def detached_pre(self, x_in: Tensor) -> Tensor:
        """[n, B, d_sae] relu(x_in @ W_enc + b_enc), without autograd."""
        return member_bmm(x_in, self.W_enc, self.b_enc.unsqueeze(1)).relu_()

    def penalties(
        self, x: Tensor, target: Tensor, recon: Tensor, codes: Codes, step: int, variance: Tensor
    ) -> dict:
        return {"aux_loss": (self.aux_coeff, self.auxk_loss(x, target, recon, codes, variance))}

    def auxk_loss(
        self, x: Tensor, target: Tensor, recon: Tensor, codes: Codes, variance: Tensor
    ) -> Tensor:
        """[n] AuxK: the top aux_k dead latents reconstruct the residual target - recon.

        Normalized by the target's total variance (the FVU term's denominator) and scaled by
        min(n_dead / aux_k, 1) (EleutherAI's form of OpenAI's loss). Zero when no member has
        dead latents.
        """
        dead = self.dead_mask()
        if not bool(dead.any()):
            return recon.new_zeros(self.n)
        residual = (target - recon).detach()
        values, indices = dead_latent_codes(codes.pre, dead, self.aux_k)
        x_in, bias = self.encoder_grad_inputs(x)
        values = with_encoder_grad(values, indices, x_in, self.W_enc, bias, path=AUXK_PATH)
        real = values.detach() > 0
        aux_recon = sparse_decode(values, indices, self.W_dec, real=real, path=AUXK_PATH)
        scale = (dead.sum(-1).to(recon.dtype) / self.aux_k).clamp(max=1.0)
        return scale * squared_error(aux_recon, residual) / variance

    def _sae_lens_extra(self) -> dict:
        return {"k": self.k, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": self.k}}

    @staticmethod
    def exported_acts(cfg: dict, sd: dict[str, Tensor], x_in: Tensor, pre: Tensor) -> Tensor:
        """The k largest of pre per token."""
        return keep_topk(pre, cfg["k"])


def keep_topk(pre: Tensor, k: int) -> Tensor:
    """[B, d] pre with all but each row's k largest entries zeroed."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)
