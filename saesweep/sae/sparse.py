"""Fast paths for codes with k active latents per token, checked against dense references.

A stacked code is (values [n, B, k], indices [n, B, k]) into a dictionary of d_sae latents
per member; entries with value 0 are padding (batch_topk_codes) or ReLU zeros and carry no
gradient. Members are folded into one flat dictionary of n * d_sae rows by offsetting each
member's indices, so one kernel call serves the whole stack.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

from saesweep.sae.matmul import member_bmm

Path = Literal["dense", "padded", "entries"]
"""How a backward takes a code (backward_path)."""


def flat_indices(indices: Int[Tensor, "n B k"], d_sae: int) -> Int[Tensor, "n B k"]:
    """Indices into the stack's flat dictionary [n * d_sae, ...]."""
    offsets = torch.arange(indices.shape[0], device=indices.device) * d_sae
    return indices + offsets.view(-1, 1, 1)


@jaxtyped(typechecker=beartype)
def sparse_decode(
    values: Float[Tensor, "n B k"],
    indices: Int[Tensor, "n B k"],
    W_dec: Float[Tensor, "n d_sae d_in"],
    width: int | None = None,
    real: Bool[Tensor, "n B k"] | None = None,
    path: Path | None = None,
) -> Float[Tensor, "n B d_in"]:
    """sum_j values[.., j] * W_dec[member, indices[.., j]] without the dense [n, B, d_sae] code.

    One embedding_bag over the flat dictionary; differentiable in values and W_dec (W_dec's
    gradient by a sparse matmul, faster than embedding_bag's own backward). `width`: the
    code's nominal entries per token (default k), which sets the backward's path (DENSE_ABOVE;
    `path` sets it instead where given).
    `real`: the entries a padded code holds (the others 0-valued padding): only these are
    decoded, in bags of each token's own size, where a padded code can be several times wider
    than its mean entries per token.
    """
    n, B, k = values.shape
    d_sae, d_in = W_dec.shape[1:]
    flat = flat_indices(indices, d_sae).reshape(n * B, k)
    weights, offsets = values.reshape(n * B, k), None
    if real is not None:
        keep = real.reshape(-1).nonzero().squeeze(1)
        counts = real.reshape(n * B, k).sum(1)
        flat, weights = flat.reshape(-1)[keep], weights.reshape(-1)[keep]
        offsets = counts.cumsum(0) - counts
    out = F.embedding_bag(
        flat,
        W_dec.detach().reshape(n * d_sae, d_in),
        offsets,
        per_sample_weights=weights,
        mode="sum",
    )
    path = path or backward_path(width, k, d_sae)
    return _DecoderGrad.apply(out.view(n, B, d_in), values.detach(), indices, W_dec, path)


class _DecoderGrad(torch.autograd.Function):
    """Identity on a sparse decode's output; the backward adds W_dec's gradient through the
    selected rows only."""

    @staticmethod
    def forward(ctx, out, values, indices, W_dec, path):
        ctx.save_for_backward(values, indices)
        ctx.d_sae, ctx.path = W_dec.shape[1], path
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices = ctx.saved_tensors
        grad_W = None
        if ctx.needs_input_grad[3]:
            code = _SparseCode(values.to(grad_out.dtype), indices, ctx.d_sae, ctx.path)
            grad_W = code.t_matmul(grad_out)
        return grad_out, None, None, grad_W, None


