"""Matryoshka BatchTopK SAE (Bussmann et al. 2025): nested dictionaries, each prefix of the
latents trained to reconstruct the input on its own.

The latents [0, W_1) , [0, W_2), ..., [0, d_sae) are the nested dictionaries. The loss is the
sum of the prefixes' reconstruction losses (each an FVU with the same decoder bias, the codes
of the whole batch top-k restricted to the prefix), plus BatchTopK's AuxK. The first prefix
alone must reconstruct well, so general features settle in the low latents and specific ones
in the later ones, which counters feature absorption. Inference and export are BatchTopK's
(a running threshold, exported as JumpReLU); cfg.json records matryoshka_widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saesweep.configtools import alias
from saesweep.sae.base import check, fvu
from saesweep.sae.batchtopk import BatchTopKSAE
from saesweep.sae.codes import Codes, DenseCodes, SparseCodes
from saesweep.sae.registry import register

if TYPE_CHECKING:
    from saesweep.sae.config import SAEConfig


@dataclass(frozen=True)
class MatryoshkaConfig:
    """Matryoshka's options: `sae.matryoshka.*` (and BatchTopK's, `sae.batchtopk.*`)."""

    widths: tuple[int, ...] = field(default=(), metadata=alias("matryoshka_widths"))
    """The nested dictionary sizes below d_sae, increasing (e.g. 1024,4096); () means
    d_sae/16 and d_sae/4. The full d_sae is always the last one."""


DEFAULT_FRACTIONS = (1 / 16, 1 / 4)
"""widths = () means the prefixes d_sae/16 and d_sae/4 (and d_sae itself)."""


def prefix_widths(cfg: SAEConfig, d_in: int) -> tuple[int, ...]:
    """The nested dictionary sizes, increasing, the last one d_sae."""
    d_sae = cfg.width(d_in)
    widths = cfg.matryoshka.widths or tuple(max(1, int(d_sae * f)) for f in DEFAULT_FRACTIONS)
    return (*widths, d_sae)


@register
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose loss adds the FVU of every nested prefix of the latents."""

    arch = "matryoshka"

    @classmethod
    def check_shape(cls, cfg: SAEConfig, d_in: int) -> None:
        super().check_shape(cfg, d_in)
        widths = prefix_widths(cfg, d_in)
        check(
            all(0 < a < b for a, b in zip(widths, widths[1:], strict=False)),
            f"sae.matryoshka.widths {list(widths[:-1])} must increase and stay below "
            f"d_sae={widths[-1]}",
        )

    def _set_shape(self) -> None:
        super()._set_shape()
        self.widths = prefix_widths(self.cfg, self.d_in)

    def penalties(
        self, x: Tensor, target: Tensor, recon: Tensor, codes: Codes, step: int, variance: Tensor
    ) -> dict:
        """BatchTopK's terms, plus the FVU of every prefix but the full dictionary (which is
        the main term) with coefficient 1."""
        inner = sum(
            fvu(target, self.predict(x, _prefix(codes, w)), variance) for w in self.widths[:-1]
        )
        return super().penalties(x, target, recon, codes, step, variance) | {
            "prefix_fvu": (self.sparsity_coeff.new_ones(self.n), inner)
        }

    def _sae_lens_extra(self) -> dict:
        return super()._sae_lens_extra() | {"matryoshka_widths": list(self.widths)}


def _prefix(codes: Codes, width: int) -> Codes:
    """The codes restricted to latents [0, width)."""
    if isinstance(codes, SparseCodes):
        inside = codes.indices < width
        real = inside if codes.real is None else codes.real & inside
        values = codes.values * inside
        return SparseCodes(values, codes.indices, codes.d_sae, codes.width, real=real)
    keep = torch.arange(codes.acts.shape[-1], device=codes.acts.device) < width
    return DenseCodes(codes.acts * keep)
