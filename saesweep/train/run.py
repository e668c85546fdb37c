"""Run a planned sweep: one job per group, then the results table and report."""

from __future__ import annotations

import re
from pathlib import Path

from saesweep.evaluate.report import write_report
from saesweep.executors import GroupOutcome, SlurmConfig, run_groups
from saesweep.train.config import TrainConfig
from saesweep.train.group_job import GroupJob
from saesweep.train.sweep import Group


def slurm_config(cfg: TrainConfig) -> SlurmConfig:
    return SlurmConfig(
        acct=cfg.slurm_acct,
        partition=cfg.slurm_partition,
        n_hours=cfg.n_hours,
        gpus_per_group=cfg.gpus_per_group,
        cpus_per_group=cfg.cpus_per_group,
        mem_gb=cfg.mem_gb,
    )


def run_sweep(sweep_dir: Path, groups: list[Group], executor: str) -> int:
    """Exit status: 0 when every group finished, 1 otherwise."""
    print(f"sweep directory: {sweep_dir}")
    outcomes = run_groups(
        GroupJob(sweep_dir),
        groups,
        executor=executor,
        log_dir=sweep_dir / "logs",
        slurm=slurm_config(groups[0].cfgs[0]),
        poll_s=2.0,
    )
    write_report(sweep_dir)
    failed = [o for o in outcomes if o.status != "done"]
    for o in failed:
        print(f"group {o.index} failed: {failure_reason(o)}\n  logs: {o.stdout} {o.stderr}")
    return 1 if failed else 0


def failure_reason(outcome: GroupOutcome) -> str:
    """The last exception line of the job's stderr (or of its error text)."""
    text = outcome.error
    if outcome.stderr is not None and Path(outcome.stderr).exists():
        text = Path(outcome.stderr).read_text(errors="replace") + "\n" + text
    raised = re.findall(r"^[\w.]*(?:Error|Exception|Interrupt)\b.*$", text, flags=re.MULTILINE)
    lines = text.strip().splitlines()
    return raised[-1] if raised else (lines[-1] if lines else "unknown error")
