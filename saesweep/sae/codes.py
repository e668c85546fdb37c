"""Latent codes of one stacked forward pass: dense acts or sparse (values, indices).

Each type decodes itself and counts its own active latents, so no caller asks which fields
are set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saesweep.sae.sparse import Width, dense_decode, sparse_decode


def _l0(codes: Tensor) -> Tensor:
    return (codes > 0).sum(-1).to(codes.dtype).mean(-1)


@dataclass(frozen=True)
class DenseCodes:
    """Dense codes [n, B, d_sae]."""

    acts: Tensor
    """Latent activations [n, B, d_sae]."""
    pre: Tensor | None = None
    """Pre-activations [n, B, d_sae] after the encoder ReLU, for AuxK (BatchTopK at
    inference)."""

    def decode(self, W_dec: Tensor) -> Tensor:
        """[n, B, d_in] acts @ W_dec, without the decoder bias."""
        return dense_decode(self.acts, W_dec)

    def fire_counts(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """[n, d_sae] number of tokens on which each latent fired."""
        return (self.acts > 0).sum(1).to(dtype)

    def fired(self) -> Tensor:
        """[n, d_sae] bool: latents that fired anywhere in the batch."""
        return (self.acts > 0).any(dim=1)

    def l0(self) -> Tensor:
        """[n] mean number of active latents per token."""
        return _l0(self.acts)


@dataclass(frozen=True)
class SparseCodes:
    """Sparse codes: k (value, latent index) entries per token; 0-valued entries are padding."""

    values: Tensor
    """Code values [n, B, k]."""
    indices: Tensor
    """Latent indices [n, B, k]."""
    d_sae: int
    """Latents per member."""
    width: Width = None
    """Nominal entries per token of a code whose last dimension is padded (BatchTopK: its k;
    JumpReLU: each member's mean), for the sparse/dense choice of its backward (sparse.Width)."""
    pre: Tensor | None = None
    """Pre-activations [n, B, d_sae] (after the encoder ReLU) computed without autograd, for
    AuxK; the codes' gradient goes through sparse.with_encoder_grad."""

    def decode(self, W_dec: Tensor) -> Tensor:
        """[n, B, d_in] sum of values * W_dec rows, without the decoder bias."""
        return sparse_decode(self.values, self.indices, W_dec, self.width)

    def fire_counts(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """[n, d_sae] number of tokens on which each latent had a positive value."""
        n = self.values.shape[0]
        counts = torch.zeros(n, self.d_sae, dtype=dtype, device=self.values.device)
        hits = (self.values > 0).to(dtype).reshape(n, -1)
        return counts.scatter_add_(1, self.indices.reshape(n, -1), hits)

    def fired(self) -> Tensor:
        """[n, d_sae] bool: latents that fired anywhere in the batch."""
        return self.fire_counts(self.values.dtype) > 0

    def l0(self) -> Tensor:
        """[n] mean number of active latents per token."""
        return _l0(self.values)


Codes = DenseCodes | SparseCodes
"""Either kind of code; architectures may return a subclass carrying more (Switch's routing)."""
