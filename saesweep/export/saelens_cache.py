"""SAELens's activation cache of one hook of a collection: a Hugging Face datasets directory
(save_to_disk's layout: data-XXXXX-of-NNNNN.arrow files, state.json, dataset_info.json) whose
rows are context windows, a column named after the hook of Array2D (context_size, d_in) and
token_ids of int32 (context_size), as SAELens's CacheActivationsRunner writes it and its
ActivationsStore reads it (`cached_activations_path`).

The collection's stored tokens are packed in shard order into windows of context_size, as
SAELens packs its own (a window may span sequences); the last tokens that fill no window are
left out. Each shard is read once, verified, through Collection.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import xxhash
from datasets import Array2D, Dataset, DatasetInfo, Features, Sequence, Value
from datasets.arrow_writer import ArrowWriter
from torch import Tensor
from tqdm import tqdm

from saesweep.configtools import at_least, one_of, positional
from saesweep.errors import UserError
from saesweep.export import export_format
from saesweep.export.output import staged_output
from saesweep.format.collection import Collection, HookShards

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""The activation dtypes SAELens's cache stores (Arrow has no bfloat16)."""
WRITE_ROWS = 64
"""Context windows converted and written at once."""


@dataclass(frozen=True)
class SaelensCacheCommand:
    """SAELens's activation cache (an HF datasets directory: a column HOOK of (context_size,
    d_in) and token_ids) of one hook of a collection."""

    collection: positional(str, "COLLECTION")
    """The collection (a path, file://PATH or s3://BUCKET/PREFIX)."""
    out: str
    """The directory to write (new, or empty): SAELens's `cached_activations_path`."""
    hook: str | None = None
    """The hook to export (module path or short form such as resid.3; default: the only one)."""
    column: str | None = None
    """The activations column's name: SAELens's `hook_name` (default: the hook's module path)."""
    context_size: int | None = field(default=None, metadata=at_least(1, optional=True))
    """Tokens per row: SAELens's `context_size` (default: the collection's ctx_len)."""
    dtype: str = field(default="float32", metadata=one_of(lambda: CACHE_DTYPES))
    """The activations' dtype: float32 (exact for every collection dtype) or float16."""
    shards: str = ":"
    """Python slice over the collection's shards, e.g. ':-1' or '-1:'."""
    anonymous: bool = False
    """S3 URIs: send unsigned requests (a public bucket) even when AWS credentials are
    configured."""
    progress: bool = True
    """Show a progress bar over the collection's shards."""


def cache_features(column: str, context_size: int, d_in: int, dtype: str) -> Features:
    """The cache's columns, as CacheActivationsRunner declares them."""
    return Features(
        {
            column: Array2D(shape=(context_size, d_in), dtype=dtype),
            "token_ids": Sequence(Value(dtype="int32"), length=context_size),
        }
    )


def checked_acts(acts: Tensor, dtype: str) -> Tensor:
    """`acts` in the cache's dtype; values float16 cannot hold are refused."""
    cast = acts.to(CACHE_DTYPES[dtype])
    if not torch.isfinite(cast).all():
        raise UserError(
            f"the activations exceed {dtype}'s range (largest magnitude "
            f"{acts.abs().max().item():.4g}); export with --dtype float32"
        )
    return cast


def write_windows(path: Path, features: Features, acts: Tensor, ids: Tensor) -> None:
    """One Arrow file of the windows of `acts` [n * context_size, d_in] and their `ids`."""
    column, context_size = next(iter(features)), features["token_ids"].length
    writer = ArrowWriter(features=features, path=str(path))
    step = WRITE_ROWS * context_size
    for start in range(0, len(acts), step):
        rows = min(step, len(acts) - start) // context_size
        batch = {
            column: checked_acts(acts[start : start + step], features[column].dtype)
            .view(rows, context_size, -1)
            .numpy(),
            "token_ids": ids[start : start + step].view(rows, context_size).numpy(),
        }
        writer.write_table(Dataset.from_dict(batch, features=features).data.table)
    writer.finalize()
    writer.close()


def write_arrow_files(
    staged: Path, collection: Collection, hook: HookShards, features: Features, bar
) -> tuple[list[str], int]:
    """The chosen shards' tokens in order, packed into windows of context_size, one Arrow file
    per shard that completes a window (the tokens that fill none left out); (the files' names,
    the windows written)."""
    context_size = features["token_ids"].length
    parts, n_rows, carry = [], 0, None
    for shard in range(len(hook.shards)):
        t = collection.read_shard(hook, shard, ("acts", "token_ids"))
        acts, ids = t["acts"], t["token_ids"]
        if carry is not None:
            acts, ids = torch.cat([carry[0], acts]), torch.cat([carry[1], ids])
        whole = len(acts) // context_size * context_size
        if whole:
            parts.append(staged / f"part-{len(parts):05d}.arrow")
            write_windows(parts[-1], features, acts[:whole], ids[:whole])
            n_rows += whole // context_size
        carry = acts[whole:].clone(), ids[whole:].clone()
        bar.update(1)
    names = [f"data-{i:05d}-of-{len(parts):05d}.arrow" for i in range(len(parts))]
    for part, name in zip(parts, names, strict=True):
        os.replace(part, staged / name)
    return names, n_rows


def fingerprint(hook: HookShards, features: Features) -> str:
    """The dataset's fingerprint: a hash of the shards' checksums and the columns."""
    digest = xxhash.xxh64(json.dumps([hook.shards, features.to_dict()], sort_keys=True).encode())
    return digest.hexdigest()


def write_dataset_json(staged: Path, names: list[str], features: Features, hook) -> None:
    """state.json and dataset_info.json, as Dataset.save_to_disk writes them."""
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": fingerprint(hook, features),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (staged / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(DatasetInfo(features=features))
    (staged / "dataset_info.json").write_text(json.dumps(dict(sorted(info.items())), indent=2))


@export_format("saelens-cache", SaelensCacheCommand, "COLLECTION")
def write_saelens_cache(command: SaelensCacheCommand) -> None:
    collection = Collection.open(command.collection, command.anonymous)
    hook = collection.choose(collection.hook(command.hook), command.shards)
    context_size = command.context_size or hook.meta["ctx_len"]
    n_tokens = sum(s["n_tokens"] for s in hook.shards)
    if n_tokens < context_size:
        raise UserError(
            f"{hook.hook} of {command.collection} holds {n_tokens:,} tokens, fewer than one "
            f"row of --context-size {context_size}; give a smaller --context-size"
        )
    column = command.column or hook.hook
    features = cache_features(column, context_size, hook.d_model, command.dtype)
    with staged_output(Path(command.out)) as staged:
        bar = tqdm(total=len(hook.shards), desc="saelens cache", disable=not command.progress)
        with bar:
            names, n_rows = write_arrow_files(staged, collection, hook, features, bar)
        write_dataset_json(staged, names, features, hook)
    left_out = n_tokens - n_rows * context_size
    print(
        f"wrote {command.out}: SAELens's activation cache of {hook.hook} ({n_rows:,} rows of "
        f"{context_size} tokens, column {column!r}; the last {left_out:,} tokens fill no row)"
    )
