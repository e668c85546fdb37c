"""Run a planned sweep: one job per group, then the results table and report."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from saesweep.errors import EXIT_USER_ERROR, UserError
from saesweep.evaluate.report import write_report
from saesweep.executors import SlurmConfig, run_groups
from saesweep.interrupt import Interrupted, exit_status, raising
from saesweep.outcomes import GroupOutcome
from saesweep.train.checkpoint import saved_state
from saesweep.train.config import SweepConfig
from saesweep.train.group_job import GroupJob
from saesweep.train.layout import group_finished, state_dir, wait_stopped
from saesweep.train.progress import ProgressReport
from saesweep.train.sweep import Group


def run_sweep(
    sweep_dir: Path,
    groups: list[Group],
    executor: str,
    slurms: list[SlurmConfig],
    sweep_cfg: SweepConfig,
) -> int:
    """Run every group (`slurms`: each group's resolved request), then the report.
    Exit status: 0 when every group finished; 2 when a group stopped on the user's input (a
    corrupt shard, a bad value: the one-sentence error is printed); 128 + the signal when
    SIGINT or SIGTERM stopped train.py or a group (130 for Ctrl-C, 143 for SIGTERM: one line
    with the step and the command that resumes; Slurm jobs are left running), else 1."""
    print(f"sweep directory: {sweep_dir}")
    try:
        with raising():
            outcomes = run_groups(
                GroupJob(sweep_dir, sweep_cfg),
                groups,
                executor=executor,
                log_dir=sweep_dir / "logs",
                slurm=slurms,
                poll_s=2.0,
                tasks=[g.config.procs_per_group for g in groups],
                report=ProgressReport(sweep_dir, groups),
                ray=sweep_cfg.ray,
            )
    except KeyboardInterrupt as stop:
        if executor == "slurm":
            print(
                "stopped waiting; the Slurm jobs go on (scancel stops them, and then "
                f"uv run train.py --resume {sweep_dir} continues them)",
                flush=True,
            )
            return exit_status(stop)
        return interrupted(sweep_dir, groups, exit_status(stop))
    failed = [o for o in outcomes if o.status != "done"]
    reasons = [failure_reason(o) for o in failed]
    stopped = [interrupt_status(r) for r in reasons]
    if not any(stopped):
        write_report(sweep_dir, health=sweep_cfg.health)
    for o, reason, status in zip(failed, reasons, stopped, strict=True):
        if status is None:
            print(f"group {o.index} failed: {reason}\n  logs: {o.stdout} {o.stderr}")
    if any(stopped):
        return interrupted(sweep_dir, groups, next(s for s in stopped if s))
    if not failed:
        return 0
    return EXIT_USER_ERROR if all(r.startswith(USER_ERROR) for r in reasons) else 1


USER_ERROR = f"{UserError.__module__}.{UserError.__name__}"
"""How a UserError's last line starts in a job's traceback."""


def failure_reason(outcome: GroupOutcome) -> str:
    """The last exception line of the job's stderr (or of its error text); a stop signal's
    line wherever it is, as an error raised while a stop unwound (in a cleanup) is the stop's."""
    text = outcome.error
    if outcome.stderr is not None and Path(outcome.stderr).exists():
        text = Path(outcome.stderr).read_text(errors="replace") + "\n" + text
    raised = re.findall(
        r"^[\w.]*(?:Error|Exception|Interrupt|Interrupted)\b.*$", text, flags=re.MULTILINE
    )
    stops = [line for line in raised if interrupt_status(line) is not None]
    lines = text.strip().splitlines()
    return (stops or raised or lines or ["unknown error"])[-1]


def interrupt_status(reason: str) -> int | None:
    """The exit status of a group whose failure reason is `reason` when a signal stopped it
    (its job raised Interrupted or KeyboardInterrupt), else None."""
    name, _, signal_name = reason.partition(": ")
    if name == f"{Interrupted.__module__}.{Interrupted.__name__}":
        return Interrupted(signal.Signals[signal_name]).exit_status
    return Interrupted().exit_status if name == "KeyboardInterrupt" else None


def interrupted(sweep_dir: Path, groups: list[Group], status: int) -> int:
    """Say, in one line, where the interrupted groups stopped (their committed step) and how
    to go on; returns `status`."""
    stops = []
    for group in groups:
        wait_stopped(sweep_dir, group.index)
        state = saved_state(state_dir(sweep_dir, group.index))
        if state is not None and not group_finished(sweep_dir, group):
            stops.append((group.index, f"step {state['step']} of {group.config.total_steps}"))
    if len(stops) == 1:
        where = f"at {stops[0][1]}"
    else:
        where = "at " + ", ".join(f"{s} (group {i})" for i, s in stops) if stops else "early"
    print(f"interrupted {where}; resume with: uv run train.py --resume {sweep_dir}", flush=True)
    return status
