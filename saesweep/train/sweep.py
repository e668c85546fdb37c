"""Sweep files to configs: load make_cfgs(), deep-merge CLI > sweep > defaults, seeds, groups."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from saesweep.configtools import check_values, deep_merge, replace_from_dict
from saesweep.errors import UserError
from saesweep.train.config import GROUP_FIELDS, TrainConfig


def load_sweep(path: Path) -> list[dict]:
    """The list of dicts returned by make_cfgs() in the Python file at `path`."""
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"saesweep_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise UserError(
            f"sweep file {path} has a syntax error at line {err.lineno}: {err.msg}"
        ) from None
    except Exception as err:
        raise UserError(f"sweep file {path} failed while loading: {_where(err, path)}") from None
    finally:
        sys.path.pop(0)
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


@dataclass(frozen=True)
class Group:
    """Configs that share one reader and one job."""

    index: int
    cfgs: tuple[TrainConfig, ...]
    run_ids: tuple[int, ...]
    """Each config's index in the sweep."""


def group_key(cfg: TrainConfig) -> tuple:
    """Equal for configs that can share a group. With source 'model' the hooks (input and
    target) are not part of it: one forward pass feeds every hook the group reads."""
    if cfg.train_data.source == "model":
        unhooked = dict.fromkeys(("hook", "layer", "target_hook", "target_layer"))
        cfg = dataclasses.replace(
            cfg,
            train_data=dataclasses.replace(cfg.train_data, **unhooked),
            val_data=dataclasses.replace(cfg.val_data, **unhooked),
        )
    return tuple(repr(getattr(cfg, name)) for name in GROUP_FIELDS)


def split_groups(cfgs: list[TrainConfig], max_parallel: int | None = None) -> list[Group]:
    """Groups of configs equal in every GROUP_FIELDS field, at most max_parallel each."""
    by_key: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        by_key.setdefault(group_key(cfg), []).append(i)
    chunks = []
    for ids in by_key.values():
        step = max_parallel or len(ids)
        chunks += [ids[j : j + step] for j in range(0, len(ids), step)]
    return [Group(g, tuple(cfgs[i] for i in ids), tuple(ids)) for g, ids in enumerate(chunks)]
