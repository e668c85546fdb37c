"""The finished runs that export arguments name: run directories, or sweep directories for
every run they hold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from torch import Tensor

from saesweep.errors import UserError
from saesweep.evaluate.features import check_width
from saesweep.format.collection import Collection, HookShards
from saesweep.format.rundir import METRICS, load_sae

T = TypeVar("T")


def finished_runs(paths: tuple[str, ...]) -> list[Path]:
    """Every run directory among `paths` (a sweep directory stands for each run under its
    runs/), each finished (its metrics.json committed), in the order given."""
    runs: list[Path] = []
    for given in map(Path, paths):
        if (given / "cfg.json").is_file():
            runs.append(given)
        elif (given / "runs").is_dir():
            runs += sorted(p for p in (given / "runs").iterdir() if (p / "cfg.json").is_file())
        else:
            raise UserError(
                f"{given} is neither a run directory (with cfg.json) nor a sweep directory "
                "(with runs/); give runs/NAME-TIME or runs/NAME-TIME/runs/run-NNN"
            )
    for run in runs:
        if not (run / METRICS).is_file():
            raise UserError(
                f"{run} has not finished (no {METRICS}); finish it with "
                f"`uv run train.py --resume {run.parent.parent}` first"
            )
    return runs


def run_names(runs: list[Path]) -> list[str]:
    """Each run's directory name (its directory in an export), refused when two runs share
    one."""
    names = [run.name for run in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(
            f"several runs are named {', '.join(twice)}; export each sweep to its own --out"
        )
    return names


def check_one_hook(run: Path, cfg: dict) -> None:
    """A UserError for a run whose dictionary reads several hooks (a CLT, a crosscoder: its
    cfg.json names hook_names), which a format of single-hook SAEs and transcoders cannot
    hold."""
    if "hook_name" not in cfg:
        raise UserError(
            f"{run} is a {cfg['architecture']} over the hooks {', '.join(cfg['hook_names'])}; "
            "this format holds SAEs and transcoders of one hook, so give only such runs"
        )


@dataclass(frozen=True)
class LoadedRun:
    """A finished run to export: its name in the export, directory, cfg.json and weights."""

    name: str
    run: Path
    cfg: dict
    weights: dict[str, Tensor]


def runs_by_hook(
    paths: tuple[str, ...], collection: Collection, shards: str, member: Callable[[LoadedRun], T]
) -> dict[str, tuple[HookShards, list[T]]]:
    """The finished runs `paths` name, loaded, made into an export's `member`s and grouped by
    the collection's hook each reads: {hook: (its `shards`, its members)}; a run of another
    width than its hook refused."""
    runs = finished_runs(paths)
    grouped: dict[str, tuple[HookShards, list[T]]] = {}
    for name, run in zip(run_names(runs), runs, strict=True):
        cfg, weights = load_sae(run)
        check_one_hook(run, cfg)
        meta = collection.hook(cfg["hook_name"])
        hook, members = grouped.setdefault(meta["hook"], (collection.choose(meta, shards), []))
        check_width(cfg, collection, hook)
        members.append(member(LoadedRun(name, run, cfg, weights)))
    return grouped
