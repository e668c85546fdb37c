"""train.py: one SAE, or a sweep file of them, trained in parallel groups.

uv run train.py --sweep sweeps/lr_grid.py [--slurm-acct A] [--lr 5e-4] [--sae.k 64] ...
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from saesweep.configtools import at_least, deep_merge, parse_command_line
from saesweep.data.saelens_cache import with_converted_caches
from saesweep.errors import UserError, exit_on_user_error
from saesweep.executors import CLUSTERS, SlurmConfig, largest_node_cpus
from saesweep.memory import check_fits, resolve_device
from saesweep.train.config import SweepConfig, TrainConfig
from saesweep.train.layout import check_not_running, create_sweep_dir, group_finished
from saesweep.train.preflight import (
    check_caches,
    check_data,
    check_local_device,
    check_plan,
    check_processes,
    ensure_data,
    print_plan,
    slurm_request,
)
from saesweep.train.sweep import (
    Group,
    build_configs,
    load_sweep,
    make_config,
    split_groups,
    sweep_config,
)

USAGE = """usage: train.py [--sweep FILE.py | --rerun SWEEP_DIR | --resume SWEEP_DIR] [--dry-run]
                [--max-parallel K] [--executor local|debug|slurm|ray] [--CONFIG.FIELD VALUE ...]

Without --sweep, trains one SAE from the defaults and flags. Config flags (CLI > sweep > defaults):
"""


@dataclass(frozen=True)
class TrainCommand:
    """train.py's own flags; every other flag overrides a TrainConfig field."""

    sweep: str | None = None
    """Sweep file: a Python file whose make_cfgs() returns a list of config dicts."""
    rerun: str | None = None
    """Sweep directory to run again with its recorded configs (flags override them)."""
    resume: str | None = None
    """Sweep directory whose unfinished groups continue from their last saved state."""
    max_parallel: int | None = field(default=None, metadata=at_least(1, optional=True))
    """At most this many SAEs per group (a larger group is split)."""
    executor: Literal["local", "debug", "slurm", "ray"] | None = None
    """Where groups run: local processes, in this process (debug), Slurm jobs or Ray tasks
    (--ray-address); default slurm with --slurm-acct, else local."""
    dry_run: bool = False
    """Print the plan (groups, devices, Slurm requests), check what reads no data beyond
    local manifests (shard slices, shapes), and exit."""


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, overrides = parse_command_line(argv, TrainCommand, TrainConfig, "train.py", USAGE)
    if sum(bool(x) for x in (command.sweep, command.rerun, command.resume)) > 1:
        raise UserError("give only one of --sweep, --rerun and --resume")
    if command.resume:
        return resume(command)
    if command.rerun:
        source = Path(command.rerun)
        cfgs, where = load_sweep_configs(source, overrides), str(source / "sweep.json")
        name = f"{source.name.split('-rerun')[0]}-rerun"
    else:
        sweep_path = Path(command.sweep) if command.sweep else None
        sweep = load_sweep(sweep_path) if sweep_path else [{}]
        where = str(sweep_path or "defaults")
        cfgs = build_configs(sweep, overrides, where)
        name = sweep_path.stem if sweep_path else "single"
    cfgs = [with_converted_caches(cfg, remote=not command.dry_run) for cfg in cfgs]
    sweep_cfg = sweep_config(cfgs, where)
    groups = split_groups(cfgs, command.max_parallel)
    executor = executor_of(command, sweep_cfg)
    if command.dry_run:
        print_plan(groups, len(cfgs), executor, sweep_cfg.slurm)
        check_plan(groups, executor, sweep_cfg.slurm)
        return 0
    slurms = check_groups(executor, groups, sweep_cfg)
    sweep_dir = create_sweep_dir(Path(sweep_cfg.runs_root), name)
    write_sweep_json(sweep_dir, cfgs, groups, argv)
    from saesweep.train.run import run_sweep  # the trainer's imports: not for --help, --dry-run

    return run_sweep(sweep_dir, groups, executor, slurms, sweep_cfg)


def resume(command: TrainCommand) -> int:
    """Continue the unfinished groups of a sweep directory from their saved state."""
    sweep_dir = Path(command.resume)
    cfgs = load_sweep_configs(sweep_dir, {})
    sweep_cfg = sweep_config(cfgs, str(sweep_dir / "sweep.json"))
    groups = split_groups(cfgs, command.max_parallel)
    unfinished = [g for g in groups if not group_finished(sweep_dir, g)]
    if not unfinished:
        print(f"nothing to resume: every group of {sweep_dir} finished (--rerun trains it again)")
        return 0
    for group in unfinished:
        check_not_running(sweep_dir, group)
    executor = executor_of(command, sweep_cfg)
    slurms = check_groups(executor, unfinished, sweep_cfg)
    from saesweep.train.run import run_sweep  # the trainer's imports: not for --help

    return run_sweep(sweep_dir, unfinished, executor, slurms, sweep_cfg)


def executor_of(command: TrainCommand, sweep_cfg: SweepConfig) -> str:
    return command.executor or ("slurm" if sweep_cfg.slurm.acct else "local")


def check_groups(executor: str, groups: list[Group], sweep_cfg: SweepConfig) -> list[SlurmConfig]:
    """Check every group before any job starts (device, data, shapes; memory where it runs
    here); each group's Slurm request."""
    check_caches(groups)
    node_cpus = largest_node_cpus(executor, sweep_cfg.slurm, sweep_cfg.ray)
    slurms = []
    for group in groups:
        cfg = group.config
        if executor not in CLUSTERS:
            check_local_device(cfg)
        check_processes(group, executor, sweep_cfg.slurm)
        ensure_data(cfg)
        d_model = check_data(group)
        if executor not in CLUSTERS and d_model is not None:
            device = resolve_device(cfg.device)
            check_fits([r.sae for r in group.runs], d_model, cfg.batch_size, device)
        slurms.append(slurm_request(group, sweep_cfg.slurm, d_model, node_cpus))
    return slurms


def write_sweep_json(sweep_dir: Path, cfgs: list[TrainConfig], groups, argv: list[str]) -> None:
    from saesweep.format.rundir import write_json

    write_json(
        sweep_dir / "sweep.json",
        {
            "schema_version": 1,
            "command": ["train.py", *argv],
            "code_version": code_version(),
            "configs": [dataclasses.asdict(c) for c in cfgs],
            "groups": [list(g.run_ids) for g in groups],
        },
    )


def load_sweep_configs(sweep_dir: Path, overrides: dict) -> list[TrainConfig]:
    """The merged configs recorded in a sweep directory, with `overrides` applied on top."""
    path = sweep_dir / "sweep.json"
    if not path.exists():
        raise UserError(f"{sweep_dir} is not a sweep directory (no sweep.json)")
    saved = json.loads(path.read_text())["configs"]
    return [
        make_config(deep_merge(cfg, overrides), f"{path} config {i}") for i, cfg in enumerate(saved)
    ]


def code_version() -> str:
    from saesweep import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{__version__}+{commit}"
