"""Switch SAE (Mudide 2024): a router sends each token to one of E TopK experts of width
d_sae / E; the expert's output is scaled by the router probability; a load-balancing loss
E * sum_e f_e * P_e keeps experts in use.

Latents are laid out expert-major: expert e owns latents [e*m, (e+1)*m), m = d_sae / E, so
W_enc / W_dec keep the plain SAELens layout. Dispatch is vectorized with index ops and one
batched matmul over (member, expert) pairs with a fixed per-expert capacity: no Python loop
over experts and no host synchronization. That matmul runs without autograd; the encoder
gradient flows through the k selected latents per token only (sparse.with_encoder_grad).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from saesweep.configtools import above, alias, at_least
from saesweep.sae.base import check
from saesweep.sae.codes import SparseCodes
from saesweep.sae.matmul import member_bmm
from saesweep.sae.registry import register
from saesweep.sae.sparse import with_encoder_grad
from saesweep.sae.topk import TopKSAE, keep_topk

if TYPE_CHECKING:
    from saesweep.sae.config import SAEConfig


@dataclass(frozen=True)
class SwitchConfig:
    """Switch's options: `sae.switch.*`."""

    n_experts: int = field(default=8, metadata=at_least(1) | alias("n_experts"))
    """Number of experts; each expert is a TopK SAE of width d_sae / n_experts."""
    capacity_factor: float = field(default=2.0, metadata=above(0) | alias("switch_capacity_factor"))
    """Each expert takes at most ceil(factor * batch / n_experts) tokens per batch; tokens
    past an expert's capacity get no latents. n_experts or more means no token is dropped."""


@dataclass(frozen=True, kw_only=True)
class RoutedCodes(SparseCodes):
    """Switch codes with the routing that produced them."""

    probs: Tensor
    """Router probabilities [n, B, E]."""
    expert: Tensor
    """Chosen expert [n, B]."""
    dropped: Tensor
    """[n] fraction of tokens dropped past their expert's capacity."""


