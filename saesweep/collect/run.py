"""The collection loop: forward passes, shard cutting, resume, multi-machine finalization."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time

import torch
from tqdm import tqdm

from saesweep.collect.config import CollectConfig, data_fields, stored_data_fields
from saesweep.collect.model import HookedModel, load_model, resolve_hook
from saesweep.collect.sequences import batched, make_batch, sequences
from saesweep.collect.text import check_dataset, iter_documents
from saesweep.collect.writer import PendingShard, ShardWriter, WrittenShard
from saesweep.errors import UserError
from saesweep.format.manifest import (
    HookPart,
    Part,
    load_part,
    load_parts,
    merged_shards,
    part_key,
    write_merged,
)
from saesweep.format.shards import ACT_DTYPES, schema_version
from saesweep.locks import held_lock
from saesweep.memory import resolve_device
from saesweep.store import Store, open_store


def collect(cfg: CollectConfig) -> Part:
    """Collect this machine's share into cfg.out, resuming from what is already committed."""
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    check_dataset(cfg.dataset)
    store, stored = open_collection(cfg)
    with machine_lock(store, cfg.machine, cfg.n_machines):
        return _collect_locked(cfg, store, stored)


def open_collection(cfg: CollectConfig) -> tuple[Store, dict | None]:
    """cfg.out opened for writing and its cfg.json (None when new); a location that holds a
    different collection or other files is refused."""
    store = open_store(cfg.out)
    store.check_writable()
    stored = store.get_json("cfg.json") if store.exists("cfg.json") else None
    check_root_config(store, cfg, stored)
    return store, stored


@contextlib.contextmanager
def machine_lock(store: Store, machine: int, n_machines: int):
    """Hold this machine index for one process (local stores: an flock next to its part file;
    S3 has no lock to take, so there running one index twice is not detected)."""
    lock = store.lock_path(part_key(machine, n_machines))
    if lock is None:
        yield
        return
    busy = (
        f"another process is collecting machine {machine} of {n_machines} into "
        f"{store.uri}; wait for it to finish or stop it"
    )
    with held_lock(lock, busy):
        yield


def _collect_locked(cfg: CollectConfig, store: Store, stored: dict | None) -> Part:
    model, tokenizer = load_model(
        cfg.model,
        cfg.revision,
        cfg.model_dtype,
        cfg.device,
        trust_remote_code=cfg.trust_remote_code,
    )
    part, hook_info = start_part(cfg, store, model, stored)
    if not part.complete:
        _collect_part(cfg, store, part, HookedModel(model, list(hook_info)), tokenizer, hook_info)
    merge_parts(store, cfg.n_machines, hook_info)
    return part


def start_part(
    cfg: CollectConfig, store: Store, model, stored: dict | None
) -> tuple[Part, dict[str, dict]]:
    """This machine's committed part and every hook's metadata (module path -> fields),
    once `model` is known to be the stored one; (re)writes cfg.json."""
    part = load_part(store, cfg.machine, cfg.n_machines)
    check_model_revision(store, cfg, model, stored)
    hooks = [resolve_hook(model, spec) for spec in cfg.hooks]
    hook_info = {
        path: _hook_info(cfg, model, spec, path, site, layer)
        for spec, (path, site, layer) in zip(cfg.hooks, hooks, strict=True)
    }
    store.put_json("cfg.json", _root_config(cfg, model))
    return part, hook_info


SPLIT_SHARDS = 2
"""Shards per hook that train.py's default split needs: it trains on all but the last
(--train-data.shards ':-1') and holds out the last (--val-data.shards '-1:')."""


def merge_parts(store: Store, n_machines: int, hook_info: dict[str, dict]) -> None:
    """Write the merged metadata.json and statistics.json once every machine's part is
    complete; say so when the collection is too small for train.py's default split."""
    parts = load_parts(store, n_machines)
    if not all(p.complete for p in parts):
        return
    write_merged(store, parts, hook_info)
    n_shards = min(len(merged_shards(parts, hook)) for hook in hook_info)
    if n_shards < SPLIT_SHARDS:
        print(
            f"note: {store.uri} holds {n_shards} shard(s) per hook, and train.py's default split "
            f"needs {SPLIT_SHARDS} (it trains on all shards but the last and holds out the "
            "last); collect more text (--max-tokens) or smaller shards (--shard-tokens), or "
            "train on it with --train-data.shards ':' and --val-data.uri naming another "
            "collection"
        )


class PartWriter:
    """Batches of stored tokens appended to this machine's part: shards cut on batch
    boundaries once they hold shard_tokens, written in the background and committed in order
    (the part file; with one machine also the merged metadata and statistics)."""

    def __init__(self, cfg: CollectConfig, store: Store, part: Part, hook_info: dict[str, dict]):
        self.cfg, self.store, self.part = cfg, store, part
        self.seq_done = part.seq_done
        """Sequences added so far (committed or not), from the part's first."""
        self.n_batches = 0

        def commit(written: WrittenShard) -> None:
            _commit(store, part, written, hook_info if cfg.n_machines == 1 else None)

        self.writer = ShardWriter(
            store,
            {h: h for h in hook_info},
            cfg.machine,
            cfg.upload_threads,
            cfg.max_inflight_shards,
            commit,
            ACT_DTYPES[cfg.act_dtype],
        )
        n_shards = len(next(iter(part.hooks.values()), HookPart()).shards)
        self.shard = PendingShard(n_shards, part.seq_done)

    def add(
        self,
        stored: tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor],
        n_seqs: int,
    ) -> None:
        """One batch of n_seqs sequences as HookedModel.stored gives it."""
        self.shard.add(*stored)
        self.seq_done += n_seqs
        self.shard.seq_end = self.seq_done
        self.n_batches += 1
        if self.shard.n_tokens >= self.cfg.shard_tokens:
            self._submit()

    def _submit(self) -> None:
        if self.shard.n_tokens:
            self.writer.submit(self.shard)
            self.shard = PendingShard(
                self.shard.index + 1, self.seq_done, first_batch=self.n_batches
            )

    def flush(self) -> None:
        """Commit every batch added so far (the last shard may hold fewer than shard_tokens)."""
        self._submit()
        self.writer.flush()

    def close(self) -> None:
        """Commit what is in flight and stop the threads (a last shard not yet submitted is
        dropped: an error's rerun writes it again)."""
        self.writer.close()

    def complete(self) -> None:
        """Mark the part complete (after flush and close)."""
        self.part.complete = True
        self.store.put_json(part_key(self.part.machine, self.part.n_machines), self.part.to_json())


