"""The input scale of every hook a group reads: estimated once, applied to each batch, recorded
with the trainer's state and folded into the exported weights.

normalize 'norm' scales a hook's activations by sqrt(width) / E||x|| (so E||x|| = sqrt(width)
in training), with E||x|| from the collection's exact statistics.json or, training from the
model, a sample of its first tokens; 'none' scales by 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from saesweep.data.hooksets import parts
from saesweep.format.collection import Collection, HookShards

SAMPLE_TOKENS = 1 << 15
"""Training from the model, the input scale is estimated from the first SAMPLE_TOKENS tokens
of the training text."""


@dataclass(frozen=True)
class Normalizer:
    """Each hook's input scale, by module path."""

    scales: dict[str, float]

    @classmethod
    def from_statistics(cls, collection: Collection, hooks: Iterable[HookShards]) -> Normalizer:
        """From each hook's statistics.json (a UserError where it has none)."""
        return cls(
            {h.hook: _scale(h.d_model, collection.statistics(h.hook)["mean_norm"]) for h in hooks}
        )

    @classmethod
    def from_sample(cls, sample: dict[str, torch.Tensor]) -> Normalizer:
        """From a sample of each hook's activations ([tokens, width])."""
        return cls(
            {h: _scale(x.shape[1], float(x.float().norm(dim=1).mean())) for h, x in sample.items()}
        )

    @classmethod
    def unit(cls, hooks: Iterable[str]) -> Normalizer:
        """Scale 1 for every hook (normalize 'none')."""
        return cls(dict.fromkeys(hooks, 1.0))

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch ({hook: acts}) scaled, as new tensors."""
        return {hook: acts * self.scales[hook] for hook, acts in batch.items()}

    def scale_(self, hook: str, acts: torch.Tensor) -> torch.Tensor:
        """`acts` of `hook` scaled in place."""
        return acts.mul_(self.scales[hook])

    def folded(self, hook: str, target: str) -> tuple[float | list[float], float | list[float]]:
        """(input scale, target scale) of an SAE reading `hook` and reconstructing (an SAE:
        the same hook) or predicting `target`: what export folds into its weights. A key of
        several hooks (data/hooksets.py) gives each hook's scale, in its order."""
        return self.scale_of(hook), self.scale_of(target)

    def scale_of(self, key: str) -> float | list[float]:
        """A hook's scale, or the scales of a key's hooks (data/hooksets.py)."""
        names = parts(key)
        return self.scales[key] if len(names) == 1 else [self.scales[h] for h in names]

    def state_dict(self) -> dict[str, float]:
        return dict(self.scales)


def _scale(width: int, mean_norm: float) -> float:
    return math.sqrt(width) / mean_norm