@jaxtyped(typechecker=beartype)
def batch_topk_codes(
    pre: Float[Tensor, "n B d_sae"], k: int
) -> tuple[Float[Tensor, "n B w"], Int[Tensor, "n B w"]]:
    """Each member's k * B largest entries over the whole batch, as per-token codes (values,
    indices) [n, B, w] with 0-valued padding.

    Chosen among each token's w largest (w = 4k, doubled until it holds): if no token has all
    of its w candidates chosen, no entry outside the candidates can beat the smallest chosen
    one, so the choice equals a top-k over the whole batch. torch's topk over the whole batch
    (k * B in the tens of thousands) took 4x as long here.
    """
    n, B, d_sae = pre.shape
    width = min(4 * k, d_sae)
    while True:
        values, indices = pre.topk(width, dim=-1)  # sorted: the same order for any width
        _, chosen = values.view(n, B * width).topk(k * B, dim=-1, sorted=False)
        per_token = torch.zeros(n, B, dtype=torch.int64, device=pre.device)
        per_token.scatter_add_(1, chosen // width, torch.ones_like(chosen))
        if width == d_sae or int(per_token.max()) < width:
            break
        width = min(2 * width, d_sae)
    keep = torch.zeros(n, B * width, dtype=torch.bool, device=pre.device).scatter_(1, chosen, True)
    return values.where(keep.view(n, B, width), 0), indices


def dead_latent_codes(pre: Tensor, dead: Tensor, aux_k: int) -> tuple[Tensor, Tensor]:
    """AuxK's codes: each token's aux_k largest pre-activations `pre` [n, B, ..., d] among its
    member's dead latents `dead` [n, ..., d], as (values, indices) [n, B, ..., w] in increasing
    latent order, padded with 0-valued entries. w = min(aux_k, the most dead latents of any
    row of `dead`): a few dead latents make a narrow code, read from `pre` at those latents
    only. A member's nonzero entries, and their order, do not depend on the w its peers set.
    Such a code takes the 'padded' path (its zeros dropped): AUXK_PATH."""
    most = int(dead.sum(-1).max())
    ranked = dead.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :most]
    latents = ranked.unsqueeze(1).expand(*pre.shape[:-1], most)  # dead ones first, in order
    values = pre.detach().gather(-1, latents)
    values = values.where(dead.gather(-1, ranked).unsqueeze(1), 0)
    if most <= aux_k:
        return values, latents
    _, slots = values.topk(aux_k, dim=-1, sorted=False)
    slots = slots.sort(dim=-1).values
    return values.gather(-1, slots), latents.gather(-1, slots)


AUXK_PATH: Path = "padded"
"""The backward of AuxK's codes goes over their nonzero entries, whatever their width: at most
each member's own dead latents per token, a choice that depends on no peer (the dense path,
which aux_k = d_in / 2 once chose for small dictionaries, cost three dense GEMMs a step)."""


@jaxtyped(typechecker=beartype)
def select_entries(mask: Bool[Tensor, "n B d_sae"]) -> tuple[Int[Tensor, "n B w"], Tensor]:
    """Each token's True entries of `mask` as a code's indices [n, B, w], in increasing order,
    padded to the largest count w with latent 0; and the [n, B, w] bool of real entries."""
    n, B, _ = mask.shape
    member, token, latent = mask.nonzero(as_tuple=True)
    bag = member * B + token
    counts = torch.bincount(bag, minlength=n * B)  # a bool sum over mask: 2x the time
    width = max(int(counts.max()), 1)
    first = counts.cumsum(0) - counts
    slot = torch.arange(bag.numel(), device=mask.device) - first[bag]
    indices = torch.zeros(n * B, width, dtype=torch.int64, device=mask.device)
    real = torch.zeros(n * B, width, dtype=torch.bool, device=mask.device)
    indices[bag, slot] = latent
    real[bag, slot] = True
    return indices.view(n, B, width), real.view(n, B, width)


@jaxtyped(typechecker=beartype)
def dense_decode(
    acts: Float[Tensor, "n B d_sae"], W_dec: Float[Tensor, "n d_sae d_in"]
) -> Float[Tensor, "n B d_in"]:
    """Reference decode of dense codes: one batched matmul."""
    return member_bmm(acts, W_dec)


@jaxtyped(typechecker=beartype)
def to_dense(
    values: Float[Tensor, "n B k"], indices: Int[Tensor, "n B k"], d_sae: int
) -> Float[Tensor, "n B d_sae"]:
    """Scatter a sparse code into its dense [n, B, d_sae] form (repeated indices add up: the
    0-valued padding of batch_topk_codes may repeat a latent)."""
    n, B, _ = values.shape
    dense = values.new_zeros(n, B, d_sae)
    return dense.scatter_add(2, indices, values)


