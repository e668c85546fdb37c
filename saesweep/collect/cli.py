"""Entry point of collect.py: collect here, or run one Slurm or Ray task per machine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saesweep.collect.config import CollectConfig, parse_cli
from saesweep.collect.run import collect
from saesweep.errors import UserError, exit_on_user_error
from saesweep.executors import SlurmConfig, default_cpus, largest_node_cpus, run_groups


def collect_machine(cfg: CollectConfig) -> int:
    """One machine's share, as run inside a Slurm or Ray task; returns its token count."""
    return collect(cfg).n_tokens


def submit(cfg: CollectConfig, executor: str) -> None:
    here = dataclasses.replace(cfg.slurm, acct=None)
    tasks = [
        dataclasses.replace(cfg, machine=m, slurm=here, executor="here", progress=False)
        for m in range(cfg.n_machines)
    ]
    outcomes = run_groups(
        collect_machine,
        tasks,
        executor=executor,
        log_dir=Path(cfg.slurm_log_dir),
        slurm=slurm_request(cfg, largest_node_cpus(executor, cfg.slurm, cfg.ray)),
        poll_s=5.0,
        ray=cfg.ray,
        unit="machine",
    )
    failed = [o for o in outcomes if o.status != "done"]
    for o in failed:
        print(f"machine {o.index} failed; logs: {o.stdout} {o.stderr}")
    if failed:
        raise UserError(
            f"{len(failed)} of {cfg.n_machines} collection tasks failed; rerun the "
            "same command to resume them"
        )
    engine = "Slurm" if executor == "slurm" else "Ray"
    n_tokens = sum(o.result for o in outcomes)
    print(f"collected {n_tokens:,} tokens on {cfg.n_machines} {engine} tasks")


def slurm_request(cfg: CollectConfig, node_cpus: int | None) -> SlurmConfig:
    """What each collection task asks Slurm or Ray for, sizes resolved: one GPU unless the
    device is 'cpu', and the writer's threads plus two cores (at most the largest node's)."""
    gpus = cfg.slurm.gpus_per_group
    cpus = cfg.slurm.cpus_per_group
    return dataclasses.replace(
        cfg.slurm,
        gpus_per_group=gpus if gpus is not None else int(cfg.device != "cpu"),
        cpus_per_group=cpus or default_cpus(cfg.upload_threads + 2, node_cpus, 1),
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(argv)
    executor = cfg.executor or ("slurm" if cfg.slurm.acct else "here")
    if executor == "here":
        collect(cfg)
    else:
        submit(cfg, executor)
