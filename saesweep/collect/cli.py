"""Entry point of collect.py: collect here, or submit one Slurm task per machine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saesweep.collect.config import CollectConfig, parse_cli
from saesweep.collect.run import collect
from saesweep.errors import UserError, exit_on_user_error


def collect_machine(cfg: CollectConfig) -> int:
    """One machine's share, as run inside a Slurm task; returns its token count."""
    return collect(cfg).n_tokens


def submit(cfg: CollectConfig) -> None:
    from saesweep.executors import SlurmConfig, run_groups

    tasks = [
        dataclasses.replace(cfg, machine=m, slurm_acct=None, progress=False)
        for m in range(cfg.n_machines)
    ]
    slurm = SlurmConfig(
        acct=cfg.slurm_acct,
        partition=cfg.slurm_partition,
        n_hours=cfg.n_hours,
        gpus_per_group=int(cfg.device.startswith("cuda")),
    )
    outcomes = run_groups(
        collect_machine,
        tasks,
        executor="slurm",
        log_dir=Path(cfg.slurm_log_dir),
        slurm=slurm,
        poll_s=5.0,
    )
    failed = [o for o in outcomes if o.status != "done"]
    for o in failed:
        print(f"machine {o.index} failed; logs: {o.stdout} {o.stderr}")
    if failed:
        raise UserError(
            f"{len(failed)} of {cfg.n_machines} collection tasks failed; rerun the "
            "same command to resume them"
        )
    print(f"collected {sum(o.result for o in outcomes):,} tokens on {cfg.n_machines} Slurm tasks")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(argv)
    if cfg.slurm_acct:
        submit(cfg)
    else:
        collect(cfg)
