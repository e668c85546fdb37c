"""One training step of a stacked SAE: the exact call sequence the group trainer uses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor

from saesweep.sae.base import LossResult, StackedSAE
from saesweep.sae.optim import StackedOptimizer, clip_grad_norm_, member_grad_norms


class StepSync(Protocol):
    """Combines the ranks of a data-parallel group inside one step."""

    def gradients(self, params: Iterable[torch.nn.Parameter]) -> None: ...
    def all_ok(self, ok: Tensor) -> Tensor: ...
    def combine(self, result: LossResult) -> LossResult: ...


def train_step(
    sae: StackedSAE,
    opt: StackedOptimizer,
    x: Tensor,
    step: int,
    max_grad_norm: float | Tensor | None = 1.0,
    normalize_grad: bool | Tensor = False,
    active: Tensor | None = None,
    target: Tensor | None = None,
    sync: StepSync | None = None,
    variance: Tensor | None = None,
) -> dict[str, Tensor]:
    """loss -> backward -> before_optimizer_step -> clip -> masked optimizer step ->
    after_optimizer_step. The clip scales a member's gradient to norm <= max_grad_norm, or
    to that norm exactly where `normalize_grad` ([n] bool or scalar). Members with a
    non-finite loss or gradient (or not in `active`, [n] bool) are left untouched.
    `target`: a transcoder's target batch. `sync` (data-parallel training) makes every
    replica take the whole batch's step (x and target its slice, `variance` its share of
    the batch's FVU denominator: StackedSAE.loss).
    Returns per-member metrics [n], plus "updated" and "grad_norm"."""
    opt.zero_grad()
    result = sae.loss(x, step, target, variance)
    ok = sae.finite_members(result.loss)
    if active is not None:
        ok &= active.to(ok.device)
    result.loss.where(ok, torch.zeros_like(result.loss)).sum().backward()
    if sync is not None:
        sync.gradients(sae.parameters())
        ok = sync.all_ok(ok)
        result = sync.combine(result)
    sae.before_optimizer_step()
    if max_grad_norm is None:
        norms = member_grad_norms(sae.parameters())
    else:
        norms = clip_grad_norm_(sae.parameters(), max_grad_norm, normalize_grad)
    ok &= torch.isfinite(norms).to(ok.device)
    opt.step(update_mask=ok)
    sae.after_optimizer_step(result, update_mask=ok)
    return result.metrics | {"updated": ok, "grad_norm": norms}
