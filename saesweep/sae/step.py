"""One training step of a stacked SAE: the exact call sequence the group trainer uses."""

from __future__ import annotations

import torch
from torch import Tensor

from saesweep.sae.base import StackedSAE
from saesweep.sae.optim import StackedAdam, clip_grad_norm_, member_grad_norms


def train_step(
    sae: StackedSAE,
    opt: StackedAdam,
    x: Tensor,
    step: int,
    max_grad_norm: float | Tensor | None = 1.0,
    active: Tensor | None = None,
    target: Tensor | None = None,
) -> dict[str, Tensor]:
    """loss -> backward -> before_optimizer_step -> clip -> masked Adam step ->
    after_optimizer_step. Members with a non-finite loss or gradient (or not in `active`,
    [n] bool) are left untouched. `target`: a transcoder's target batch. Returns per-member
    metrics [n], plus "updated" and "grad_norm"."""
    opt.zero_grad()
    result = sae.loss(x, step, target)
    ok = sae.finite_members(result.loss)
    if active is not None:
        ok &= active.to(ok.device)
    result.loss.where(ok, torch.zeros_like(result.loss)).sum().backward()
    sae.before_optimizer_step()
    if max_grad_norm is None:
        norms = member_grad_norms(sae.parameters())
    else:
        norms = clip_grad_norm_(sae.parameters(), max_norm=max_grad_norm)
    ok &= torch.isfinite(norms).to(ok.device)
    opt.step(update_mask=ok)
    sae.after_optimizer_step(result, update_mask=ok)
    return result.metrics | {"updated": ok, "grad_norm": norms}
