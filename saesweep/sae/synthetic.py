"""Synthetic activations with known sparse structure, for tests and demos."""

from __future__ import annotations

import torch
from torch import Tensor


def sparse_mixture(
    n_tokens: int,
    d_in: int,
    n_dirs: int = 64,
    active: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """[n_tokens, d_in]: each token a positive combination of `active` of n_dirs random unit
    directions (fixed by seed 0), scaled so that E|x|^2 is about d_in."""
    dirs = torch.randn(n_dirs, d_in, generator=torch.Generator().manual_seed(0))
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    which = torch.rand(n_tokens, n_dirs, generator=gen).argsort(dim=1)[:, :active]
    coeffs = torch.rand(n_tokens, active, generator=gen) + 0.5
    x = torch.einsum("tk,tkd->td", coeffs, dirs[which])
    x = x * (d_in / x.pow(2).sum(1).mean()).sqrt()
    return x.to(dtype)
