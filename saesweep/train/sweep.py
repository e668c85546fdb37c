"""Sweep files to configs: load make_cfgs(), deep-merge CLI > sweep > defaults, seeds; the
sweep's one sweep-level config, and its groups."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from saesweep.configtools import check_values, deep_merge, replace_from_dict
from saesweep.errors import UserError
from saesweep.train.config import GroupConfig, RunConfig, SweepConfig, TrainConfig


def load_sweep(path: Path) -> list[dict]:
    """The list of dicts returned by make_cfgs() in the Python file at `path`."""
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"saesweep_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__
    try:  # beside the user's sweep file or the modules it imports from its directory
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise UserError(
            f"sweep file {path} has a syntax error at line {err.lineno}: {err.msg}"
        ) from None
    except Exception as err:
        raise UserError(f"sweep file {path} failed while loading: {_where(err, path)}") from None
    finally:
        sys.path.pop(0)
        sys.dont_write_bytecode = writes_bytecode
    make_cfgs = getattr(module, "make_cfgs", None)
    if not callable(make_cfgs):
        raise UserError(f"sweep file {path} must define a function make_cfgs() -> list[dict]")
    try:
        cfgs = make_cfgs()
    except Exception as err:
        raise UserError(f"make_cfgs() in {path} raised {_where(err, path)}") from None
    if not isinstance(cfgs, list):
        raise UserError(
            f"make_cfgs() in {path} returned {type(cfgs).__name__}, not a list of dicts"
        )
    for i, cfg in enumerate(cfgs):
        if not isinstance(cfg, dict):
            raise UserError(f"make_cfgs() in {path}: item {i} is {type(cfg).__name__}, not a dict")
    if not cfgs:
        raise UserError(f"make_cfgs() in {path} returned an empty list")
    return cfgs


def _where(err: Exception, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == str(path)]
    line = f" (line {frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{line}"


def make_config(values: dict, where: str) -> TrainConfig:
    """The defaults with `values` (nested dicts) applied: unknown keys, wrong types and
    out-of-range values raise UserError naming `where` and the key."""
    cfg = replace_from_dict(TrainConfig(), values, where)
    check_values(cfg, where, "the sweep")
    data = cfg.train_data
    if cfg.sae.skip and data.target_hook is None and data.target_layer is None:
        raise UserError(
            f"{where}: sae.skip needs a target hook (train_data.target_hook or target_layer): "
            "a skip transcoder maps its input hook to another hook"
        )
    return _d_vit_as_d_model(cfg, where)


def _d_vit_as_d_model(cfg: TrainConfig, where: str) -> TrainConfig:
    sae = cfg.sae
    if sae.d_vit is None:
        return cfg
    if sae.d_model not in (None, sae.d_vit):
        raise UserError(f"{where}: sae.d_vit={sae.d_vit} and sae.d_model={sae.d_model} differ")
    sae = dataclasses.replace(sae, d_model=sae.d_vit, d_vit=None)
    return dataclasses.replace(cfg, sae=sae)


def build_configs(sweep: list[dict], overrides: dict, where: str) -> list[TrainConfig]:
    """CLI > sweep > defaults, each dict deep-merged; config i gets seed = base seed + i."""
    cfgs = []
    for i, item in enumerate(sweep):
        cfg = make_config(deep_merge(item, overrides), f"{where} config {i}")
        cfgs.append(dataclasses.replace(cfg, seed=cfg.seed + i))
    return cfgs


def sweep_config(cfgs: list[TrainConfig], where: str) -> SweepConfig:
    """The sweep-level config every config shares; one that differs is a UserError naming the
    field and two configs (before anything is created)."""
    first = cfgs[0].sweep_level
    for i, cfg in enumerate(cfgs[1:], 1):
        difference = _first_difference(first, cfg.sweep_level)
        if difference is not None:
            name, a, b = difference
            raise UserError(
                f"{where} configs 0 and {i} set {name} to {a!r} and {b!r}, but it is one "
                "setting of the whole sweep (runs_root, wandb, health, slurm, ray); give every "
                f"config the same value, e.g. with --{name.replace('_', '-')}"
            )
    return first


def _first_difference(a, b, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted field name, a's value, b's value) of the first leaf field where the
    dataclasses a and b differ; None when they are equal."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x == y:
            continue
        if dataclasses.is_dataclass(x):
            return _first_difference(x, y, f"{prefix}{f.name}.")
        return f"{prefix}{f.name}", x, y
    return None


@dataclass(frozen=True)
class Group:
    """Configs that share one source and one job: the group's config and each run's."""

    index: int
    config: GroupConfig
    runs: tuple[RunConfig, ...]
    run_ids: tuple[int, ...]
    """Each run's index in the sweep."""


def split_groups(cfgs: list[TrainConfig], max_parallel: int | None = None) -> list[Group]:
    """Groups of configs with equal group-level configs, at most max_parallel each."""
    by_level: dict[GroupConfig, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        by_level.setdefault(cfg.group_level, []).append(i)
    chunks = []
    for level, ids in by_level.items():
        step = max_parallel or len(ids)
        chunks += [(level, ids[j : j + step]) for j in range(0, len(ids), step)]
    return [
        Group(g, level, tuple(cfgs[i].run_level for i in ids), tuple(ids))
        for g, (level, ids) in enumerate(chunks)
    ]
