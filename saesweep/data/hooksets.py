"""Several hooks read side by side under one key: a layered dictionary's (a CLT's) input
hooks, or its target hooks, joined by '+' (no module path holds one). The trainer, the
normalizer and evaluation take such a key where they take a hook: its activations are the
parts' [B, d] tensors concatenated along the feature dimension, in the key's order."""

from __future__ import annotations

from collections.abc import Iterable

import torch

SEPARATOR = "+"


def joined(paths: Iterable[str]) -> str:
    """The key of `paths` read side by side."""
    return SEPARATOR.join(paths)


def parts(key: str) -> list[str]:
    """The hooks a key names (one for a plain hook)."""
    return key.split(SEPARATOR)


def gather(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """[B, sum of widths] the activations of `key`'s hooks in `batch`, side by side."""
    names = parts(key)
    if len(names) == 1:
        return batch[key]
    return torch.cat([batch[name] for name in names], dim=-1)
