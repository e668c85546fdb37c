"""Sparse fast paths agree with their dense references (values and gradients)."""

import pytest
import torch

from saesweep.sae import DenseCodes, SparseCodes, sparse
from saesweep.sae.sparse import (
    dense_decode,
    select_entries,
    sparse_decode,
    to_dense,
    with_encoder_grad,
)

N, B, K, D_IN, D_SAE = 3, 16, 5, 32, 128


def _codes(seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(N, B, K, generator=gen, dtype=torch.float64)
    indices = torch.rand(N, B, D_SAE, generator=gen).argsort(-1)[..., :K]
    return values, indices


@pytest.fixture(params=["sparse", "dense"])
def backward_path(request, monkeypatch):
    """Force _SparseCode's sparse (nonzero entries) or dense (batched matmul) backward."""
    monkeypatch.setattr(sparse, "DENSE_ABOVE", 1.0 if request.param == "sparse" else 0.0)


@pytest.mark.usefixtures("backward_path")
@pytest.mark.parametrize("padded", [False, True])
def test_sparse_decode_matches_dense_values_and_grads(padded):
    # padded: a code whose real entries vary per token (one token has none), decoded in bags
    # of each token's own size; its padding gets no gradient
    values, indices = _codes()
    real = None
    if padded:
        real = torch.rand(N, B, K, generator=torch.Generator().manual_seed(5)) < 0.6
        real[0, 0] = False
        values = values * real
    W = torch.randn(N, D_SAE, D_IN, dtype=torch.float64, requires_grad=True)
    v1 = values.clone().requires_grad_()
    v2 = values.clone().requires_grad_()
    out_sparse = sparse_decode(v1, indices, W, real=real)
    probe = torch.randn_like(out_sparse)
    (out_sparse * probe).sum().backward()
    grad_W_sparse, W.grad = W.grad.clone(), None
    dense = to_dense(v2, indices, D_SAE)
    out_dense = dense_decode(dense, W)
    (out_dense * probe).sum().backward()
    torch.testing.assert_close(out_sparse, out_dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_W_sparse, W.grad, rtol=1e-12, atol=1e-12)
    want = v2.grad if real is None else v2.grad * real
    torch.testing.assert_close(v1.grad, want, rtol=1e-12, atol=1e-12)


def test_sparse_decode_member_offsets_use_own_dictionary():
    values, indices = _codes(1)
    W = torch.randn(N, D_SAE, D_IN, dtype=torch.float64)
    out = sparse_decode(values, indices, W)
    for i in range(N):
        expected = torch.einsum("bk,bkd->bd", values[i], W[i][indices[i]])
        torch.testing.assert_close(out[i], expected)


def test_to_dense_and_fired_latents():
    values, indices = _codes(2)
    values[0, :, 0] = 0.0  # a zero value is not a firing
    dense = to_dense(values, indices, D_SAE)
    assert dense.shape == (N, B, D_SAE)
    assert torch.equal((dense > 0).sum(-1), (values > 0).sum(-1))
    codes = SparseCodes(values, indices, D_SAE)
    assert torch.equal(codes.fired(), (dense > 0).any(1))
    assert torch.equal(codes.fire_counts(), DenseCodes(dense).fire_counts())
    assert torch.equal(codes.l0(), DenseCodes(dense).l0())
    W = torch.randn(N, D_SAE, D_IN, dtype=torch.float64)
    torch.testing.assert_close(codes.decode(W), DenseCodes(dense).decode(W))


@pytest.mark.usefixtures("backward_path")
def test_with_encoder_grad_matches_dense_autograd():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, B, D_IN, generator=gen, dtype=torch.float64)
    W = torch.randn(N, D_IN, D_SAE, generator=gen, dtype=torch.float64)
    b = torch.randn(N, D_SAE, generator=gen, dtype=torch.float64) - 14.0  # ReLU zeros
    leaves_sparse = [t.clone().requires_grad_() for t in (x, W, b)]
    leaves_dense = [t.clone().requires_grad_() for t in (x, W, b)]
    xs, Ws, bs = leaves_sparse
    with torch.no_grad():
        pre = (torch.bmm(xs, Ws) + bs.unsqueeze(1)).relu()
    indices = torch.rand(N, B, D_SAE, generator=gen).argsort(-1)[..., :K]
    indices[0, 0] = pre[0, 0].topk(K).indices  # some positive values on a token
    values = with_encoder_grad(pre.gather(-1, indices), indices, *leaves_sparse)
    xd, Wd, bd = leaves_dense
    ref_values = (torch.bmm(xd, Wd) + bd.unsqueeze(1)).relu().gather(-1, indices)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    assert (values == 0).any() and (values > 0).any(), "cover ReLU zeros and positives"

    probe = torch.randn(N, B, K, generator=gen, dtype=torch.float64)
    (values * probe).sum().backward()
    (ref_values * probe).sum().backward()
    for got, want in zip(leaves_sparse, leaves_dense, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


def test_select_entries_lists_each_tokens_true_entries_in_order():
    mask = torch.rand(N, B, D_SAE, generator=torch.Generator().manual_seed(4)) < 0.05
    mask[1, 2] = False  # a token with no entry
    mask[2, 3, :40] = True  # the widest token
    indices, real = select_entries(mask)
    assert indices.shape[-1] == mask.sum(-1).max() >= 40
    assert torch.equal(real.sum(-1), mask.sum(-1))
    assert torch.equal(to_dense(real.double(), indices, D_SAE) > 0, mask)
    kept = indices.where(real, D_SAE)
    assert torch.equal(kept, kept.sort(-1).values), "increasing latents, padding last"


@pytest.mark.parametrize("hot_tokens", [0, 1, 3], ids=["even", "one-hot-token", "three"])
def test_batch_topk_codes_equal_a_top_k_over_the_whole_batch(hot_tokens):
    # hot tokens hold most of the batch's largest entries: the 4k candidates per token are
    # not enough for them, and the candidate width must grow until it holds
    gen = torch.Generator().manual_seed(hot_tokens)
    pre = torch.rand(N, B, D_SAE, generator=gen, dtype=torch.float64)
    pre[:, :hot_tokens] += 1.0
    pre[pre < 0.3] = 0.0
    values, indices = sparse.batch_topk_codes(pre, K)
    flat = pre.reshape(N, -1)
    top, where = flat.topk(K * B, dim=-1)
    want = torch.zeros_like(flat).scatter(1, where, top).view_as(pre)
    torch.testing.assert_close(to_dense(values, indices, D_SAE), want, rtol=0, atol=0)
    per_token = (values > 0).sum(-1)
    assert per_token.sum(-1).tolist() == [K * B] * N
    if hot_tokens:
        assert per_token.max() > 4 * K


def test_an_unpadded_codes_zero_entries_change_no_sparse_product():
    """The 'entries' backward keeps a code's zero entries; 'padded' drops them first."""
    gen = torch.Generator().manual_seed(4)
    values, indices = _codes(seed=4)
    values = values.float() * (torch.rand(N, B, K, generator=gen) > 0.3)  # ReLU zeros
    x = torch.randn(N, B, D_IN, generator=gen)
    W = torch.randn(N, D_SAE, D_IN, generator=gen)
    codes = [sparse._SparseCode(values, indices, D_SAE, p) for p in ("entries", "padded")]
    assert codes[0].g.numel() == N * B * K > codes[1].g.numel()
    for product in (lambda c: c.t_matmul(x), lambda c: c.matmul(W), lambda c: c.sum_tokens()):
        assert torch.equal(product(codes[0]), product(codes[1]))
    assert sparse.backward_path(None, K, D_SAE) == "entries"
    assert sparse.backward_path(K - 1, K, D_SAE) == "padded"
    assert sparse.backward_path(K, K, K) == "dense"