class _EncoderGrad(torch.autograd.Function):
    """Identity on ReLU encoder outputs computed without autograd; the backward sends their
    gradient to x_in, W_enc and b_enc through the selected (token, latent) pairs only."""

    @staticmethod
    def forward(ctx, values, indices, x_in, W_enc, b_enc, path):
        ctx.save_for_backward(values, indices, x_in, W_enc)
        ctx.path = path
        return values.to(W_enc.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad_values):
        values, indices, x_in, W_enc = ctx.saved_tensors
        g = (grad_values * (values > 0)).to(W_enc.dtype)
        code = _SparseCode(g, indices, W_enc.shape[2], ctx.path)
        return None, None, *_encoder_grads(code, x_in, W_enc, ctx.needs_input_grad[2:5]), None


class _DenseEncoderGrad(torch.autograd.Function):
    """Identity on all pre-activations computed without autograd; the backward sends their
    gradient to x_in, W_enc and b_enc by dense batched products."""

    @staticmethod
    def forward(ctx, pre, x_in, W_enc, b_enc):
        ctx.save_for_backward(x_in, W_enc)
        return pre.view_as(pre)

    @staticmethod
    def backward(ctx, g):
        x_in, W_enc = ctx.saved_tensors
        code = _SparseCode(g, None, W_enc.shape[2], "dense")
        return None, *_encoder_grads(code, x_in, W_enc, ctx.needs_input_grad[1:4])


def _encoder_grads(code: _SparseCode, x_in: Tensor, W_enc: Tensor, needs) -> tuple:
    """(x_in, W_enc, b_enc) gradients of pre-activations whose gradient is `code`, each None
    where `needs` (three bools) says it is not needed. W_enc's is made contiguous once here:
    clipping's per-member sum copied it anyway, and Adam's passes run faster over it."""
    grad_x = code.matmul(W_enc.transpose(1, 2)) if needs[0] else None
    grad_W = code.t_matmul(x_in).transpose(1, 2).contiguous() if needs[1] else None
    grad_b = code.sum_tokens() if needs[2] else None
    return grad_x, grad_W, grad_b


DENSE_ABOVE = 1 / 16
"""Code width (nominal entries per token over d_sae) above which a backward goes through the
dense code and batched matmuls: on CPU a sparse matmul runs at about 1/16 of a dense one's FLOP
rate (8 vs 140 GFLOP/s). The choice depends on the shape only, not on the values, so a member's
arithmetic does not depend on the other members of its stack (and needs no device sync)."""


def is_dense(width: int, d_sae: int) -> bool:
    """Whether a code of `width` entries per token takes the dense backward."""
    return width > DENSE_ABOVE * d_sae


def backward_path(width: int | None, k: int, d_sae: int) -> Path:
    """How a backward takes a code of k entries per token, `width` of them nominal (None: k):
    'dense' (is_dense), else over its entries: 'padded' (width < k) drops the zero entries,
    most of a padded code; 'entries' keeps them all, since a zero adds 0 to every sum and
    dropping the few of an unpadded code took a pass and three index ops over all entries."""
    width = width or k
    if is_dense(width, d_sae):
        return "dense"
    return "padded" if width < k else "entries"


