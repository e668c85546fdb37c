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
    which, coeffs = _codes(n_tokens, n_dirs, active, seed)
    return _combine(which, coeffs, _directions(n_dirs, d_in, 0)).to(dtype)


def sparse_map(
    n_tokens: int,
    d_in: int,
    d_out: int,
    n_dirs: int = 64,
    active: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(x [n_tokens, d_in], y [n_tokens, d_out]): x is sparse_mixture(...); y combines the
    same `active` directions of each token with the same coefficients, but over other unit
    directions (fixed by seed 1) in d_out dimensions, scaled alike. y is a planted sparse
    linear map of x: a transcoder with k >= active latents can predict it exactly."""
    which, coeffs = _codes(n_tokens, n_dirs, active, seed)
    x = _combine(which, coeffs, _directions(n_dirs, d_in, 0))
    y = _combine(which, coeffs, _directions(n_dirs, d_out, 1))
    return x.to(dtype), y.to(dtype)


def _directions(n_dirs: int, d: int, seed: int) -> Tensor:
    dirs = torch.randn(n_dirs, d, generator=torch.Generator().manual_seed(seed))
    return dirs / dirs.norm(dim=1, keepdim=True)


def _codes(n_tokens: int, n_dirs: int, active: int, seed: int) -> tuple[Tensor, Tensor]:
    """(which directions [n_tokens, active], their coefficients in [0.5, 1.5))."""
    gen = torch.Generator().manual_seed(seed)
    which = torch.rand(n_tokens, n_dirs, generator=gen).argsort(dim=1)[:, :active]
    return which, torch.rand(n_tokens, active, generator=gen) + 0.5


def _combine(which: Tensor, coeffs: Tensor, dirs: Tensor) -> Tensor:
    x = torch.einsum("tk,tkd->td", coeffs, dirs[which])
    return x * (dirs.shape[1] / x.pow(2).sum(1).mean()).sqrt()
