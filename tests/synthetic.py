"""Synthetic collections in the real storage format, with known token identities."""

from __future__ import annotations

import torch

from saesweep.format.manifest import HookPart, Part, part_key, write_merged
from saesweep.format.shards import RunningStats, checksum, encode_shard, shard_name
from saesweep.sae.synthetic import sparse_mixture
from saesweep.store import open_store

HOOK = "model.layers.1"


def make_collection(
    uri: str,
    shard_sizes: list[int],
    d: int = 16,
    dtype=torch.float32,
    seed: int = 0,
    sparse: bool = False,
) -> torch.Tensor:
    """Write shards whose acts[:, 0] is each token's global index (sparse=False), or tokens
    that are sparse mixtures of 64 directions (sparse=True, for training); return all acts."""
    store = open_store(uri)
    gen = torch.Generator().manual_seed(seed)
    part, hp, start, everything = Part(0, 1, complete=True), HookPart(), 0, []
    for i, n in enumerate(shard_sizes):
        if sparse:
            acts = sparse_mixture(n, d, seed=seed * 1000 + i)
        else:
            acts = torch.randn(n, d, generator=gen)
            acts[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
        acts = acts.to(dtype)
        ids = torch.arange(start, start + n) % 30000
        data = encode_shard(acts, ids, torch.arange(start, start + n), torch.zeros(n))
        store.put(f"{HOOK}/{shard_name(0, i)}", data)
        hp.shards.append(
            {
                "name": shard_name(0, i),
                "n_tokens": n,
                "n_bytes": len(data),
                "checksum": checksum(data),
            }
        )
        stats = RunningStats.of(acts)
        hp.stats = stats if hp.stats is None else hp.stats.merge(stats)
        everything.append(acts)
        start += n
    part.hooks[HOOK], part.seq_done = hp, start
    store.put_json(part_key(0, 1), part.to_json())
    info = {
        "hook": HOOK,
        "short_name": "resid.1",
        "site": "resid",
        "layer": 1,
        "d_model": d,
        "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype],
        "ctx_len": 64,
        "model": "synthetic",
        "exclude_special": True,
    }
    write_merged(store, [part], {HOOK: info})
    return torch.cat(everything)
