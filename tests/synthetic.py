"""Synthetic activations with known sparse structure, and synthetic collections in the real
storage format with known token identities."""

from __future__ import annotations

import torch
from torch import Tensor

from saesweep import Reader
from saesweep.format.manifest import HookPart, Part, part_key, write_merged
from saesweep.format.quant import is_scaled, quantize
from saesweep.format.shards import RunningStats, checksum, encode_shard, shard_name
from saesweep.store import open_store

HOOK = "model.layers.1"
TARGET = "model.layers.2"
"""The second hook of make_collection(target_d=...), short name resid.2."""


def make_collection(
    uri: str,
    shard_sizes: list[int],
    d: int = 16,
    dtype=torch.float32,
    seed: int = 0,
    sparse: bool = False,
    target_d: int | None = None,
    target_sizes: list[int] | None = None,
) -> torch.Tensor:
    """Write shards whose acts[:, 0] is each token's global index (sparse=False), or tokens
    that are sparse mixtures of 64 directions (sparse=True, for training); return all acts.

    With target_d, a second hook TARGET of that width stores the same tokens (or the tokens
    of target_sizes, to test refusals): acts[:, 0] the global index again, or with sparse=True
    the planted sparse map of HOOK's tokens (sparse_map).

    A scaled 8-bit dtype (float8_e4m3fn) stores each token quantized as collect.py does, with
    its statistics from the acts before quantization; acts[:, 0] then holds the global index
    only approximately, but token_ids hold it exactly (read_index)."""
    store = open_store(uri)
    gen = torch.Generator().manual_seed(seed)
    target_gen = torch.Generator().manual_seed(seed + 1)
    hooks = {HOOK: (d, shard_sizes)}
    if target_d is not None:
        hooks[TARGET] = (target_d, target_sizes or shard_sizes)
    part, everything = Part(0, 1, complete=True), []
    for hook, (width, sizes) in hooks.items():
        hp, start = HookPart(), 0
        for i, n in enumerate(sizes):
            if sparse and hook == HOOK:
                acts = sparse_mixture(n, width, seed=seed * 1000 + i)
            elif sparse:
                acts = sparse_map(n, d, width, seed=seed * 1000 + i)[1]
            else:
                acts = torch.randn(n, width, generator=gen if hook == HOOK else target_gen)
                acts[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
            ids = torch.arange(start, start + n) % 30000
            if is_scaled(dtype):
                values, scales = quantize(acts, dtype)
                data = encode_shard(
                    values, ids, torch.arange(start, start + n), torch.zeros(n), scales
                )
            else:
                acts = acts.to(dtype)
                data = encode_shard(acts, ids, torch.arange(start, start + n), torch.zeros(n))
            store.put(f"{hook}/{shard_name(0, i)}", data)
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
            if hook == HOOK:
                everything.append(acts)
            start += n
        part.hooks[hook] = hp
    part.seq_done = sum(shard_sizes)
    store.put_json(part_key(0, 1), part.to_json())
    info = {
        "site": "resid",
        "dtype": str(dtype).removeprefix("torch."),
        "ctx_len": 64,
        "model": "synthetic",
        "exclude_special": True,
    }
    write_merged(
        store,
        [part],
        {
            hook: info
            | {"hook": hook, "short_name": f"resid.{layer}", "layer": layer, "d_model": w}
            for (hook, (w, _)), layer in zip(hooks.items(), (1, 2), strict=False)
        },
    )
    return torch.cat(everything)


def read_index(uri: str, **kw) -> list[int]:
    """The global index of every token a Reader over make_collection's collection serves, in
    order, from its token ids (exact whatever the stored dtype)."""
    return [int(i) for _, ids in Reader(uri, with_token_ids=True, **kw) for i in ids.tolist()]


def sparse_mixture(
    n_tokens: int,
    d_in: int,
    n_dirs: int = 64,
    active: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """[n_tokens, d_in]: each token a positive combination of `active` of n_dirs random unit
    directions (fixed by seed 0), scaled so that E|x|^2 is about d_in."""
    which, coeffs = _codes(n_tokens, n_dirs, active, seed)
    return _combine(which, coeffs, _directions(n_dirs, d_in, 0)).to(dtype)


def sparse_map(
    n_tokens: int,
    d_in: int,
    d_out: int,
    n_dirs: int = 64,
    active: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(x [n_tokens, d_in], y [n_tokens, d_out]): x is sparse_mixture(...); y combines the
    same `active` directions of each token with the same coefficients, but over other unit
    directions (fixed by seed 1) in d_out dimensions, scaled alike. y is a planted sparse
    linear map of x: a transcoder with k >= active latents can predict it exactly."""
    which, coeffs = _codes(n_tokens, n_dirs, active, seed)
    x = _combine(which, coeffs, _directions(n_dirs, d_in, 0))
    y = _combine(which, coeffs, _directions(n_dirs, d_out, 1))
    return x.to(dtype), y.to(dtype)


def _directions(n_dirs: int, d: int, seed: int) -> Tensor:
    dirs = torch.randn(n_dirs, d, generator=torch.Generator().manual_seed(seed))
    return dirs / dirs.norm(dim=1, keepdim=True)


def _codes(n_tokens: int, n_dirs: int, active: int, seed: int) -> tuple[Tensor, Tensor]:
    """(which directions [n_tokens, active], their coefficients in [0.5, 1.5))."""
    gen = torch.Generator().manual_seed(seed)
    which = torch.rand(n_tokens, n_dirs, generator=gen).argsort(dim=1)[:, :active]
    return which, torch.rand(n_tokens, active, generator=gen) + 0.5


def _combine(which: Tensor, coeffs: Tensor, dirs: Tensor) -> Tensor:
    x = torch.einsum("tk,tkd->td", coeffs, dirs[which])
    return x * (dirs.shape[1] / x.pow(2).sum(1).mean()).sqrt()
