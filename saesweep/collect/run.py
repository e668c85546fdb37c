"""The collection loop: forward passes, shard cutting, resume, multi-machine finalization."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time

import torch
from tqdm import tqdm

from saesweep.collect.config import CollectConfig, data_fields
from saesweep.collect.model import HookedModel, load_model, resolve_hook
from saesweep.collect.sequences import Batch, batched, make_batch, sequences
from saesweep.collect.text import iter_documents
from saesweep.collect.writer import PendingShard, ShardWriter, WrittenShard
from saesweep.errors import UserError
from saesweep.format.manifest import HookPart, Part, load_part, load_parts, part_key, write_merged
from saesweep.format.shards import ACT_DTYPES, SCHEMA_VERSION
from saesweep.locks import held_lock
from saesweep.memory import resolve_device
from saesweep.store import FileStore, Store, open_store


def collect(cfg: CollectConfig) -> Part:
    """Collect this machine's share into cfg.out, resuming from what is already committed."""
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    store = open_store(cfg.out)
    store.check_writable()
    stored = store.get_json("cfg.json") if store.exists("cfg.json") else None
    check_root_config(store, cfg, stored)
    with machine_lock(store, cfg.machine, cfg.n_machines):
        return _collect_locked(cfg, store, stored)


@contextlib.contextmanager
def machine_lock(store: Store, machine: int, n_machines: int):
    """Hold this machine index for one process (local stores: an flock next to its part file;
    S3 has no lock to take, so there running one index twice is not detected)."""
    if not isinstance(store, FileStore):
        yield
        return
    part = store.root / part_key(machine, n_machines)
    busy = (
        f"another process is collecting machine {machine} of {n_machines} into "
        f"{store.uri}; wait for it to finish or stop it"
    )
    with held_lock(part.with_name(f".{part.stem}.lock"), busy):
        yield


def _collect_locked(cfg: CollectConfig, store: Store, stored: dict | None) -> Part:
    part = load_part(store, cfg.machine, cfg.n_machines)
    model, tokenizer = load_model(
        cfg.model,
        cfg.revision,
        cfg.model_dtype,
        cfg.device,
        trust_remote_code=cfg.trust_remote_code,
    )
    check_model_revision(store, cfg, model, stored)
    hooks = [resolve_hook(model, spec) for spec in cfg.hooks]
    hook_info = {
        path: _hook_info(cfg, model, spec, path, site, layer)
        for spec, (path, site, layer) in zip(cfg.hooks, hooks, strict=True)
    }
    store.put_json("cfg.json", _root_config(cfg, model))
    if not part.complete:
        _collect_part(cfg, store, part, HookedModel(model, list(hook_info)), tokenizer, hook_info)
    parts = load_parts(store, cfg.n_machines)
    if all(p.complete for p in parts):
        write_merged(store, parts, hook_info)
    return part


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
    seqs = sequences(docs, tokenizer, cfg.ctx_len, cfg.exclude_special, cfg.machine, cfg.n_machines)
    batches = batched(itertools.islice(seqs, part.seq_done, None), cfg.batch_size)

    def commit(written: WrittenShard) -> None:
        _commit(store, part, written, hook_info if cfg.n_machines == 1 else None)

    writer = ShardWriter(
        store,
        {h: h for h in hook_info},
        cfg.machine,
        cfg.upload_threads,
        cfg.max_inflight_shards,
        commit,
    )
    tokens, seq_ordinal = part.n_tokens, part.seq_done
    shard = PendingShard(len(next(iter(part.hooks.values()), HookPart()).shards), seq_ordinal)
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
        for n_batch, seq_batch in enumerate(batches):
            if quota is not None and tokens >= quota:
                break
            batch = make_batch(seq_batch, tokenizer.pad_token_id or 0)
            _add_batch(shard, hooked, batch, cfg)
            tokens += batch.n_stored
            seq_ordinal += len(seq_batch)
            shard.seq_end = seq_ordinal
            bar.update(batch.n_stored)
            bar.set_postfix_str(
                f"{writer.bytes_written / 1e6 / (time.perf_counter() - start):.1f} MB/s"
            )
            if shard.n_tokens >= cfg.shard_tokens:
                writer.submit(shard)
                shard = PendingShard(shard.index + 1, seq_ordinal, first_batch=n_batch + 1)
        if shard.n_tokens:
            writer.submit(shard)
    finally:
        writer.close()
        bar.close()
    part.complete = True
    store.put_json(part_key(part.machine, part.n_machines), part.to_json())
    elapsed = time.perf_counter() - start
    print(
        f"collected {part.n_tokens:,} tokens for {len(hook_info)} hook(s) on machine "
        f"{cfg.machine}/{cfg.n_machines} into {store.uri} in {elapsed:.1f}s "
        f"({writer.bytes_written / 1e6:.1f} MB written)"
    )


def _add_batch(shard: PendingShard, hooked: HookedModel, batch: Batch, cfg: CollectConfig) -> None:
    device = torch.device(cfg.device)
    outputs = hooked.run(batch.input_ids.to(device), batch.attention_mask.to(device))
    keep = batch.stored.to(device)
    on_gpu = device.type == "cuda"
    for hook, out in outputs.items():
        acts = out[keep].to(ACT_DTYPES[cfg.act_dtype])
        host = torch.empty(acts.shape, dtype=acts.dtype, pin_memory=on_gpu)
        host.copy_(acts, non_blocking=on_gpu)
        shard.acts.setdefault(hook, []).append(host)
    if on_gpu:
        event = torch.cuda.Event()
        event.record()
        shard.copy_done.append(event)
    n_rows, width = batch.stored.shape
    shard.token_ids.append(batch.input_ids[batch.stored].to(torch.int32))
    shard.seq_ids.append(batch.seq_ids[:, None].expand(n_rows, width)[batch.stored])
    shard.positions.append(
        torch.arange(width, dtype=torch.int32).expand(n_rows, width)[batch.stored]
    )


def _commit(store: Store, part: Part, written: WrittenShard, hook_info: dict | None) -> None:
    for hook, record in written.records.items():
        hp = part.hooks.setdefault(hook, HookPart())
        hp.shards.append(record)
        stats = written.stats[hook]
        hp.stats = stats if hp.stats is None else hp.stats.merge(stats)
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
        "schema_version": SCHEMA_VERSION,
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
        config, wanted = stored.get("config", {}), data_fields(cfg)
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