def _collect_part(
    cfg: CollectConfig,
    store: Store,
    part: Part,
    hooked: HookedModel,
    tokenizer,
    hook_info: dict[str, dict],
) -> None:
    quota = math.ceil(cfg.max_tokens / cfg.n_machines) if cfg.max_tokens else None
    docs = iter_documents(
        cfg.dataset, cfg.text_column, cfg.dataset_config, cfg.split, cfg.streaming
    )
    seqs = sequences(
        docs,
        tokenizer,
        cfg.ctx_len,
        cfg.exclude_special,
        cfg.machine,
        cfg.n_machines,
        cfg.doc_split,
    )
    batches = batched(itertools.islice(seqs, part.seq_done, None), cfg.batch_size)
    out = PartWriter(cfg, store, part, hook_info)
    tokens = part.n_tokens
    bar = tqdm(
        total=quota,
        initial=tokens,
        unit="tok",
        unit_scale=True,
        disable=not cfg.progress,
        desc=f"collect m{cfg.machine}",
    )
    start = time.perf_counter()
    try:
        for seq_batch in batches:
            if quota is not None and tokens >= quota:
                break
            batch = make_batch(seq_batch, tokenizer.pad_token_id or 0)
            out.add(hooked.stored(batch, cfg.device, cfg.act_dtype), len(seq_batch))
            tokens += batch.n_stored
            bar.update(batch.n_stored)
            bar.set_postfix_str(
                f"{out.writer.bytes_written / 1e6 / (time.perf_counter() - start):.1f} MB/s"
            )
        else:  # the dataset ended before the quota: the bar ends full, at what it held
            bar.total = tokens
            bar.refresh()
        out.flush()
    finally:
        out.close()
        bar.close()
    out.complete()
    elapsed = time.perf_counter() - start
    print(
        f"collected {part.n_tokens:,} tokens for {len(hook_info)} hook(s) on machine "
        f"{cfg.machine}/{cfg.n_machines} into {store.uri} in {elapsed:.1f}s "
        f"({out.writer.bytes_written / 1e6:.1f} MB written)"
    )


def _commit(store: Store, part: Part, written: WrittenShard, hook_info: dict | None) -> None:
    for hook, record in written.records.items():
        hp = part.hooks.setdefault(hook, HookPart())
        hp.shards.append(record)
        stats = written.stats[hook]
        hp.stats = stats if hp.stats is None else hp.stats.merge(stats)
        if hook in written.quant:
            quant = written.quant[hook]
            hp.quant = quant if hp.quant is None else hp.quant.merge(quant)
    part.seq_done = written.seq_end
    store.put_json(part_key(part.machine, part.n_machines), part.to_json())
    if hook_info is not None:
        write_merged(store, [part], hook_info)


def _hook_info(cfg: CollectConfig, model, spec: str, path: str, site, layer) -> dict:
    return {
        "hook": path,
        "short_name": spec if spec != path else None,
        "site": site,
        "layer": layer,
        "d_model": model.config.hidden_size,
        "dtype": cfg.act_dtype,
        "ctx_len": cfg.ctx_len,
        "model": cfg.model,
        "exclude_special": cfg.exclude_special,
    }


def _root_config(cfg: CollectConfig, model) -> dict:
    import transformers

    from saesweep import __version__

    return {
        "schema_version": schema_version(cfg.act_dtype),
        "config": data_fields(cfg),
        "model_revision": getattr(model.config, "_commit_hash", None),
        "versions": {
            "saesweep": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def check_model_revision(store: Store, cfg: CollectConfig, model, stored: dict | None) -> None:
    """Refuse to resume (or join) a collection whose model resolved to other weights (`stored`:
    its cfg.json): without --revision, a hub model's main branch may have moved since."""
    revision = (stored or {}).get("model_revision")
    resolved = getattr(model.config, "_commit_hash", None)
    if revision is not None and resolved != revision:
        raise UserError(
            f"{store.uri} was collected from {cfg.model} at revision {revision}, but it now "
            f"resolves to {resolved}; pass --revision {revision} to continue it"
        )


def check_root_config(store: Store, cfg: CollectConfig, stored: dict | None) -> None:
    """Refuse to write into a location that holds a different collection (`stored`: its
    cfg.json) or other files."""
    if stored is not None:
        config, wanted = stored_data_fields(stored.get("config", {})), data_fields(cfg)
        diff = [
            f"{k}: stored {config.get(k)!r}, given {wanted[k]!r}"
            for k in wanted
            if config.get(k) != wanted[k]
        ]
        if diff:
            raise UserError(
                f"{store.uri} holds a different collection ({'; '.join(diff)}); "
                "choose another --out or repeat the original settings to resume"
            )
    elif store.list():
        raise UserError(f"{store.uri} is not empty and holds no collection; choose another --out")
