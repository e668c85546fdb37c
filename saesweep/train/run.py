"""Run a planned sweep: one job per group, then the results table and report."""

from __future__ import annotations

import re
from pathlib import Path

from saesweep.errors import EXIT_USER_ERROR, UserError
from saesweep.evaluate.report import write_report
from saesweep.executors import GroupOutcome, RayConfig, SlurmConfig, run_groups
from saesweep.train.group_job import GroupJob
from saesweep.train.sweep import Group


def run_sweep(
    sweep_dir: Path, groups: list[Group], executor: str, slurms: list[SlurmConfig], ray: RayConfig
) -> int:
    """Run every group (`slurms`: each group's resolved request), then the report.
    Exit status: 0 when every group finished; 2 when a group stopped on the user's input (a
    corrupt shard, a bad value: the one-sentence error is printed), else 1."""
    print(f"sweep directory: {sweep_dir}")
    outcomes = run_groups(
        GroupJob(sweep_dir),
        groups,
        executor=executor,
        log_dir=sweep_dir / "logs",
        slurm=slurms,
        poll_s=2.0,
        tasks=[g.cfgs[0].procs_per_group for g in groups],
        ray=ray,
    )
    write_report(sweep_dir, health=groups[0].cfgs[0].health)
    failed = [o for o in outcomes if o.status != "done"]
    reasons = [failure_reason(o) for o in failed]
    for o, reason in zip(failed, reasons, strict=True):
        print(f"group {o.index} failed: {reason}\n  logs: {o.stdout} {o.stderr}")
    if not failed:
        return 0
    return EXIT_USER_ERROR if all(r.startswith(USER_ERROR) for r in reasons) else 1


USER_ERROR = f"{UserError.__module__}.{UserError.__name__}"
"""How a UserError's last line starts in a job's traceback."""


def failure_reason(outcome: GroupOutcome) -> str:
    """The last exception line of the job's stderr (or of its error text)."""
    text = outcome.error
    if outcome.stderr is not None and Path(outcome.stderr).exists():
        text = Path(outcome.stderr).read_text(errors="replace") + "\n" + text
    raised = re.findall(r"^[\w.]*(?:Error|Exception|Interrupt)\b.*$", text, flags=re.MULTILINE)
    lines = text.strip().splitlines()
    return raised[-1] if raised else (lines[-1] if lines else "unknown error")
