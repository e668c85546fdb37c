"""The stack's batched matrix product, a[i] @ b[i] (+ bias[i]) for every member i.

On the CPU torch.bmm hands whole members to its threads, so a stack whose size is not a
multiple of the thread count leaves threads idle: 3 members on 2 vCPUs run at 145 GFLOP/s. One
GEMM per member, each on every thread and written into its slice of one output, runs at 195
(1.3x for 3 or 5 members, the same for 1, 2 or 8; `benchmarks/bench.py matmul`,
docs/benchmarks.md). Elsewhere, or under CPU autocast, it is torch.bmm. A member's product is
the same GEMM whatever its peers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _per_member(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    """[n, M, N] one mm (addmm with bias [n, 1, N]) per member into one output; no autograd."""
    out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
    for i in range(a.shape[0]):
        if bias is None:
            torch.mm(a[i], b[i], out=out[i])
        else:
            torch.addmm(bias[i], a[i], b[i], out=out[i])
    return out


class _MemberMatmul(torch.autograd.Function):
    """a @ b per member, with a backward of per-member products too."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _per_member(a, b, None)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        grad_a = _per_member(g, b.transpose(1, 2), None) if ctx.needs_input_grad[0] else None
        grad_b = _per_member(a.transpose(1, 2), g, None) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def member_bmm(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """[n, M, N] a [n, M, K] @ b [n, K, N] (+ bias [n, 1, N]), differentiable in all three."""
    if a.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return torch.bmm(a, b) if bias is None else torch.baddbmm(bias, a, b)
    inputs = (a, b) if bias is None else (a, b, bias)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
        return _per_member(a, b, bias)
    out = _MemberMatmul.apply(a, b)
    return out if bias is None else out + bias
