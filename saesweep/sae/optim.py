"""Stacked optimizers, per-member gradient clipping and learning-rate schedules.

Adam is elementwise, so one optimizer over stacked parameters [n, ...] with a per-member
learning rate [n] is the same as n separate Adams (likewise signum_schedulefree,
sae/schedulefree.py). Each member keeps its own step count, so a member whose update is
masked (e.g. its loss was NaN) is left exactly as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Optimizer = Literal["adam", "signum_schedulefree"]

DEFAULT_LR_AT_2_14: dict[Optimizer, float] = {"adam": 1e-3, "signum_schedulefree": 5e-3}
"""The default lr at 2**14 latents per optimizer. adam: 3.3e-3 at 1,536, where TopK's best was
3.05e-3 at 2,500 steps of 4,096 tokens and 4.8e-3 at 10,000, with 3.05e-3 0.6 % behind and
fewer dead latents there (docs/benchmarks.md, "The default lr"). signum_schedulefree:
sparsify's default (1.6e-2 at 1,536)."""


def default_lr(d_sae: int, optimizer: Optimizer = "adam") -> float:
    """Learning rate scaled with width as OpenAI's heuristic scales it (1 / sqrt(d_sae)), from
    DEFAULT_LR_AT_2_14 (OpenAI's 2e-4 was for Adam on gradients that are not normalized)."""
    return DEFAULT_LR_AT_2_14[optimizer] / math.sqrt(d_sae / 2**14)


def bcast(v: Tensor, p: Tensor) -> Tensor:
    """Per-member values [n] shaped to broadcast over p [n, ...], in p's dtype."""
    return v.view(-1, *([1] * (p.dim() - 1))).to(p.dtype)


class StackedOptimizer:
    """What every stacked optimizer shares: parameters with a leading member dimension n, a
    base lr per member times the schedule's factor, and a step count per member."""

    def __init__(self, params: Iterable[nn.Parameter], lr: Sequence[float] | Tensor):
        self.params = list(params)
        self.n = self.params[0].shape[0]
        device = self.params[0].device
        if any(p.shape[0] != self.n for p in self.params):
            raise ValueError("every stacked parameter needs the same leading member dimension")
        self.base_lr = torch.as_tensor(lr, dtype=torch.float64, device=device).clone()
        self.lr = self.base_lr.clone()
        self.step_count = torch.zeros(self.n, dtype=torch.int64, device=device)

    def set_lr_factor(self, factor: Tensor | float) -> None:
        """Current lr = base lr * factor (a scalar or per member [n])."""
        self.lr = self.base_lr * torch.as_tensor(factor, dtype=torch.float64).to(self.lr.device)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, update_mask: Tensor | None = None) -> None:
        """One step for the members in update_mask ([n] bool, default all)."""
        raise NotImplementedError

    def count_step(self, update_mask: Tensor | None) -> Tensor:
        """[n] bool: the members this step updates (default all), their step counts raised."""
        mask = torch.ones_like(self.step_count, dtype=torch.bool)
        if update_mask is not None:
            mask = update_mask.to(self.step_count.device)
        self.step_count += mask
        return mask

    @contextmanager
    def evaluation_point(self) -> Iterator[None]:
        """Inside: the parameters as evaluation and export see them (Adam's as they are)."""
        yield

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensor dict (safetensors-friendly) for bit-identical resume."""
        sd = {"step": self.step_count, "base_lr": self.base_lr, "lr": self.lr}
        return {k: t.detach().clone() for k, t in (sd | self.own_state()).items()}

    def own_state(self) -> dict[str, Tensor]:
        """The subclass's tensors of state_dict."""
        return {}

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        self.step_count.copy_(sd["step"])
        self.base_lr.copy_(sd["base_lr"])
        self.lr = sd["lr"].clone().to(self.base_lr)
        for name, t in self.own_state().items():
            t.copy_(sd[name])


