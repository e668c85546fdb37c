"""Stacked sparse autoencoders: n SAEs of one architecture stepped on the same batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saesweep.sae.base import LossResult, StackedSAE, fvu
from saesweep.sae.batchtopk import BatchTopKSAE
from saesweep.sae.codes import Codes, DenseCodes, SparseCodes
from saesweep.sae.config import PER_MEMBER_FIELDS, ObjectiveConfig, SAEConfig, stack_key
from saesweep.sae.jumprelu import JumpReLUSAE
from saesweep.sae.matryoshka import MatryoshkaSAE
from saesweep.sae.relu import ReLUSAE
from saesweep.sae.switch import SwitchSAE
from saesweep.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[StackedSAE]] = {
    cls.arch: cls for cls in (TopKSAE, BatchTopKSAE, SwitchSAE, ReLUSAE, JumpReLUSAE, MatryoshkaSAE)
}

__all__ = [
    "ARCHITECTURES",
    "PER_MEMBER_FIELDS",
    "Codes",
    "DenseCodes",
    "LossResult",
    "ObjectiveConfig",
    "SAEConfig",
    "SparseCodes",
    "StackedSAE",
    "fvu",
    "make_sae",
    "stack_key",
]


def make_sae(
    cfg: SAEConfig | Sequence[SAEConfig],
    d_in: int,
    seeds: Sequence[int],
    objective: ObjectiveConfig | Sequence[ObjectiveConfig] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    d_out: int | None = None,
) -> StackedSAE:
    """A stack of len(seeds) SAEs, or transcoders predicting a target of width d_out. cfg /
    objective: one for all members or one per member; members must agree on stack_key(cfg)
    (architecture and shape)."""
    n = len(seeds)
    cfgs = [cfg] * n if isinstance(cfg, SAEConfig) else list(cfg)
    objective = objective if objective is not None else ObjectiveConfig()
    objectives = [objective] * n if isinstance(objective, ObjectiveConfig) else list(objective)
    cls = ARCHITECTURES[cfgs[0].arch]
    return cls(cfgs, d_in, list(seeds), objectives, d_out).to(device=device, dtype=dtype)
