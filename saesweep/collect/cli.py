"""Entry point of collect.py: collect here, or submit one Slurm task per machine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saesweep.collect.config import CollectConfig, parse_cli
from saesweep.collect.run import collect
from saesweep.errors import UserError, exit_on_user_error
from saesweep.executors import SlurmConfig, run_groups


def collect_machine(cfg: CollectConfig) -> int:
    """One machine's share, as run inside a Slurm task; returns its token count."""
    return collect(cfg).n_tokens


def submit(cfg: CollectConfig) -> None:
    here = dataclasses.replace(cfg.slurm, acct=None)
    tasks = [
        dataclasses.replace(cfg, machine=m, slurm=here, progress=False)
        for m in range(cfg.n_machines)
    ]
    outcomes = run_groups(
        collect_machine,
        tasks,
        executor="slurm",
        log_dir=Path(cfg.slurm_log_dir),
        slurm=slurm_request(cfg),
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


def slurm_request(cfg: CollectConfig) -> SlurmConfig:
    """The Slurm config of each collection task, sizes resolved: one GPU unless the device is
    'cpu', and the writer's threads plus two cores."""
    gpus = cfg.slurm.gpus_per_group
    cpus = cfg.slurm.cpus_per_group
    return dataclasses.replace(
        cfg.slurm,
        gpus_per_group=gpus if gpus is not None else int(cfg.device != "cpu"),
        cpus_per_group=cpus if cpus is not None else cfg.upload_threads + 2,
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(argv)
    if cfg.slurm.acct:
        submit(cfg)
    else:
        collect(cfg)
