"""train.py: one SAE, or a sweep file of them, trained in parallel groups.

uv run train.py --sweep sweeps/lr_grid.py [--slurm-acct A] [--lr 5e-4] [--sae.k 64] ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

from saesweep.errors import UserError, exit_on_user_error
from saesweep.memory import check_fits
from saesweep.train.config import TrainConfig
from saesweep.train.preflight import check_data, check_local_device, ensure_data, print_plan
from saesweep.train.sweep import (
    build_configs,
    deep_merge,
    load_sweep,
    make_config,
    parse_overrides,
    split_groups,
)

SWEEP_FLAGS = {
    "--sweep": str,
    "--rerun": str,
    "--resume": str,
    "--max-parallel": int,
    "--executor": str,
}
EXECUTORS = ("local", "debug", "slurm")
USAGE = """usage: train.py [--sweep FILE.py | --rerun SWEEP_DIR | --resume SWEEP_DIR] [--dry-run]
                [--max-parallel K]
                [--executor local|debug|slurm] [--CONFIG.FIELD VALUE ...]

Without --sweep, trains one SAE from the defaults and flags. Config flags (CLI > sweep > defaults):
"""


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    opts, rest = split_flags(argv)
    if opts.get("--resume"):
        sweep_dir = Path(opts["--resume"])
        cfgs = load_sweep_configs(sweep_dir, {})
        groups = split_groups(cfgs, opts.get("--max-parallel"))
        return check_and_run(opts, cfgs, groups, sweep_dir)
    if opts.get("--rerun"):
        source = Path(opts["--rerun"])
        cfgs = load_sweep_configs(source, parse_overrides(rest))
        name = f"{source.name.split('-rerun')[0]}-rerun"
    else:
        sweep_path = Path(opts["--sweep"]) if opts.get("--sweep") else None
        sweep = load_sweep(sweep_path) if sweep_path else [{}]
        cfgs = build_configs(sweep, parse_overrides(rest), str(sweep_path or "defaults"))
        name = sweep_path.stem if sweep_path else "single"
    groups = split_groups(cfgs, opts.get("--max-parallel"))
    if opts.get("--dry-run"):
        print_plan(groups, len(cfgs))
        return 0
    sweep_dir = Path(cfgs[0].runs_root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return check_and_run(opts, cfgs, groups, sweep_dir, argv)


def check_and_run(
    opts: dict, cfgs: list[TrainConfig], groups, sweep_dir: Path, argv: list[str] | None = None
) -> int:
    """Check every group (device, data, shapes; memory where it runs here), then write
    sweep.json (a new sweep: argv given) and run the groups."""
    executor = opts.get("--executor") or ("slurm" if cfgs[0].slurm_acct else "local")
    from saesweep.train.run import run_sweep

    for group in groups:
        first = group.cfgs[0]
        if executor != "slurm":
            check_local_device(first)
        ensure_data(first)
        d_model = check_data(group)
        if executor != "slurm":
            check_fits([c.sae for c in group.cfgs], d_model, first.batch_size, first.device)
    if argv is not None:
        write_sweep_json(sweep_dir, cfgs, groups, argv)
    return run_sweep(sweep_dir, groups, executor)


def split_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """Sweep-level flags, and the config flags left over."""
    opts: dict = {}
    rest = []
    i = 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        if flag == "--dry-run":
            opts[flag] = True
            i += 1
        elif flag in SWEEP_FLAGS:
            if not inline and i + 1 >= len(argv):
                raise UserError(f"{flag} needs a value")
            raw = inline or argv[i + 1]
            try:
                opts[flag] = SWEEP_FLAGS[flag](raw)
            except ValueError:
                raise UserError(
                    f"{flag} needs a {SWEEP_FLAGS[flag].__name__}, got {raw!r}"
                ) from None
            i += 1 if inline else 2
        else:
            rest.append(argv[i])
            i += 1
    if opts.get("--executor", "local") not in EXECUTORS:
        raise UserError(f"--executor {opts['--executor']!r} is not one of {', '.join(EXECUTORS)}")
    if opts.get("--max-parallel", 1) < 1:
        raise UserError(f"--max-parallel {opts['--max-parallel']} must be at least 1")
    if sum(bool(opts.get(f)) for f in ("--sweep", "--rerun", "--resume")) > 1:
        raise UserError("give only one of --sweep, --rerun and --resume")
    return opts, rest


def write_sweep_json(sweep_dir: Path, cfgs: list[TrainConfig], groups, argv: list[str]) -> None:
    from saesweep.train.checkpoint import write_json

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


def print_help() -> None:
    import tyro

    print(USAGE)
    with contextlib.suppress(SystemExit):
        tyro.cli(TrainConfig, args=["--help"], prog="train.py")
