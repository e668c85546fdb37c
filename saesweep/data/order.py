"""The order in which a Reader yields tokens: a pure function of (seed, epoch)."""

from __future__ import annotations

import torch


def generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7 + stream)


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices in reading order for one epoch."""
    if not shuffle:
        return list(range(n_shards))
    return torch.randperm(n_shards, generator=generator(seed, epoch, 0)).tolist()


def windows(order: list[int], shards_per_window: int) -> list[list[int]]:
    """Consecutive groups of shards whose tokens are shuffled together."""
    return [order[i : i + shards_per_window] for i in range(0, len(order), shards_per_window)]


def token_permutation(
    n_tokens: int, seed: int, epoch: int, window: int, shuffle: bool
) -> torch.Tensor | None:
    """The order of a window's tokens (None: stored order)."""
    if not shuffle:
        return None
    return torch.randperm(n_tokens, generator=generator(seed, epoch, 1 + window))
