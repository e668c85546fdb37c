"""A SAELens activation cache as training data: the directory SAELens's CacheActivationsRunner
writes (Dataset.save_to_disk: data-*.arrow, state.json, dataset_info.json; a column of Array2D
(context_size, d_in) per hook, token_ids), in a local directory or under an S3 prefix, is
converted once into a saesweep collection inside it, CONVERTED, which train.py then reads as
any other collection (the Reader's exactly-once shuffled order, verified shards,
statistics.json). A cache where that collection cannot be written is refused.

Each Arrow file becomes one shard, each row (a context window) one sequence: seq_id row << 20,
positions 0..context_size-1, token ids from token_ids (0 where the cache has none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
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
from saesweep.store import FileStore, Store, open_store

CONVERTED = "saesweep-collection"
"""The converted collection's directory inside the SAELens cache."""


def cache_store(uri: str, anonymous: bool, remote: bool) -> Store | None:
    """The store `uri` names when it holds a SAELens cache (a saved HF dataset) at its root;
    an S3 one only when `remote` (else None: no request is sent)."""
    if not uri or (uri.startswith("s3://") and not remote):
        return None
    store = open_store(uri, anonymous)
    return store if store.exists("state.json") and store.exists("dataset_info.json") else None


def activation_columns(cache: Store) -> dict[str, dict]:
    """{column: its Array2D feature} of the cache: the hooks it stores."""
    features = cache.get_json("dataset_info.json").get("features", {})
    columns = {k: f for k, f in features.items() if f.get("_type") == "Array2D"}
    if not columns:
        raise UserError(
            f"{cache.uri} is a saved HF dataset with no Array2D column of activations "
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


@contextlib.contextmanager
def arrow_file(cache: Store, name: str) -> Iterator[Path]:
    """A local path of the cache's Arrow file `name`: the file itself, or a temporary copy of
    a remote one."""
    local = cache.local_path(name)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="saelens-cache.") as tmp:
        path = Path(tmp) / "data.arrow"
        path.write_bytes(cache.get(name))
        yield path


def write_converted(cache: Store, out: Store) -> None:
    """Write the collection of the SAELens cache `cache` into `out`, one Arrow file (one
    shard per hook) at a time; metadata.json and statistics.json last."""
    from datasets import Dataset  # its import is slow: only for a conversion

    columns = activation_columns(cache)
    files = [f["filename"] for f in cache.get_json("state.json")["_data_files"]]
    runner_cfg = "cache_activations_runner_cfg.json"
    model = cache.get_json(runner_cfg)["model_name"] if cache.exists(runner_cfg) else ""
    infos = {c: hook_info(c, f, model) for c, f in columns.items()}
    part, first = Part(0, 1, complete=True), 0
    for i, name in enumerate(tqdm(files, desc=f"converting {cache.uri}")):
        with arrow_file(cache, name) as path:
            rows = Dataset.from_file(str(path)).with_format("torch")[:]
            ids = rows.get("token_ids")
            for column, info in infos.items():
                acts = rows[column]
                token_ids = torch.zeros(acts.shape[:2], dtype=torch.int32) if ids is None else ids
                hp = part.hooks.setdefault(column, HookPart())
                key = f"{column}/{shard_name(0, i)}"
                put_shard(out, hp, key, info, {"acts": acts, "token_ids": token_ids}, first)
        first += len(acts)
    part.seq_done = first
    out.put_json(part_key(0, 1), part.to_json())
    write_merged(out, [part], infos)


def convert_local(cache: Store, out: Path) -> None:
    """Convert a local cache into `out` inside it (staged, renamed whole); a directory that
    cannot be written is refused."""
    try:
        staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{CONVERTED}.", suffix=".tmp"))
    except OSError as err:
        raise UserError(
            f"{out.parent} is a SAELens activation cache, which train.py converts once into "
            f"{out}, but it is read-only ({err.strerror}); copy the cache to a writable "
            "directory and give that"
        ) from None
    try:
        write_converted(cache, FileStore(staged))
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


def converted(cache: Store) -> bool:
    """Whether the cache holds its whole converted collection: every hook's statistics.json,
    the last object a conversion writes."""
    hooks = activation_columns(cache)
    return all(cache.exists(f"{CONVERTED}/{hook}/statistics.json") for hook in hooks)


def collection_uri(uri: str, anonymous: bool = False, remote: bool = True) -> str:
    """`uri` itself, or for a SAELens cache the collection converted from it (converted on
    first use, with a message; a cache where it cannot be written is refused): a local cache's
    inside it, staged and renamed whole; an S3 cache's under its prefix, written in place
    (metadata and statistics last). Without `remote`, an S3 uri is given back unread."""
    cache = cache_store(uri, anonymous, remote)
    if cache is None:
        return uri
    local = cache.local_path(CONVERTED)
    out = cache.child(CONVERTED) if local is None else str(local)
    if converted(cache):
        return out
    print(f"note: converting the SAELens activation cache {cache.uri} once into {out}")
    if local is not None:
        convert_local(cache, local)
    else:
        target = open_store(out, anonymous)
        target.check_writable()
        write_converted(cache, target)
    return out


def data_uri(data, remote: bool) -> str:
    """A DataConfig's uri, or its SAELens cache's converted collection."""
    return collection_uri(data.uri, data.anonymous, remote)


def with_converted_caches(cfg, remote: bool = True):
    """A train config whose store-sourced train_data and val_data name a SAELens cache's
    converted collection instead of the cache; S3 caches only when `remote` (a dry run sends
    no S3 request)."""
    if cfg.train_data.source != "store":
        return cfg
    return dataclasses.replace(
        cfg,
        train_data=dataclasses.replace(cfg.train_data, uri=data_uri(cfg.train_data, remote)),
        val_data=dataclasses.replace(cfg.val_data, uri=data_uri(cfg.val_data, remote)),
    )
