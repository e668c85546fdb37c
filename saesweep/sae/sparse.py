"""Fast paths for codes with k active latents per token, checked against dense references.

A stacked code is (values [n, B, k], indices [n, B, k]) into a dictionary of d_sae latents
per member. Members are folded into one flat dictionary of n * d_sae rows by offsetting each
member's indices, so one kernel call serves the whole stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor


def flat_indices(indices: Int[Tensor, "n B k"], d_sae: int) -> Int[Tensor, "n B k"]:
    """Indices into the stack's flat dictionary [n * d_sae, ...]."""
    offsets = torch.arange(indices.shape[0], device=indices.device) * d_sae
    return indices + offsets.view(-1, 1, 1)


@jaxtyped(typechecker=beartype)
def sparse_decode(
    values: Float[Tensor, "n B k"],
    indices: Int[Tensor, "n B k"],
    W_dec: Float[Tensor, "n d_sae d_in"],
) -> Float[Tensor, "n B d_in"]:
    """sum_j values[.., j] * W_dec[member, indices[.., j]] without the dense [n, B, d_sae] code.

    One embedding_bag over the flat dictionary; differentiable in values and W_dec.
    """
    n, B, k = values.shape
    d_sae, d_in = W_dec.shape[1:]
    flat = flat_indices(indices, d_sae).reshape(n * B, k)
    out = F.embedding_bag(
        flat,
        W_dec.reshape(n * d_sae, d_in),
        per_sample_weights=values.reshape(n * B, k),
        mode="sum",
    )
    return out.view(n, B, d_in)


@jaxtyped(typechecker=beartype)
def dense_decode(
    acts: Float[Tensor, "n B d_sae"], W_dec: Float[Tensor, "n d_sae d_in"]
) -> Float[Tensor, "n B d_in"]:
    """Reference decode of dense codes: one batched matmul."""
    return torch.bmm(acts, W_dec)


@jaxtyped(typechecker=beartype)
def to_dense(
    values: Float[Tensor, "n B k"], indices: Int[Tensor, "n B k"], d_sae: int
) -> Float[Tensor, "n B d_sae"]:
    """Scatter a sparse code into its dense [n, B, d_sae] form."""
    n, B, _ = values.shape
    dense = values.new_zeros(n, B, d_sae)
    return dense.scatter(2, indices, values)


@jaxtyped(typechecker=beartype)
def fired_latents(
    values: Float[Tensor, "n B k"], indices: Int[Tensor, "n B k"], d_sae: int
) -> torch.Tensor:
    """[n, d_sae] bool: which latents had a positive value anywhere in the batch."""
    n = values.shape[0]
    hits = values.new_zeros(n, d_sae)
    hits.scatter_add_(1, indices.reshape(n, -1), (values > 0).to(values.dtype).reshape(n, -1))
    return hits > 0


class _TopKEncode(torch.autograd.Function):
    """TopK encoder whose backward touches only the k selected latents per token."""

    @staticmethod
    def forward(ctx, x_in, W_enc, b_enc, k):
        pre = torch.bmm(x_in, W_enc) + b_enc.unsqueeze(1)
        values, indices = torch.topk(pre.relu(), k, dim=-1, sorted=False)
        ctx.save_for_backward(x_in, W_enc, indices, values)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        x_in, W_enc, indices, values = ctx.saved_tensors
        g = grad_values * (values > 0)
        n, B, k = g.shape
        d_in, d_sae = W_enc.shape[1:]
        rows = flat_indices(indices, d_sae).reshape(-1)
        cols = (torch.arange(n * B, device=g.device).view(n, B, 1).expand(n, B, k)).reshape(-1)
        grad_W = grad_b = grad_x = None
        if ctx.needs_input_grad[1]:
            coo = torch.sparse_coo_tensor(
                torch.stack([rows, cols]),
                g.reshape(-1),
                (n * d_sae, n * B),
                check_invariants=False,
            )
            grad_W_t = torch.sparse.mm(coo, x_in.reshape(n * B, d_in))
            grad_W = grad_W_t.view(n, d_sae, d_in).transpose(1, 2)
        if ctx.needs_input_grad[2]:
            grad_b = g.new_zeros(n * d_sae).index_add_(0, rows, g.reshape(-1)).view(n, d_sae)
        if ctx.needs_input_grad[0]:
            grad_x = sparse_decode(g, indices, W_enc.transpose(1, 2))
        return grad_x, grad_W, grad_b, None


@jaxtyped(typechecker=beartype)
def sparse_topk_encode(
    x_in: Float[Tensor, "n B d_in"],
    W_enc: Float[Tensor, "n d_in d_sae"],
    b_enc: Float[Tensor, "n d_sae"],
    k: int,
) -> tuple[Float[Tensor, "n B k"], Int[Tensor, "n B k"]]:
    """top-k of relu(x_in @ W_enc + b_enc) with a sparse backward (no dense [n, B, d_sae] grad).

    Same values and gradients as the dense `topk(relu(bmm(x_in, W_enc) + b_enc), k)`.
    """
    return _TopKEncode.apply(x_in, W_enc, b_enc, k)
