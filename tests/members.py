"""One member of a stack on its own: its learning-rate schedule, and its exported SAELens
state dict loaded back into a stack (the inverse of StackedSAE.member_state_dict)."""

from __future__ import annotations

import torch
from torch import Tensor

from saesweep.sae import BatchTopKSAE, JumpReLUSAE, StackedSAE, SwitchSAE
from saesweep.sae.optim import LRSchedule


def member_schedule(schedule: LRSchedule, i: int, n: int) -> LRSchedule:
    """Member i's schedule alone (for a stack of one)."""
    w, d, s = schedule.members(n)[i]
    return LRSchedule(schedule.total_steps, [w], [d], [s])


def assert_member_alone(
    stack: StackedSAE, i: int, alone: StackedSAE, stacked: list, alone_metrics: list, **tol
) -> None:
    """Member i of `stack` has the parameters and buffers, bit for bit, of `alone` (a stack
    of one trained by itself), and logged the same metrics each step (within `tol`:
    assert_close's rtol and atol)."""
    for name, p in alone.named_parameters():
        torch.testing.assert_close(stack.get_parameter(name)[i], p[0], rtol=0, atol=0)
    for name, buf in alone.named_buffers():
        torch.testing.assert_close(stack.get_buffer(name)[i], buf[0], rtol=0, atol=0)
    for key in stacked[-1]:
        got = torch.stack([m[key][i] for m in stacked])
        want = torch.stack([m[key][0] for m in alone_metrics]).to(got.dtype)
        torch.testing.assert_close(got, want, msg=key, **tol)


def assert_members_match_reference(sae: StackedSAE, result, step: int, reference) -> None:
    """Each member's loss in `result` (sae.loss at `step`, its sum backpropagated) and every
    gradient equal those of `reference(params, sparsity coefficient)`, a plain float64 loss of
    that member's own parameters."""
    for i in range(sae.n):
        p = {name: t[i].detach().clone().requires_grad_() for name, t in sae.named_parameters()}
        want = reference(p, float(sae.sparsity_at(step)[i]))
        want.backward()
        torch.testing.assert_close(result.loss[i], want.detach(), rtol=1e-12, atol=0)
        for name, param in sae.named_parameters():
            torch.testing.assert_close(param.grad[i], p[name].grad, rtol=1e-10, atol=1e-12)


@torch.no_grad()
def load_member_state_dict(
    sae: StackedSAE,
    i: int,
    sd: dict[str, Tensor],
    input_scale: float = 1.0,
    target_scale: float | None = None,
) -> None:
    """Inverse of member_state_dict: load member i from a raw-space state dict."""
    s, t = input_scale, input_scale if target_scale is None else target_scale
    sae.W_enc[i] = sd["W_enc"] / s
    sae.b_enc[i] = sd["b_enc"]
    sae.W_dec[i] = sd["W_dec"] * t
    sae.b_dec[i] = sd["b_dec"] * t
    if sae.cfg.skip:
        sae.W_skip[i] = sd["W_skip"].T * (t / s)
    _load_extra(sae, i, sd, s)


def _load_extra(sae: StackedSAE, i: int, sd: dict[str, Tensor], s: float) -> None:
    """The architecture's own tensors: a router, or a threshold."""
    if isinstance(sae, SwitchSAE):
        sae.W_router[i] = sd["W_router"] / s
        sae.b_router[i] = sd["b_router"]
    elif isinstance(sae, BatchTopKSAE):
        sae.threshold[i] = sd["threshold"].mean()
    elif isinstance(sae, JumpReLUSAE):
        sae.threshold[i] = sd["threshold"]
