"""signum_schedulefree: sign descent inside schedule-free averaging, stacked per member.

sparsify's default optimizer: schedulefree's ScheduleFreeWrapper(SignSGD(lr), momentum 0.95)
with the wrapper's defaults (weight_lr_power 2, r 0, no weight decay), Defazio et al. 2024,
"The Road Less Scheduled". Per member, with lr_t the step's lr:

    z_{t+1} = z_t - lr_t sign(grad at y_t)
    c_{t+1} = lr_max^2 / (sum of lr_max^2 over the member's steps), lr_max = max lr so far
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}
    y_{t+1} = momentum x_{t+1} + (1 - momentum) z_{t+1}

The parameters hold y (where gradients are taken) and the state holds z, as the wrapper
keeps them; x, the average that evaluation and export use, is y + (1 - 1/momentum) (z - y)
(evaluation_point). Every quantity is elementwise or per member, so a stack steps each member
exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from saesweep.sae.optim import StackedOptimizer, bcast


class StackedSignumScheduleFree(StackedOptimizer):
    """Schedule-free signum over parameters with a leading member dimension n, lr per
    member. The gradient's scale does not matter (only its sign is used)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: Sequence[float] | Tensor,
        momentum: float = 0.95,
    ):
        super().__init__(params, lr)
        self.momentum = momentum
        self.z = [p.detach().clone() for p in self.params]
        self.lr_max = torch.zeros_like(self.base_lr)
        self.weight_sum = torch.zeros_like(self.base_lr)

    @torch.no_grad()
    def step(self, update_mask: Tensor | None = None) -> None:
        """One step for the members in update_mask ([n] bool, default all)."""
        mask = self.count_step(update_mask)
        self.lr_max.copy_(torch.where(mask, torch.maximum(self.lr_max, self.lr), self.lr_max))
        weight = self.lr_max**2
        self.weight_sum.copy_(torch.where(mask, self.weight_sum + weight, self.weight_sum))
        average_weight = weight / self.weight_sum
        for p, z in zip(self.params, self.z, strict=True):
            if p.grad is not None:
                self._update(p, p.grad, z, mask, average_weight)

    def _update(self, p: Tensor, g: Tensor, z: Tensor, mask: Tensor, c: Tensor) -> None:
        keep = bcast(mask, p).bool()
        x = p.lerp(z, 1 - 1 / self.momentum)
        z_new = z - bcast(self.lr, p) * g.sign()
        x_new = x.lerp(z_new, bcast(c, p))
        y_new = x_new.lerp(z_new, 1 - self.momentum)
        z.copy_(torch.where(keep, z_new, z))
        p.copy_(torch.where(keep, y_new, p))

    @contextmanager
    def evaluation_point(self) -> Iterator[None]:
        """Inside: the parameters at x, the schedule-free average; after: y again, bit for
        bit."""
        training = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, z in zip(self.params, self.z, strict=True):
                p.lerp_(z, 1 - 1 / self.momentum)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, y in zip(self.params, training, strict=True):
                    p.copy_(y)

    def own_state(self) -> dict[str, Tensor]:
        z = {f"z.{j}": t for j, t in enumerate(self.z)}
        return z | {"lr_max": self.lr_max, "weight_sum": self.weight_sum}
