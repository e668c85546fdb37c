"""member_bmm, the stack's per-member matrix product, against torch.bmm."""

import pytest
import torch

from saesweep.sae.matmul import member_bmm


def _inputs(expand: bool):
    """(leaves, a, b, bias): a one matrix expanded over the members or one per member, b a
    transposed view."""
    gen = torch.Generator().manual_seed(0)
    n, M, K, N = 3, 17, 5, 11
    a = torch.randn((M, K) if expand else (n, M, K), generator=gen, dtype=torch.float64)
    b = torch.randn(n, N, K, generator=gen, dtype=torch.float64)
    bias = torch.randn(n, 1, N, generator=gen, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (a, b, bias)]
    return leaves, a.expand(n, M, K), b.transpose(1, 2), bias


@pytest.mark.parametrize("expand", [False, True], ids=["stacked", "expanded"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_member_bmm_matches_bmm_with_its_gradients(expand, with_bias):
    got_leaves, a, b, bias = _inputs(expand)
    got = member_bmm(a, b, bias if with_bias else None)
    want_leaves, a, b, bias = _inputs(expand)
    want = torch.baddbmm(bias, a, b) if with_bias else torch.bmm(a, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=want.dtype)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    for g, w in zip(got_leaves, want_leaves, strict=True):
        if w.grad is None:
            assert g.grad is None
        else:
            torch.testing.assert_close(g.grad, w.grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(member_bmm(a, b), torch.bmm(a, b), rtol=1e-12, atol=1e-12)


def test_member_bmm_gives_each_member_the_product_it_gets_alone():
    a, b, bias = (t.detach() for t in _inputs(False)[1:])
    stacked = member_bmm(a, b, bias)
    for i in range(3):
        assert torch.equal(stacked[i], member_bmm(a[i : i + 1], b[i : i + 1], bias[i : i + 1])[0])
