"""BatchTopK SAE (Bussmann et al. 2024): top k*B activations over the whole batch in training,
a running-estimate threshold at inference (exported as a JumpReLU threshold)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from saesweep.configtools import alias, fraction
from saesweep.sae.base import LossResult
from saesweep.sae.codes import Codes, DenseCodes, SparseCodes
from saesweep.sae.jumprelu import JumpReLUSAE
from saesweep.sae.registry import register
from saesweep.sae.sparse import batch_topk_codes, with_encoder_grad
from saesweep.sae.topk import TopKSAE


@dataclass(frozen=True)
class BatchTopKConfig:
    """BatchTopK's options (Matryoshka's too): `sae.batchtopk.*`."""

    threshold_momentum: float = field(
        default=0.99, metadata=fraction(open_top=True) | alias("batchtopk_threshold_momentum")
    )
    """Momentum of the running estimate of the inference threshold (the smallest positive
    activation that batch top-k kept)."""


@register
class BatchTopKSAE(TopKSAE):
    """TopK over the flattened batch; inference uses the learned threshold instead. Training
    takes TopK's sparse path, with codes padded to each token's candidate width (4k or more)."""

    arch = "batchtopk"
    sae_lens_architecture = "jumprelu"

    exported_acts = staticmethod(JumpReLUSAE.exported_acts)  # exported as a JumpReLU SAE

    def register_member_buffers(self) -> None:
        """Also the running inference threshold [n] (-1 until the first estimate)."""
        super().register_member_buffers()
        self.register_buffer("threshold", torch.full((self.n,), -1.0))

    def encode(self, x: Tensor) -> Codes:
        if not self.training:
            pre = self.linear_pre(x)
            return DenseCodes(pre * (pre > self.threshold.clamp_min(0).view(-1, 1, 1)), pre=pre)
        x_in, bias = self.encoder_grad_inputs(x)
        pre = self.detached_pre(x_in)
        values, indices = batch_topk_codes(pre, self.k)
        values = with_encoder_grad(values, indices, x_in, self.W_enc, bias, self.k)
        real = values.detach() > 0  # a token's own entries; the rest pads to the widest token
        return SparseCodes(values, indices, self.d_sae, width=self.k, pre=pre, real=real)

    def threshold_sample(self, codes: Codes) -> Tensor | None:
        """[n] smallest positive activation the batch top-k kept (training codes only), in the
        threshold's dtype: under autocast the running estimate is still updated in float32, as
        SAELens does."""
        if not isinstance(codes, SparseCodes):
            return None
        values = codes.values.detach()
        return values.where(values > 0, torch.inf).amin(dim=(1, 2)).to(self.threshold.dtype)

    def update_running_stats(self, result: LossResult, mask: Tensor) -> None:
        """Also move each member's threshold toward the smallest positive kept activation."""
        super().update_running_stats(result, mask)
        if result.threshold_sample is not None:
            mom, sample = self.cfg.batchtopk.threshold_momentum, result.threshold_sample
            self.threshold.copy_(moved_threshold(self.threshold, sample, mask, mom))

    def _export_extra(self, i: int, s: float) -> dict[str, Tensor]:
        return {"threshold": self.threshold[i].clamp_min(0).expand(self.d_sae)}

    def _sae_lens_extra(self) -> dict:
        return {"k": self.k}


def moved_threshold(threshold: Tensor, sample: Tensor, mask: Tensor, momentum: float) -> Tensor:
    """The running inference threshold moved toward this step's sample (taken as it is while
    the threshold is still -1), where `mask` (members, broadcast against the threshold) is set
    and the sample is finite."""
    new = torch.where(threshold < 0, sample, momentum * threshold + (1 - momentum) * sample)
    return torch.where(mask & torch.isfinite(sample), new, threshold)