class _SparseCode:
    """A code [n, B, d_sae] given as entries g [n, B, k] at indices (None: g is the dense
    code): the products a backward needs, over its entries only (`path`: backward_path), or
    through the dense code when that is faster."""

    def __init__(self, g: Tensor, indices: Tensor | None, d_sae: int, path: Path):
        n, B, _ = g.shape
        self.n, self.B, self.d_sae = n, B, d_sae
        self.dense = None
        if indices is None:
            self.dense = g
        elif path == "dense":
            self.dense = to_dense(g, indices, d_sae)
        else:
            self.rows, self.cols, self.g = _entries(g, indices, d_sae, path == "padded")

    def matmul(self, W_rows: Tensor) -> Tensor:
        """[n, B, d_in] code @ W_rows [n, d_sae, d_in]."""
        if self.dense is not None:
            return member_bmm(self.dense, W_rows)
        W_flat = W_rows.contiguous().view(-1, W_rows.shape[-1])
        offsets = torch.searchsorted(self.cols, torch.arange(self.n * self.B, device=W_flat.device))
        out = F.embedding_bag(self.rows, W_flat, offsets, mode="sum", per_sample_weights=self.g)
        return out.view(self.n, self.B, -1)

    def t_matmul(self, x: Tensor) -> Tensor:
        """[n, d_sae, d_in] code^T @ x [n, B, d_in]."""
        if self.dense is not None:
            return member_bmm(self.dense.transpose(1, 2), x)
        x_flat = x.reshape(-1, x.shape[-1])
        size = (self.n * self.d_sae, x_flat.shape[0])
        coo = torch.sparse_coo_tensor(
            torch.stack([self.rows, self.cols]), self.g, size, check_invariants=False
        )
        return torch.sparse.mm(coo, x_flat).view(self.n, self.d_sae, -1)

    def sum_tokens(self) -> Tensor:
        """[n, d_sae] code summed over the batch."""
        if self.dense is not None:
            return self.dense.sum(1)
        out = self.g.new_zeros(self.n * self.d_sae).index_add_(0, self.rows, self.g)
        return out.view(self.n, self.d_sae)


def _entries(
    g: Tensor, indices: Tensor, d_sae: int, nonzero: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(flat latent, flat token, value) of each entry of g [n, B, k], or of each nonzero one
    where `nonzero`, token-major."""
    n, B, k = g.shape
    rows = flat_indices(indices, d_sae).reshape(-1)
    cols = torch.arange(n * B, device=g.device).unsqueeze(1).expand(n * B, k).reshape(-1)
    g = g.reshape(-1)
    if not nonzero:
        return rows, cols, g
    keep = (g != 0).nonzero().squeeze(1)
    return rows[keep], cols[keep], g[keep]


@jaxtyped(typechecker=beartype)
def with_encoder_grad(
    values: Float[Tensor, "n B k"],
    indices: Int[Tensor, "n B k"],
    x_in: Float[Tensor, "n B d_in"],
    W_enc: Float[Tensor, "n d_in d_sae"],
    b_enc: Float[Tensor, "n d_sae"],
    width: int | None = None,
    path: Path | None = None,
) -> Float[Tensor, "n B k"]:
    """values = x_in @ W_enc + b_enc at `indices` (or its ReLU), computed without autograd
    (maybe in autocast's lower precision), made differentiable in x_in, W_enc and b_enc, in
    W_enc's dtype. b_enc's value is not used: it receives the gradient summed over tokens
    (StackedSAE.encoder_grad_inputs's bias passes it on to b_dec as well).

    Same gradients as gathering from the dense autograd pre-activations, at the cost of the
    selected entries only (no dense [n, B, d_sae] gradient). Entries with value <= 0 (ReLU
    off, padding) get no gradient. `width`, `path`: as for sparse_decode.
    """
    path = path or backward_path(width, values.shape[-1], W_enc.shape[-1])
    return _EncoderGrad.apply(values, indices, x_in, W_enc, b_enc, path)


def with_dense_encoder_grad(
    pre: Float[Tensor, "n B d_sae"],
    x_in: Float[Tensor, "n B d_in"],
    W_enc: Float[Tensor, "n d_in d_sae"],
    b_enc: Float[Tensor, "n d_sae"],
) -> Float[Tensor, "n B d_sae"]:
    """pre = x_in @ W_enc + b_enc, computed without autograd, made differentiable in x_in, W_enc
    and b_enc (b_enc's value not used, as for with_encoder_grad): the dense counterpart of
    with_encoder_grad, for codes over all latents (JumpReLU early in training)."""
    return _DenseEncoderGrad.apply(pre, x_in, W_enc, b_enc)