@register
class SwitchSAE(TopKSAE):
    """Top-1 routed mixture of TopK experts. The load-balance coefficient is
    ObjectiveConfig.load_balance_coeff, per member."""

    arch = "switch"
    sae_lens_architecture = "switch"
    fvu_objective = False  # no AuxK; the load-balance coefficient weighs against the MSE

    @classmethod
    def check_shape(cls, cfg: SAEConfig, d_in: int) -> None:
        d_sae, E = cfg.width(d_in), cfg.switch.n_experts
        check(E > 0 and d_sae % E == 0, f"d_sae={d_sae} must be a multiple of n_experts={E}")
        width = d_sae // E
        check(0 < cfg.k <= width, f"k={cfg.k} must lie in [1, d_sae / n_experts = {width}]")

    def _set_shape(self) -> None:
        self.n_experts, self.k = self.cfg.switch.n_experts, self.cfg.k
        self.expert_width = self.d_sae // self.n_experts

    def register_member_buffers(self) -> None:
        """Also the load-balance coefficient [n]."""
        super().register_member_buffers()
        self.member_buffer("load_balance_coeff", [o.load_balance_coeff for o in self.objectives])

    def init_member(self, gen: torch.Generator, cfg: SAEConfig) -> dict[str, Tensor]:
        member = super().init_member(gen, cfg)
        W_router = torch.randn(self.d_in, self.n_experts, generator=gen) / math.sqrt(self.d_in)
        return member | {"W_router": W_router, "b_router": torch.zeros(self.n_experts)}

    def capacity(self, batch: int) -> int:
        """Tokens per expert per batch (the whole batch at inference: nothing dropped)."""
        if not self.training:
            return batch
        return min(batch, math.ceil(self.cfg.switch.capacity_factor * batch / self.n_experts))

    def route(self, x_in: Tensor) -> tuple[Tensor, Tensor]:
        """(router probabilities [n, B, E], chosen expert [n, B])."""
        logits = member_bmm(x_in, self.W_router, self.b_router.unsqueeze(1))
        probs = logits.softmax(dim=-1)
        return probs, probs.argmax(dim=-1)

    def encode(self, x: Tensor) -> RoutedCodes:
        x_in = self.encoder_input(x)
        probs, expert = self.route(x_in)
        pre, kept = self.expert_pre(x_in, expert, self.capacity(x_in.shape[1]))
        values, local = pre.topk(self.k, dim=-1, sorted=False)
        p = probs.gather(-1, expert.unsqueeze(-1))
        indices = local + (expert * self.expert_width).unsqueeze(-1)
        values = with_encoder_grad(values, indices, x_in, self.W_enc, self.b_enc)
        dropped = 1 - kept.to(pre.dtype).mean(-1)
        return RoutedCodes(
            values=values * p,
            indices=indices,
            d_sae=self.d_sae,
            probs=probs,
            expert=expert,
            dropped=dropped,
        )

    @torch.no_grad()
    def expert_pre(self, x_in: Tensor, expert: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
        """relu pre-activations [n, B, m] of each token's own expert (without autograd), and
        kept [n, B] bool.

        Tokens are placed into per-expert slots [n, E, C] in batch order; a token past its
        expert's capacity C is dropped (zero pre-activations).
        """
        n, B, d_in = x_in.shape
        E, m, C = self.n_experts, self.expert_width, capacity
        one_hot = F.one_hot(expert, E)
        pos = (one_hot.cumsum(dim=1) * one_hot).sum(-1) - 1
        kept = pos < C
        slot = torch.where(kept, expert * C + pos, E * C)
        token_of_slot = torch.full((n, E * C + 1), B, device=x_in.device)
        token_of_slot.scatter_(1, slot, torch.arange(B, device=x_in.device).expand(n, B))
        token_of_slot[:, E * C] = B
        x_pad = torch.cat([x_in, x_in.new_zeros(n, 1, d_in)], dim=1)
        x_slots = x_pad.gather(1, token_of_slot[:, : E * C, None].expand(-1, -1, d_in))
        W = self.W_enc.view(n, d_in, E, m).permute(0, 2, 1, 3).reshape(n * E, d_in, m)
        pre = torch.bmm(x_slots.view(n * E, C, d_in), W).view(n, E, C, m)
        pre = (pre + self.b_enc.view(n, E, 1, m)).relu().reshape(n, E * C, m)
        pre = torch.cat([pre, pre.new_zeros(n, 1, m)], dim=1)
        return pre.gather(1, slot.unsqueeze(-1).expand(-1, -1, m)), kept

    def load_balance(self, probs: Tensor, expert: Tensor) -> Tensor:
        """[n] E * sum_e f_e * P_e: f_e token fraction routed to e, P_e mean router prob."""
        f = F.one_hot(expert, self.n_experts).to(probs.dtype).mean(dim=1)
        return self.n_experts * (f * probs.mean(dim=1)).sum(-1)

    def penalties(
        self,
        x: Tensor,
        target: Tensor,
        recon: Tensor,
        codes: RoutedCodes,
        step: int,
        variance: Tensor,
    ) -> dict:
        lb = self.load_balance(codes.probs, codes.expert)
        return {"load_balance": (self.load_balance_coeff, lb)}

    def code_metrics(self, codes: RoutedCodes) -> dict[str, Tensor]:
        return {"switch_dropped": codes.dropped}

    def _export_extra(self, i: int, s: float) -> dict[str, Tensor]:
        return {"W_router": self.W_router[i] * s, "b_router": self.b_router[i]}

    def _sae_lens_extra(self) -> dict:
        return {"k": self.k, "n_experts": self.n_experts}

    @staticmethod
    def exported_acts(cfg: dict, sd: dict[str, Tensor], x_in: Tensor, pre: Tensor) -> Tensor:
        """Top-1 expert per token, top-k inside it, scaled by the router probability."""
        E = cfg["n_experts"]
        probs = (x_in @ sd["W_router"] + sd["b_router"]).softmax(-1)
        p, expert = probs.max(-1)
        blocks = pre.view(pre.shape[0], E, -1)
        own = (torch.arange(E, device=pre.device) == expert.unsqueeze(1)).unsqueeze(-1)
        acts = keep_topk(blocks.where(own, 0).flatten(1), cfg["k"])
        return acts * p.unsqueeze(1)