class StackedAdam(StackedOptimizer):
    """Adam / AdamW over parameters with a leading member dimension n, lr per member."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: Sequence[float] | Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: Sequence[float] | Tensor | float = 0.0,
    ):
        super().__init__(params, lr)
        self.betas, self.eps = betas, eps
        wd = torch.as_tensor(weight_decay, dtype=torch.float64, device=self.base_lr.device)
        self.weight_decay = wd.expand(self.n).clone()
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.scratch: list[Tensor] | None = None

    @torch.no_grad()
    def step(self, update_mask: Tensor | None = None) -> None:
        """One Adam step for members in update_mask ([n] bool, default all): every member
        updated in place, then the others' parameters and moments put back."""
        mask = self.count_step(update_mask)
        t = self.step_count.clamp_min(1).to(torch.float64)
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1**t)
        bc2_sqrt = (1 - b2**t).sqrt()
        decay = 1 - self.lr * self.weight_decay if bool(self.weight_decay.any()) else None
        frozen = (~mask).nonzero().squeeze(1)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            if p.grad is None:
                continue
            kept = [(s, s[frozen]) for s in (p, m, v)]
            self._update(p, p.grad, m, v, step_size, bc2_sqrt, decay)
            for s, old in kept:
                s.index_copy_(0, frozen, old)

    def _update(self, p, g, m, v, step_size, bc2_sqrt, decay) -> None:
        """Adam's update of p, m and v in place, op by op as torch.optim.Adam's formula reads
        (bit for bit: tests/test_sae_stacked.py), in two reused scratch tensors. decay None:
        no weight decay (p * 1 is p)."""
        b1, b2 = self.betas
        sq, step = (w[: p.numel()].view_as(p) for w in self._scratch(p))
        m.lerp_(g, 1 - b1)
        torch.mul(g, g, out=sq).mul_(1 - b2)
        v.mul_(b2).add_(sq)
        denom = torch.sqrt(v, out=sq).div_(bcast(bc2_sqrt, p)).add_(self.eps)
        if decay is not None:
            p.mul_(bcast(decay, p))
        torch.mul(bcast(step_size, p), m, out=step)
        p.addcdiv_(step, denom, value=-1)

    def _scratch(self, p: Tensor) -> list[Tensor]:
        """Two flat tensors as large as the largest parameter, made once."""
        if self.scratch is None or self.scratch[0].dtype != p.dtype:
            size = max(q.numel() for q in self.params)
            self.scratch = [p.new_empty(size) for _ in range(2)]
        return self.scratch

    def own_state(self) -> dict[str, Tensor]:
        sd = {"weight_decay": self.weight_decay}
        for j, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True)):
            sd[f"exp_avg.{j}"], sd[f"exp_avg_sq.{j}"] = m, v
        return sd


@torch.no_grad()
def member_grad_norms(params: Iterable[nn.Parameter]) -> Tensor:
    """[n] L2 norm of each member's gradient over all stacked parameters.

    The per-parameter sums are added elementwise, one parameter after another: a reduction
    over a stacked [n_params, n] tensor summed in an order that depended on n, so a member's
    clipping differed from the same SAE's alone in the last bit (seen with six parameters)."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = [(g * g).reshape(g.shape[0], -1).sum(1, dtype=torch.float64) for g in grads]
    return sum(sq, torch.zeros_like(sq[0])).sqrt()


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[nn.Parameter], max_norm: float | Tensor, normalize: bool | Tensor = False
) -> Tensor:
    """Scale each member's gradient to norm <= max_norm (per member [n] or scalar), or to
    norm max_norm exactly where `normalize` ([n] bool or scalar).

    Returns the [n] norms before scaling. Non-finite norms leave that member untouched
    (mask its update instead).
    """
    params = [p for p in params if p.grad is not None]
    norms = member_grad_norms(params)
    scale = torch.as_tensor(max_norm, dtype=torch.float64, device=norms.device) / (norms + 1e-6)
    normalize = torch.as_tensor(normalize, device=norms.device)
    scale = torch.where(normalize, scale, scale.clamp(max=1.0))
    scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
    for p in params:
        p.grad.mul_(bcast(scale, p.grad))
    return norms


Decay = Literal["none", "linear", "cosine"]


@dataclass(frozen=True)
class LRSchedule:
    """Per-member lr factor: linear warmup, constant, then decay to 0 at total_steps (decay
    'none': constant to the end).

    Each member may have its own warmup, decay shape and decay start.
    """

    total_steps: int
    warmup_steps: Sequence[int] | int = 0
    """Steps of linear warmup from 0."""
    decay: Sequence[Decay] | Decay = "none"
    """Shape after the constant phase: none (stays constant), linear or cosine decay to 0."""
    decay_start: Sequence[float] | float = 0.8
    """Fraction of total_steps at which the decay begins."""

    def factor(self, step: int, n: int) -> Tensor:
        """[n] lr multipliers at `step`."""
        rows = [self._one(step, *member) for member in self.members(n)]
        return torch.tensor(rows, dtype=torch.float64)

    def members(self, n: int) -> list[tuple[int, Decay, float]]:
        """Each of the n members' (warmup_steps, decay, decay_start)."""
        cols = [_per_member(v, n) for v in (self.warmup_steps, self.decay, self.decay_start)]
        return list(zip(*cols, strict=True))

    def _one(self, step: int, warmup: int, decay: Decay, start: float) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        begin = start * self.total_steps
        if decay == "none" or step < begin:
            return warm
        frac = min(1.0, (step - begin) / max(1.0, self.total_steps - begin))
        tail = 1 - frac if decay == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
        return warm * tail


def _per_member(value, n: int) -> list:
    if isinstance(value, str | int | float):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"expected {n} per-member values, got {len(value)}")
    return list(value)
