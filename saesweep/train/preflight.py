"""Before launching: print the plan of a sweep, and collect missing demo data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saesweep.errors import UserError
from saesweep.format.manifest import find_hook
from saesweep.memory import group_bytes, require_visible_device
from saesweep.sae import ARCHITECTURES
from saesweep.store import open_store
from saesweep.train.config import DataConfig, TrainConfig
from saesweep.train.sweep import Group


def describe(cfg: TrainConfig) -> str:
    lr = f"{cfg.lr:g}" if cfg.lr is not None else "auto"
    width = cfg.sae.d_sae or f"{cfg.sae.exp_factor}x"
    tag = f" tag={cfg.tag}" if cfg.tag else ""
    return (
        f"{cfg.sae.arch:9s} width={width} k={cfg.sae.k} lr={lr} "
        f"sparsity={cfg.objective.sparsity_coeff:g} seed={cfg.seed}{tag}"
    )


def print_plan(groups: list[Group], n_configs: int) -> None:
    """Each group, its data, its SAEs and a memory estimate; touches no data."""
    for group in groups:
        first = group.cfgs[0]
        data = first.train_data
        where = f"layer={data.layer}" if data.layer is not None else f"hook={data.hook}"
        d_model = first.sae.d_model or local_d_model(data)
        memory = (
            f"~{group_bytes([c.sae for c in group.cfgs], d_model, first.batch_size) / 2**30:.2f}"
            f" GiB"
            if d_model
            else "unknown until d_model is known (set sae.d_model)"
        )
        print(
            f"group {group.index}: {len(group.cfgs)} SAEs, data {data.uri} {where}, "
            f"n_train={first.n_train:,}, device={first.device}, memory {memory}"
        )
        for run_id, cfg in zip(group.run_ids, group.cfgs, strict=True):
            print(f"  run {run_id:3d}: {describe(cfg)}")
    print(f"{n_configs} configs in {len(groups)} groups")


def local_d_model(data: DataConfig) -> int | None:
    """d_model from a local collection's manifest (no activations read, no network)."""
    if "://" in data.uri.removeprefix("file://"):
        return None
    try:
        return find_hook(open_store(data.uri), data.hook, data.layer)["d_model"]
    except (UserError, OSError):
        return None


def check_data(group: Group) -> int:
    """Open the train and val manifests before any job starts, so a wrong uri, hook, layer,
    an unreachable store or missing credentials fail here with one sentence; then check that
    every SAE's shape (k, experts) fits the collection's d_model, which is returned."""
    cfg = group.cfgs[0]
    train, _ = (
        find_hook(open_store(data.uri or cfg.train_data.uri), data.hook, data.layer)
        for data in (cfg.train_data, cfg.val_data)
    )
    for run_id, run_cfg in zip(group.run_ids, group.cfgs, strict=True):
        try:
            ARCHITECTURES[run_cfg.sae.arch].check_shape(run_cfg.sae, train["d_model"])
        except ValueError as err:
            where = f"run {run_id} ({run_cfg.sae.arch}, d_model {train['d_model']})"
            raise UserError(f"{where}: {err}") from None
    return train["d_model"]


def check_local_device(cfg: TrainConfig) -> None:
    """For jobs run on this machine: a CUDA device that torch cannot see is refused before any
    job starts (Slurm jobs are checked where they run: a login node may have no GPU)."""
    require_visible_device(
        cfg.device, f"--device {cfg.device}", "use --device cpu, or --slurm-acct for GPU nodes"
    )


def ensure_data(cfg: TrainConfig) -> None:
    """Run the collection named by train_data.collect when a local uri holds no collection."""
    data = cfg.train_data
    uri = data.uri.removeprefix("file://")
    if "://" in uri or any(Path(uri).glob("*/metadata.json")):
        return
    if not data.collect:
        raise UserError(
            f"{data.uri} holds no collection; run collect.py first or set "
            "--train-data.collect CONFIG.toml"
        )
    from saesweep.collect.config import load_toml
    from saesweep.collect.run import collect

    print(f"{data.uri} holds no collection yet: collecting it with {data.collect}")
    collect(dataclasses.replace(load_toml(Path(data.collect)), out=data.uri))
