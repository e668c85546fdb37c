"""Latent codes of one stacked forward pass: dense acts or sparse (values, indices).

Each type decodes itself and counts its own active latents, so no caller asks which fields
are set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saesweep.sae.sparse import Path, dense_decode, sparse_decode


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
    width: int | None = None
    """Nominal entries per token of a code whose last dimension is padded (BatchTopK: its k),
    for the sparse/dense choice of its backward; None: that dimension."""
    pre: Tensor | None = None
    """Pre-activations [n, B, d_sae] (after the encoder ReLU) computed without autograd, for
    AuxK; the codes' gradient goes through sparse.with_encoder_grad."""
    real: Tensor | None = None
    """[n, B, k] bool: the entries a padded code holds (the others are 0-valued padding,
    which the decode skips); None: every entry."""
    path: Path | None = None
    """The backward's path where it is set (AuxK's codes: sparse.AUXK_PATH); None: by width."""

    def decode(self, W_dec: Tensor) -> Tensor:
        """[n, B, d_in] sum of values * W_dec rows, without the decoder bias."""
        return sparse_decode(self.values, self.indices, W_dec, self.width, self.real, self.path)

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


def merge_members(n: int, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """[n, ...] from (member indices, that group's [m, ...] tensor) pairs covering n members;
    differentiable in every part."""
    first = parts[0][1]
    out = first.new_empty(n, *first.shape[1:])
    for members, part in parts:
        out[members] = part
    return out


@dataclass(frozen=True)
class MemberGroups:
    """Codes of a stack whose members were encoded in groups, each by its own path (JumpReLU:
    members with many entries per token dense, the others sparse)."""

    groups: tuple[tuple[Tensor, DenseCodes | SparseCodes], ...]
    """(member indices [m], those members' codes) per group."""
    n: int
    """Members in the stack."""

    def merged(self, per_group) -> Tensor:
        """[n, ...] per_group(members, codes) of every group, in member order."""
        return merge_members(self.n, [(m, per_group(m, c)) for m, c in self.groups])

    def decode(self, W_dec: Tensor) -> Tensor:
        """[n, B, d_in] each group decoded by its own members' W_dec rows."""
        return self.merged(lambda m, codes: codes.decode(W_dec[m]))

    def fire_counts(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """[n, d_sae] number of tokens on which each latent fired."""
        return self.merged(lambda m, codes: codes.fire_counts(dtype))

    def fired(self) -> Tensor:
        """[n, d_sae] bool: latents that fired anywhere in the batch."""
        return self.merged(lambda m, codes: codes.fired())

    def l0(self) -> Tensor:
        """[n] mean number of active latents per token."""
        return self.merged(lambda m, codes: codes.l0())


Codes = DenseCodes | SparseCodes | MemberGroups
"""Any kind of code; architectures may return a subclass carrying more (Switch's routing)."""
