"""Stacked sparse autoencoders: n SAEs of one architecture stepped on the same batch.

Importing the package registers the built-in architectures (registry.ARCHITECTURES)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saesweep.sae.base import LossResult, StackedSAE, fvu
from saesweep.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saesweep.sae.clt import CLTConfig, CrossLayerTranscoder
from saesweep.sae.codes import Codes, DenseCodes, SparseCodes
from saesweep.sae.config import PER_MEMBER_FIELDS, ObjectiveConfig, SAEConfig, stack_key
from saesweep.sae.crosscoder import Crosscoder, CrosscoderConfig
from saesweep.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saesweep.sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from saesweep.sae.registry import ARCHITECTURES, architecture, register
from saesweep.sae.relu import ReLUConfig, ReLUSAE
from saesweep.sae.switch import SwitchConfig, SwitchSAE
from saesweep.sae.topk import TopKSAE

__all__ = [
    "ARCHITECTURES",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "CLTConfig",
    "CrossLayerTranscoder",
    "Crosscoder",
    "CrosscoderConfig",
    "PER_MEMBER_FIELDS",
    "Codes",
    "DenseCodes",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "LossResult",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ObjectiveConfig",
    "ReLUConfig",
    "ReLUSAE",
    "SAEConfig",
    "SparseCodes",
    "StackedSAE",
    "SwitchConfig",
    "SwitchSAE",
    "TopKSAE",
    "architecture",
    "fvu",
    "make_sae",
    "register",
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
    cls = architecture(cfgs[0].arch)
    return cls(cfgs, d_in, list(seeds), objectives, d_out).to(device=device, dtype=dtype)
