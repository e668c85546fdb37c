"""delphi's latent cache (EleutherAI's delphi, read by its LatentDataset): per run,
latents/HOOKPOINT/START_END.safetensors with locations [N, 3] (sequence, position,
latent - START), activations [N] float16 and tokens [n_seq, ctx_len], beside config.json
(the CacheConfig fields and model_name), as delphi's LatentCache.save_splits and save_config
write them.

Every run of a sweep is cached from one pass over the collection: each shard of a hook is read
once (verified, through Collection) for all the runs on that hook. Sequences are numbered in
the order the shards hold them; positions the collection did not store (special tokens it
excluded, the end of a short sequence) hold the tokenizer's pad token.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from saesweep.collect.model import model_path
from saesweep.configtools import at_least, positional
from saesweep.evaluate.features import collection_tokenizer
from saesweep.export import export_format
from saesweep.export.latent_parts import LatentParts, split_bounds
from saesweep.export.output import staged_output
from saesweep.export.runs import LoadedRun, runs_by_hook
from saesweep.export.sparsify import hookpoint
from saesweep.format.collection import Collection, HookShards
from saesweep.format.rundir import write_json
from saesweep.sae.export import exported_acts

CHUNK = 4096
"""Tokens encoded at once."""


@dataclass(frozen=True)
class DelphiCommand:
    """delphi's latent cache (OUT/RUN/latents/HOOKPOINT/START_END.safetensors, config.json) of
    every run, from one pass over the collection."""

    runs: positional(tuple[str, ...], "RUN_OR_SWEEP_DIR")
    """Finished run directories, or sweep directories (each stands for all its runs)."""
    collection: str
    """The collection to cache the latents on (a path, file://PATH or s3://BUCKET/PREFIX),
    holding each run's hook."""
    out: str
    """The directory to write (new, or empty): one delphi run directory per run."""
    n_splits: int = field(default=5, metadata=at_least(1))
    """Files per run, each a range of latents (delphi's n_splits); writing one holds it
    whole in memory."""
    memory_mb: float = field(default=1024.0, metadata=at_least(0))
    """Latent activations held in memory, all runs together, before they are written to part
    files (merged into the splits at the end)."""
    shards: str = ":"
    """Python slice over the collection's shards, e.g. ':-1' or '-1:'."""
    model: str | None = None
    """Tokenizer whose pad token fills unstored positions (default: the collection's model)."""
    anonymous: bool = False
    """S3 URIs: send unsigned requests (a public bucket) even when AWS credentials are
    configured."""
    progress: bool = True
    """Show a progress bar over the collection's shards."""


@dataclass
class Member:
    """One run in the cache: its SAE, its module directory's name and its latents."""

    name: str
    cfg: dict
    weights: dict[str, Tensor]
    module: str
    parts: LatentParts


def token_grid(
    local: Tensor, positions: Tensor, token_ids: Tensor, shape: tuple[int, int], pad: int
) -> Tensor:
    """[n_seq, ctx_len] token ids of a shard's sequences, pad where nothing is stored."""
    grid = torch.full(shape, pad, dtype=torch.int32)
    grid[local, positions] = token_ids.to(torch.int32)
    return grid


def encode_rows(members: list[Member], acts: Tensor, seqs: Tensor, positions: Tensor) -> None:
    """Every member's latents on the activations `acts` of tokens (seqs, positions)."""
    for m in members:
        for c in range(0, len(acts), CHUNK):
            x = acts[c : c + CHUNK].to(m.weights["W_enc"].dtype)
            codes = exported_acts(m.cfg, m.weights, x)
            m.parts.add(seqs[c : c + CHUNK], positions[c : c + CHUNK], codes)


@torch.no_grad()
def cache_hook(
    collection: Collection, hook: HookShards, members: list[Member], budget: int, bar, pad: int
) -> Tensor:
    """Every member's latents on the hook's shards, each shard read once; the tokens."""
    names, grids, n_seq = ("acts", "token_ids", "seq_ids", "positions"), [], 0
    for shard in range(len(hook.shards)):
        t = collection.read_shard(hook, shard, names)
        seq_ids, local = torch.unique(t["seq_ids"], return_inverse=True)
        positions = t["positions"].long()
        shape = (len(seq_ids), hook.meta["ctx_len"])
        grids.append(token_grid(local, positions, t["token_ids"], shape, pad))
        encode_rows(members, t["acts"], local + n_seq, positions)
        n_seq += len(seq_ids)
        if sum(m.parts.nbytes for m in members) > budget:
            for m in members:
                m.parts.spill()
        bar.update(1)
    return torch.cat(grids)


def cache_config(command: DelphiCommand, hook: HookShards, model: str | None) -> dict:
    """config.json of a module directory: delphi's CacheConfig fields and model_name."""
    ctx_len = hook.meta["ctx_len"]
    return {
        "dataset_repo": command.collection,
        "dataset_split": command.shards,
        "dataset_name": "",
        "dataset_column": "",
        "batch_size": 1,
        "cache_ctx_len": ctx_len,
        "ctx_len": ctx_len,
        "n_tokens": sum(s["n_tokens"] for s in hook.shards),
        "n_splits": command.n_splits,
        "model_name": model,
    }


def member(r: LoadedRun, n_splits: int, staged: Path) -> Member:
    parts = LatentParts(split_bounds(r.cfg["d_sae"], n_splits), staged / ".parts" / r.name)
    return Member(r.name, r.cfg, r.weights, hookpoint(r.cfg, r.run), parts)


@export_format("delphi", DelphiCommand)
def write_delphi(command: DelphiCommand) -> None:
    collection = Collection.open(command.collection, command.anonymous)
    tokenizer = collection_tokenizer(collection.config, command.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = model_path(command.model or collection.config.get("model"))
    budget = int(command.memory_mb * 2**20)
    with staged_output(Path(command.out)) as staged:
        grouped = runs_by_hook(
            command.runs, collection, command.shards, lambda r: member(r, command.n_splits, staged)
        )
        n_shards = sum(len(hook.shards) for hook, _ in grouped.values())
        with tqdm(total=n_shards, desc="delphi cache", disable=not command.progress) as bar:
            for hook, members in grouped.values():
                tokens = cache_hook(collection, hook, members, budget, bar, pad or 0).numpy()
                for m in members:
                    module_dir = staged / m.name / "latents" / m.module
                    m.parts.write(module_dir, tokens)
                    write_json(module_dir / "config.json", cache_config(command, hook, model))
        shutil.rmtree(staged / ".parts", ignore_errors=True)
    n_runs = sum(len(members) for _, members in grouped.values())
    print(f"wrote {command.out}: delphi's latent cache of {n_runs} runs")
