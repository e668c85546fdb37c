"""Before launching: the plan of a sweep, what each job asks Slurm for, the checks before any
job starts, and the demo collection when it is missing."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from saesweep.configtools import parse_slice
from saesweep.errors import UserError
from saesweep.executors import CLUSTERS, SlurmConfig, default_cpus, describe_request
from saesweep.format.collection import Collection
from saesweep.memory import group_bytes, require_visible_device, resolve_device
from saesweep.sae import ARCHITECTURES
from saesweep.train.config import DataConfig, GroupConfig, RunConfig
from saesweep.train.sources import (
    hook_spec,
    layered_hooks,
    layered_specs,
    live_hooks,
    store_hooks,
    target_spec,
    with_primary_hook,
)
from saesweep.train.sweep import Group


def describe(run: RunConfig) -> str:
    lr = f"{run.lr:g}" if run.lr is not None else "auto"
    width = run.sae.d_sae or f"{run.sae.exp_factor}x"
    tag = f" tag={run.tag}" if run.tag else ""
    return (
        f"{run.sae.arch:9s} width={width} k={run.sae.k} lr={lr} "
        f"sparsity={run.objective.sparsity_coeff:g} seed={run.seed}{tag}"
    )


BASE_HOST_GB = 4
"""Host memory of a training job before its data: Python, torch, the model for downstream
evaluation."""


def slurm_request(
    group: Group, slurm: SlurmConfig, d_model: int | None, node_cpus: int | None = None
) -> SlurmConfig:
    """The sweep's Slurm config `slurm` with the group's sizes resolved
    (docs/sweeps.md#slurm), also what it asks Ray for: one GPU per process unless the device
    is 'cpu'; per process the reader's threads plus two cores, at most its share of
    `node_cpus` (the largest node's, where known); per node BASE_HOST_GB per process, plus
    two shuffle windows at 4 bytes a value, plus the SAEs' training state when they train on
    the CPU (memory left to the partition's default while d_model is unknown)."""
    cfg = group.config
    procs_per_node = max(1, cfg.procs_per_group // slurm.nodes_per_group)
    gpus = slurm.gpus_per_group
    gpus = gpus if gpus is not None else cfg.procs_per_group * int(cfg.device != "cpu")
    cpus = slurm.cpus_per_group or default_cpus(cfg.train_data.n_threads + 2, node_cpus,
                                                procs_per_node)  # fmt: skip
    mem_gb = slurm.mem_gb
    if mem_gb is None and d_model:
        host = 2 * cfg.train_data.shuffle_tokens * d_model * 4
        if gpus == 0:
            replicas = procs_per_node if cfg.parallel == "data" else 1
            host += group_memory_bytes(group, d_model) * replicas
        mem_gb = float(BASE_HOST_GB * procs_per_node + math.ceil(host / 2**30))
    return dataclasses.replace(slurm, gpus_per_group=gpus, cpus_per_group=cpus, mem_gb=mem_gb)


def check_processes(group: Group, executor: str, slurm: SlurmConfig) -> None:
    """A group of several processes must be one they can share: an SAE for every process
    in sae mode, a batch that splits evenly in data mode, GPUs enough where it runs here."""
    cfg = group.config
    procs, where = cfg.procs_per_group, f"group {group.index}"
    if procs == 1:
        return
    if cfg.parallel == "sae" and len(group.runs) < procs:
        raise UserError(
            f"{where} has {len(group.runs)} SAEs for {procs} processes; lower "
            "--procs-per-group or use --parallel data"
        )
    switch = [r.tag or str(i) for i, r in zip(group.run_ids, group.runs, strict=True)
              if r.sae.arch == "switch"]  # fmt: skip
    if cfg.parallel == "data" and switch:
        raise UserError(
            f"{where} trains Switch SAEs (runs {', '.join(switch)}), whose load balance and "
            "expert capacity are over the whole batch, which --parallel data would split; use "
            "--parallel sae, or put the Switch SAEs in a group of their own with "
            "--procs-per-group 1"
        )
    if cfg.parallel == "data" and cfg.batch_size % procs:
        raise UserError(
            f"{where}: batch_size {cfg.batch_size} does not split over {procs} processes; "
            "make it a multiple of --procs-per-group"
        )
    if executor != "slurm" and slurm.nodes_per_group > 1:
        raise UserError("--nodes-per-group needs Slurm (--slurm-acct); other groups use one node")
    if executor not in CLUSTERS and resolve_device(cfg.device).startswith("cuda"):
        import torch

        if torch.cuda.device_count() < procs:
            raise UserError(
                f"{where} asks for {procs} processes, one per GPU, but this machine has "
                f"{torch.cuda.device_count()}; lower --procs-per-group or use --device cpu"
            )


def group_memory_bytes(group: Group, d_model: int) -> int:
    return group_bytes([r.sae for r in group.runs], d_model, group.config.batch_size)


def describe_device(cfg: GroupConfig, executor: str) -> str:
    """The device a group trains on, as this machine can tell it."""
    if cfg.device != "auto":
        return cfg.device
    if executor in CLUSTERS:
        return "auto (cuda where the job runs sees a GPU, else cpu)"
    return f"auto -> {resolve_device('auto')} (here)"


def print_plan(groups: list[Group], n_configs: int, executor: str, slurm: SlurmConfig) -> None:
    """Each group: its data, device, what it asks Slurm for, its SAEs and a memory estimate;
    touches no data beyond a local manifest."""
    for group in groups:
        cfg = group.config
        data = cfg.train_data
        where = f"layer={data.layer}" if data.layer is not None else f"hook={data.hook}"
        if target_spec(data) is not None:
            where += f" -> target {target_spec(data)}"
        if layered_hooks(group.runs):
            where += f", layered runs' hooks {', '.join(layered_hooks(group.runs))}"
        if data.source == "model":
            single = [r for r in group.runs if layered_specs(r) is None]
            hooks = {hook_spec(r.train_hooks) or "its first hook" for r in single}
            hooks |= {target_spec(r.train_hooks) for r in single} - {None}
            hooks = sorted(hooks | set(layered_hooks(group.runs)))
            where = (
                f"from the model of {data.collect}, one forward pass for hooks {', '.join(hooks)}"
            )
        d_model = group.runs[0].sae.d_model or local_d_model(with_primary_hook(data, group.runs))
        memory = (
            f"~{group_memory_bytes(group, d_model) / 2**30:.2f} GiB"
            if d_model
            else "unknown until d_model is known (set sae.d_model)"
        )
        print(
            f"group {group.index}: {len(group.runs)} SAEs, data "
            f"{where if data.source == 'model' else f'{data.uri} {where}'}, "
            f"n_train={cfg.n_train:,}, device={describe_device(cfg, executor)}, "
            f"memory {memory}"
        )
        if cfg.procs_per_group > 1:
            print(f"  {cfg.procs_per_group} processes, parallel {cfg.parallel}")
        if executor in CLUSTERS:
            engine = "Ray" if executor == "ray" else "Slurm"
            print(f"  {engine}: {describe_request(slurm_request(group, slurm, d_model), executor)}")
        for run_id, run in zip(group.run_ids, group.runs, strict=True):
            print(f"  run {run_id:3d}: {describe(run)}")
    print(f"{n_configs} configs in {len(groups)} groups")


def check_plan(groups: list[Group], executor: str, slurm: SlurmConfig) -> None:
    """The checks before launch that read nothing beyond the configs and the manifests of
    collections on this machine (--dry-run): cache locations, processes, and for groups whose
    train and held-out collections are here, shard slices and SAE shapes (check_data)."""
    check_caches(groups)
    for group in groups:
        check_processes(group, executor, slurm)
        cfg = group.config
        stored = cfg.train_data.source == "store"
        if stored and all(local_collection(d.uri) for d in (cfg.train_data, cfg.held_out_data)):
            check_data(group)


def local_collection(uri: str) -> bool:
    """Whether `uri` is a collection on this machine (a HOOK/metadata.json under it)."""
    path = uri.removeprefix("file://")
    return "://" not in path and any(Path(path).glob("*/metadata.json"))


def local_d_model(data: DataConfig) -> int | None:
    """d_model from a local collection's manifest (no activations read, no network)."""
    if "://" in data.uri.removeprefix("file://"):
        return None
    try:
        return Collection.open(data.uri, data.anonymous).hook(data.hook, data.layer)["d_model"]
    except (UserError, OSError):
        return None


def check_data(group: Group) -> int | None:
    """Open the train and val manifests before any job starts, so a wrong uri, hook, layer,
    an unreachable store or missing credentials fail here with one sentence; then check that
    every SAE's shape (k, experts) fits the collection's d_model, which is returned. With
    source 'model' only the collection config is read (d_model is known once the model
    loads, in the job: None). Transcoders' target hooks must exist beside their input hooks
    and hold the same tokens."""
    cfg = group.config
    if cfg.train_data.source == "model":
        from saesweep.collect.config import load_toml
        from saesweep.collect.text import check_dataset

        collect_cfg = load_toml(Path(cfg.train_data.collect))
        check_dataset(collect_cfg.dataset)
        if cfg.train_data.cache_to:
            check_cache(group, collect_cfg)
        return None
    collections = [Collection.open(d.uri, d.anonymous) for d in (cfg.train_data, cfg.held_out_data)]
    (train, _), (val, _) = (
        store_hooks(collection, with_primary_hook(data, group.runs))
        for collection, data in zip(collections, (cfg.train_data, cfg.held_out_data), strict=True)
    )
    for collection, meta in zip(collections, (train, val), strict=True):
        for spec in layered_hooks(group.runs):  # a CLT's layers, read in lockstep
            collection.check_same_tokens(meta, collection.hook(spec))
    check_shard_slices(cfg, train, val)
    note_few_held_out(cfg, val)
    for run_id, run in zip(group.run_ids, group.runs, strict=True):
        try:
            ARCHITECTURES[run.sae.arch].check_shape(run.sae, train["d_model"])
        except ValueError as err:
            where = f"run {run_id} ({run.sae.arch}, d_model {train['d_model']})"
            raise UserError(f"{where}: {err}") from None
    return train["d_model"]


def check_shard_slices(cfg: GroupConfig, train: dict, val: dict) -> None:
    """The train and val shard slices each select a shard, and of one collection never the
    same one (a one-shard collection cannot be split: say how to go on)."""
    slices = {"train": cfg.train_data, "val": cfg.held_out_data}
    chosen = {}
    for name, meta in (("train", train), ("val", val)):
        data = slices[name]
        chosen[name] = range(len(meta["shards"]))[parse_slice(data.shards)]
        if not chosen[name]:
            raise UserError(
                f"--{name}-data.shards {data.shards!r} selects none of the {len(meta['shards'])} "
                f"shard(s) of {data.uri}; collect more shards (a smaller --shard-tokens), or "
                "train on all of it (--train-data.shards ':') and hold out another collection "
                "(--val-data.uri)"
            )
    same = cfg.held_out_data.uri == cfg.train_data.uri and val["hook"] == train["hook"]
    if same and set(chosen["train"]) & set(chosen["val"]):
        raise UserError(
            f"--train-data.shards {cfg.train_data.shards!r} and --val-data.shards "
            f"{cfg.held_out_data.shards!r} share shards of {cfg.train_data.uri}, so the "
            "evaluation would see training tokens; make the slices disjoint (':-1' and '-1:')"
        )


def note_few_held_out(cfg: GroupConfig, val: dict) -> None:
    """One line when the held-out shards hold fewer tokens than absorption or downstream
    fidelity ask for (they then rest on what there is; the run still trains), naming the flag
    that changes either side."""
    data = cfg.held_out_data
    chosen = val["shards"][parse_slice(data.shards)]
    tokens = sum(s["n_tokens"] for s in chosen)
    wants = []
    if 0 < tokens < cfg.absorption.n_tokens:
        wants.append(f"absorption {cfg.absorption.n_tokens:,} (--absorption.n-tokens)")
    sequences = cfg.downstream_sequences * val.get("ctx_len", 0)
    if 0 < tokens < sequences:
        wants.append(
            f"downstream fidelity {cfg.downstream_sequences} sequences of up to {val['ctx_len']} "
            "tokens (--downstream-sequences)"
        )
    if wants:
        print(
            f"note: the held-out shards {data.shards!r} of {data.uri} hold {tokens:,} tokens, "
            f"fewer than {' and '.join(wants)} ask for: they use what there is; hold out more "
            "with --val-data.shards or --val-data.uri, or lower those flags"
        )


def check_cache(group: Group, collect_cfg) -> None:
    """A cache location that holds another collection (or other files) is refused before any
    job starts; one that holds this group's cache is continued by the job."""
    from saesweep.collect.run import open_collection
    from saesweep.collect.source import cache_config

    uri = group.config.train_data.cache_to
    open_collection(cache_config(collect_cfg, live_hooks(group.runs, collect_cfg), uri))


def check_caches(groups: list[Group]) -> None:
    """cache_to only for a live train source, and each location written by one group."""
    for group in groups:
        cfg = group.config
        if cfg.val_data.cache_to:
            raise UserError("--val-data.cache-to is not used; cache with --train-data.cache-to")
        if cfg.train_data.cache_to and cfg.train_data.source != "model":
            raise UserError(
                "--train-data.cache-to needs --train-data.source model (a store is cached already)"
            )
    caches = [g.config.train_data.cache_to for g in groups if g.config.train_data.cache_to]
    for uri in set(caches):
        if caches.count(uri) > 1:
            raise UserError(
                f"--train-data.cache-to {uri} is shared by {caches.count(uri)} groups; give "
                "each group its own cache (configs that differ in group fields are separate "
                "groups)"
            )


def check_local_device(cfg: GroupConfig) -> None:
    """For jobs run on this machine: a CUDA device that torch cannot see is refused before any
    job starts (Slurm jobs are checked where they run: a login node may have no GPU)."""
    require_visible_device(
        cfg.device,
        f"--device {cfg.device}",
        "use --device auto or cpu, or --slurm-acct for GPU nodes",
    )


def ensure_data(cfg: GroupConfig) -> None:
    """Run the collection config train_data.collect when train_data.uri is the default demo
    location or that config's own `out`, and holds no collection yet; any other local uri
    without one is refused, and nothing is written."""
    data = cfg.train_data
    uri = data.uri.removeprefix("file://")
    if data.source == "model" or "://" in uri or local_collection(uri):
        return
    from saesweep.collect.config import load_toml
    from saesweep.collect.run import collect

    collect_cfg = load_toml(Path(data.collect)) if data.collect else None
    if collect_cfg is None or data.uri not in (DataConfig.uri, collect_cfg.out):
        raise UserError(
            f"{data.uri} holds no collection (no HOOK/metadata.json under it); check "
            f"--train-data.uri, or run collect.py --out {data.uri} first"
        )
    print(f"{data.uri} holds no collection yet: collecting it with {data.collect}")
    collect(dataclasses.replace(collect_cfg, out=data.uri))
