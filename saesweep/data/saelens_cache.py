"""A SAELens activation cache as training data: the directory SAELens's CacheActivationsRunner
writes (Dataset.save_to_disk: data-*.arrow, state.json, dataset_info.json; a column of Array2D
(context_size, d_in) per hook, token_ids) is converted once into a saesweep collection inside
it, CONVERTED, which train.py then reads as any other collection (the Reader's exactly-once
shuffled order, verified shards, statistics.json).

Each Arrow file becomes one shard, each row (a context window) one sequence: seq_id row << 20,
positions 0..context_size-1, token ids from token_ids (0 where the cache has none).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from saesweep.errors import UserError
from saesweep.format.manifest import HookPart, Part, part_key, write_merged
from saesweep.format.shards import (
    ACT_DTYPES,
    SEQ_CHUNK_BITS,
    RunningStats,
    checksum,
    encode_shard,
    shard_name,
)
from saesweep.store import Store, open_store

CONVERTED = "saesweep-collection"
"""The converted collection's directory inside the SAELens cache."""


def cache_dir(uri: str) -> Path | None:
    """The local directory `uri` names when it holds a SAELens cache (a saved HF dataset)."""
    path = uri.removeprefix("file://")
    if not path or "://" in path:
        return None
    found = Path(path)
    return (
        found
        if (found / "state.json").is_file() and (found / "dataset_info.json").is_file()
        else None
    )


def activation_columns(cache: Path) -> dict[str, dict]:
    """{column: its Array2D feature} of the cache: the hooks it stores."""
    features = json.loads((cache / "dataset_info.json").read_text()).get("features", {})
    columns = {k: f for k, f in features.items() if f.get("_type") == "Array2D"}
    if not columns:
        raise UserError(
            f"{cache} is a saved HF dataset with no Array2D column of activations "
            "(SAELens's cache layout); give a SAELens activation cache or a collection"
        )
    return columns


def hook_info(column: str, feature: dict, model: str) -> dict:
    """metadata.json fields of one converted hook."""
    ctx_len, d_model = feature["shape"]
    dtype = feature["dtype"] if feature["dtype"] in ACT_DTYPES else "float32"
    return {
        "hook": column,
        "short_name": column,
        "layer": None,
        "site": "",
        "dtype": dtype,
        "ctx_len": ctx_len,
        "d_model": d_model,
        "model": model,
        "exclude_special": False,
    }


def put_shard(store: Store, hp: HookPart, key: str, info: dict, rows: dict, first: int) -> None:
    """One Arrow file's rows of one hook as a shard, its record and statistics added to hp."""
    n, ctx = rows["acts"].shape[:2]
    acts = rows["acts"].reshape(n * ctx, -1).to(ACT_DTYPES[info["dtype"]])
    seq_ids = (torch.arange(first, first + n) << SEQ_CHUNK_BITS).repeat_interleave(ctx)
    positions = torch.arange(ctx).repeat(n)
    data = encode_shard(acts, rows["token_ids"].reshape(-1), seq_ids, positions)
    store.put(key, data)
    hp.shards.append(
        {"name": key.split("/")[-1], "n_tokens": len(acts), "n_bytes": len(data)}
        | {"checksum": checksum(data)}
    )
    stats = RunningStats.of(acts)
    hp.stats = stats if hp.stats is None else hp.stats.merge(stats)


def convert(cache: Path, out: Path) -> None:
    """Write the collection of the SAELens cache `cache` at `out` (staged, renamed whole)."""
    from datasets import Dataset  # its import is slow: only for a conversion

    columns = activation_columns(cache)
    files = [f["filename"] for f in json.loads((cache / "state.json").read_text())["_data_files"]]
    runner_cfg = cache / "cache_activations_runner_cfg.json"
    model = json.loads(runner_cfg.read_text())["model_name"] if runner_cfg.is_file() else ""
    infos = {c: hook_info(c, f, model) for c, f in columns.items()}
    staged = Path(tempfile.mkdtemp(dir=cache, prefix=f".{CONVERTED}.", suffix=".tmp"))
    try:
        store, part, first = open_store(str(staged)), Part(0, 1, complete=True), 0
        for i, name in enumerate(tqdm(files, desc=f"converting {cache.name}")):
            rows = Dataset.from_file(str(cache / name)).with_format("torch")[:]
            ids = rows.get("token_ids")
            for column, info in infos.items():
                acts = rows[column]
                token_ids = torch.zeros(acts.shape[:2], dtype=torch.int32) if ids is None else ids
                hp = part.hooks.setdefault(column, HookPart())
                key = f"{column}/{shard_name(0, i)}"
                put_shard(store, hp, key, info, {"acts": acts, "token_ids": token_ids}, first)
            first += len(acts)
        part.seq_done = first
        store.put_json(part_key(0, 1), part.to_json())
        write_merged(store, [part], infos)
        renamed_whole(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def renamed_whole(staged: Path, out: Path) -> None:
    """`staged` renamed to `out`, unless another process has just converted the same cache."""
    try:
        os.replace(staged, out)
    except OSError:
        if not any(out.glob("*/metadata.json")):
            raise


def collection_uri(uri: str) -> str:
    """`uri` itself, or for a SAELens cache the collection converted from it (converted on
    first use, with a message; a read-only cache is refused)."""
    cache = cache_dir(uri)
    if cache is None:
        return uri
    out = cache / CONVERTED
    if any(out.glob("*/metadata.json")):
        return str(out)
    if not os.access(cache, os.W_OK):
        raise UserError(
            f"{cache} is a SAELens activation cache, which train.py converts once into "
            f"{out}, but it is read-only; copy the cache to a writable directory and give that"
        )
    print(f"note: converting the SAELens activation cache {cache} once into {out}")
    convert(cache, out)
    return str(out)


def with_converted_caches(cfg):
    """A train config whose store-sourced train_data and val_data name a SAELens cache's
    converted collection instead of the cache."""
    if cfg.train_data.source != "store":
        return cfg
    return dataclasses.replace(
        cfg,
        train_data=dataclasses.replace(cfg.train_data, uri=collection_uri(cfg.train_data.uri)),
        val_data=dataclasses.replace(cfg.val_data, uri=collection_uri(cfg.val_data.uri)),
    )
