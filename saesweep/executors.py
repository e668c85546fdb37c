"""Run one job per parallel group: a Slurm job array, local processes, or in-process (debug).

`fn(group)` runs once per group. `fn` and the groups must be picklable for the Slurm and local
executors (submitit pickles them into `log_dir`). `fn` may be a
`submitit.helpers.Checkpointable`: on preemption or before the time limit Slurm sends SIGUSR2,
submitit calls `fn.checkpoint(group)`, stores the returned DelayedSubmission and requeues the
array task, which then resumes from that state.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import submitit

from saesweep.configtools import above, at_least
from saesweep.errors import UserError
from saesweep.interrupt import raising
from saesweep.outcomes import GroupOutcome, peer_gone

Executor = Literal["slurm", "ray", "local", "debug"]
CLUSTERS = ("slurm", "ray")
"""Executors whose jobs run elsewhere, sized by their request (not checked on this machine)."""
ACTIVE_SLURM_STATES = {"RUNNING", "COMPLETING"}
NEVER_STARTS = {
    "PartitionConfig": "more than the partition's nodes have or allow",
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionTimeLimit": "a time limit above the partition's",
    "InvalidAccount": "an account the cluster does not know",
    "InvalidQOS": "a QOS the cluster does not know",
    "BadConstraints": "node features no node has",
    "QOSMaxCpuPerJobLimit": "more CPUs than the QOS allows a job",
    "QOSMaxGRESPerJob": "more GPUs than the QOS allows a job",
    "QOSMaxMemoryPerJob": "more memory than the QOS allows a job",
    "AssocMaxCpuPerJobLimit": "more CPUs than the account allows a job",
    "AssocMaxMemPerJob": "more memory than the account allows a job",
}
"""squeue's reasons for a pending job that waiting will not clear, and what the job asked."""


LOCAL_TIMEOUT_MIN = 7 * 24 * 60
"""Local jobs have no time limit of their own (submitit's local default is a few minutes)."""


@dataclasses.dataclass(frozen=True)
class SlurmConfig:
    """Where and how large each job is (one job per training group or collection machine)."""

    acct: str | None = None
    """Slurm account; when set, each job runs on Slurm (one job array per command)."""
    partition: str | None = None
    """Slurm partition; the cluster's default partition when unset."""
    qos: str | None = None
    """Slurm quality of service."""
    n_hours: float = dataclasses.field(default=1.0, metadata=above(0))
    """Time limit of each job in hours; jobs checkpoint and requeue shortly before it."""
    gpus_per_group: int | None = dataclasses.field(default=None, metadata=at_least(0, True))
    """GPUs per job; default one per process of the group, or 0 when the device is 'cpu'."""
    nodes_per_group: int = dataclasses.field(default=1, metadata=at_least(1))
    """Nodes per job: a group's procs_per_group processes are spread evenly over them."""
    cpus_per_group: int | None = dataclasses.field(default=None, metadata=at_least(1, True))
    """CPU cores per job; default sized to the job (docs/sweeps.md#slurm)."""
    mem_gb: float | None = dataclasses.field(default=None, metadata=above(0, True))
    """Host memory per job in GB; default sized to the job (docs/sweeps.md#slurm)."""
    exclude: str | None = None
    """Nodes to avoid, as a Slurm node list (e.g. 'node[01-03]')."""
    constraint: str | None = None
    """Slurm node feature constraint (e.g. 'a100')."""
    setup: tuple[str, ...] = ()
    """Shell lines run in the job before Python starts (e.g. 'module load cuda')."""
    extra: tuple[str, ...] = ()
    """Further sbatch options as KEY=VALUE (e.g. 'reservation=r1'), passed as --KEY=VALUE."""


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """The Ray cluster that runs each job with --executor ray (docs/cluster.md#ray); each job
    asks it for the CPUs, GPUs and memory it would ask Slurm for."""

    address: str | None = None
    """Ray cluster to join: 'auto' (the cluster this machine belongs to) or host:port; unset
    starts a Ray on this machine for this command."""
    resources: str | None = None
    """Custom Ray resources per process, as a JSON object (e.g. '{"a100": 1}')."""
    max_retries: int = dataclasses.field(default=3, metadata=at_least(0))
    """Times a job is started again after one of its workers or nodes was lost; it resumes
    from its last committed state."""


def run_groups(
    fn: Callable[[Any], Any],
    groups: Sequence[Any],
    *,
    executor: Executor,
    log_dir: Path,
    slurm: SlurmConfig | Sequence[SlurmConfig],
    max_concurrent: int | None = None,
    poll_s: float = 5.0,
    tasks: Sequence[int] | None = None,
    ray: RayConfig | None = None,
    unit: str = "group",
    report: Callable[[], list[str]] | None = None,
) -> list[GroupOutcome]:
    """Run `fn(group)` for every group as its own job, wait for all, return outcomes in order.

    `slurm` is one config for every group or one per group (groups with equal configs share a
    job array), its sizes resolved: also what each job asks Ray for. `tasks`: processes per
    group (default 1 each); a job of several runs `fn` in each, with the task's
    torch.distributed environment (rank 0's result is the group's). A failing group does not
    stop the others; its outcome carries the error and log paths. `max_concurrent` caps jobs
    running at once (default: all for Slurm and Ray, 1 for local). `unit` names a job in
    messages ('group', 'machine'). `report`: lines on the running groups' progress, shown
    under the jobs' count while they run.
    """
    tasks = list(tasks) if tasks is not None else [1] * len(groups)
    slurms = [slurm] * len(groups) if isinstance(slurm, SlurmConfig) else list(slurm)
    if executor == "debug":
        if max(tasks) > 1:
            raise UserError("the debug executor runs one process per group: use --executor local")
        return [_run_in_process(fn, index, group) for index, group in enumerate(groups)]
    log_dir = Path(log_dir)
    if executor == "ray":
        board = _Board(report)

        def progress(counts: dict[str, int], final: bool) -> None:
            board.show(_count_line(counts, len(groups), unit), final)

        ray = ray or RayConfig()
        return _run_on_ray(fn, groups, log_dir, slurms, tasks, ray, poll_s, unit, progress)
    if executor == "slurm":
        jobs = _submit_slurm_arrays(fn, groups, log_dir, slurms, tasks, max_concurrent)
        with _cancelling_slurm_jobs(jobs):
            check = lambda: _check_startable(jobs, slurms, unit)  # noqa: E731
            return _wait(jobs, poll_s, check=check, unit=unit, report=report)
    if executor == "local":
        local = submitit.LocalExecutor(folder=log_dir)
        local.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
        n_tasks = dict(zip(map(id, groups), tasks, strict=True))

        def submit_group(group):
            local.update_parameters(tasks_per_node=n_tasks[id(group)])
            return local.submit(fn, group)

        submit = _cancellable(submit_group, log_dir / CONTROLLER_LOG)
        jobs: list[submitit.Job] = []
        with _stopping_local_jobs(jobs):
            return _wait(
                jobs,
                poll_s,
                queued=list(groups),
                submit=submit,
                max_running=max_concurrent or 1,
                unit=unit,
                report=report,
            )
    raise ValueError(f"Unknown executor {executor!r}: use 'slurm', 'ray', 'local' or 'debug'.")


def default_cpus(wanted: int, node_cpus: int | None, procs_per_node: int) -> int:
    """A process's default CPU request: `wanted`, at most its share of the largest node."""
    return wanted if node_cpus is None else max(1, min(wanted, node_cpus // procs_per_node))


def largest_node_cpus(executor: str, slurm: SlurmConfig, ray: RayConfig) -> int | None:
    """The most CPUs a node that would run the jobs has (Slurm: the partition's nodes, from
    sinfo; Ray: the cluster's alive nodes); None when unknown or running here."""
    if executor == "ray":
        from saesweep.ray_jobs import largest_node_cpus as ray_node_cpus

        return ray_node_cpus(ray.address)
    if executor != "slurm":
        return None
    command = ["sinfo", "-h", "-N", "-o", "%c %P"] + (
        ["-p", slurm.partition] * bool(slurm.partition)
    )
    try:
        lines = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split() for line in lines.splitlines() if len(line.split()) == 2]
    cpus = [int(c) for c, part in rows if c.isdigit() and (slurm.partition or part.endswith("*"))]
    return max(cpus, default=None)


def _run_on_ray(fn, groups, log_dir, slurms, tasks, ray: RayConfig, poll_s, unit, progress):
    from saesweep.ray_jobs import ProcessRequest, parse_custom, run_on_ray

    custom = parse_custom(ray.resources)
    requests = [
        ProcessRequest(
            cpus=float(s.cpus_per_group or 1),
            gpus=(s.gpus_per_group or 0) / n,
            memory_gb=s.mem_gb * s.nodes_per_group / n if s.mem_gb else None,
            custom=custom,
        )
        for s, n in zip(slurms, tasks, strict=True)
    ]
    described = [describe_request(s, "ray", custom) for s in slurms]
    return run_on_ray(fn, groups, address=ray.address, requests=requests, tasks=tasks,
                      described=described, log_dir=log_dir, max_retries=ray.max_retries,
                      poll_s=poll_s, unit=unit, progress=progress)  # fmt: skip


CONTROLLER_LOG = "local-controllers.log"
"""Where submitit's local controllers write (their traceback when a Ctrl-C stops them)."""


def _cancellable(submit: Callable[[Any], submitit.Job], log: Path) -> Callable[[Any], submitit.Job]:
    """`submit`, starting submitit's local controller with SIGINT's default action, so that
    job.cancel() (a SIGINT to the controller, which then stops its worker) works, and with its
    output to `log`, not the terminal. A driver that
    ignores SIGINT (started in the background by a non-interactive shell, as CI scripts and
    `cmd &` in a script do) would otherwise pass the ignoring on: exec keeps an ignored
    signal ignored, but resets a caught one to its default, so SIGINT is caught while the
    controller is started, then restored."""

    def submit_cancellable(group: Any) -> submitit.Job:
        in_main = threading.current_thread() is threading.main_thread()
        ignored = in_main and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        if ignored:
            signal.signal(signal.SIGINT, lambda signum, frame: None)  # ignored here, too
        try:
            with _output_to(log):
                return submit(group)
        finally:
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)

    return submit_cancellable


@contextlib.contextmanager
def _output_to(path: Path):
    """Processes started inside write their stdout and stderr to `path` (file descriptors 1
    and 2 point there meanwhile)."""
    sys.stdout.flush()
    sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in enumerate(saved, start=1):
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def _stopping_local_jobs(jobs: list[submitit.Job]):
    """Stop the running local jobs (SIGINT: they commit their state) when the driver is
    interrupted or terminated (SIGTERM raises interrupt.Interrupted), and wait for them to end
    before going on; a worker would otherwise train on alone."""
    try:
        with raising((signal.SIGTERM,)):
            yield
    except BaseException:
        running = [job for job in jobs if not job.done()]
        for job in running:
            job.cancel()
        for job in running:
            while not job.done():
                time.sleep(0.1)
        raise


def _slurm_parameters(slurm: SlurmConfig, array_parallelism: int, tasks: int) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one job of `tasks` processes (the sizes already
    resolved; GPUs, CPUs and memory per node)."""
    nodes = slurm.nodes_per_group
    if tasks % nodes:
        raise UserError(f"procs_per_group={tasks} does not split evenly over {nodes} nodes")
    gpus = slurm.gpus_per_group
    params = {
        "slurm_account": slurm.acct,
        "slurm_partition": slurm.partition,
        "slurm_qos": slurm.qos,
        "slurm_exclude": slurm.exclude,
        "slurm_constraint": slurm.constraint,
        "slurm_setup": list(slurm.setup) or None,
        "slurm_additional_parameters": dict(_key_value(item) for item in slurm.extra) or None,
        "timeout_min": max(1, round(slurm.n_hours * 60)),
        "nodes": nodes,
        "tasks_per_node": tasks // nodes,
        "gpus_per_node": None if gpus is None else -(-gpus // nodes),
        "cpus_per_task": slurm.cpus_per_group,
        "mem_gb": slurm.mem_gb,
        "slurm_array_parallelism": array_parallelism,
    }
    return {key: value for key, value in params.items() if value is not None}


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--slurm-extra {item!r} is not KEY=VALUE (e.g. reservation=r1)")
    return key.strip().removeprefix("--"), value.strip()


def _run_in_process(fn: Callable[[Any], Any], index: int, group: Any) -> GroupOutcome:
    print(f"[launch] debug: running group {index} in this process", flush=True)
    try:
        return GroupOutcome(index, "done", result=fn(group), job_id="debug")
    except Exception:
        return GroupOutcome(index, "failed", error=traceback.format_exc(), job_id="debug")


def _submit_slurm_arrays(
    fn: Callable[[Any], Any],
    groups: Sequence[Any],
    log_dir: Path,
    slurms: list[SlurmConfig],
    tasks: list[int],
    max_concurrent: int | None,
) -> list[submitit.Job]:
    """One job array per distinct Slurm config and task count; the jobs in group order."""
    by_config: dict[tuple[SlurmConfig, int], list[int]] = {}
    for index, key in enumerate(zip(slurms, tasks, strict=True)):
        by_config.setdefault(key, []).append(index)
    jobs: dict[int, submitit.Job] = {}
    for (slurm, n_tasks), indices in by_config.items():
        chosen = [groups[i] for i in indices]
        array = _submit_slurm_array(fn, chosen, log_dir, slurm, n_tasks, max_concurrent)
        jobs.update(zip(indices, array, strict=True))
    return [jobs[index] for index in range(len(groups))]


def _submit_slurm_array(
    fn: Callable[[Any], Any],
    groups: Sequence[Any],
    log_dir: Path,
    slurm: SlurmConfig,
    tasks: int,
    max_concurrent: int | None,
) -> list[submitit.Job]:
    executor = submitit.AutoExecutor(folder=log_dir, cluster="slurm")
    executor.update_parameters(**_slurm_parameters(slurm, max_concurrent or len(groups), tasks))
    try:
        jobs = executor.map_array(fn, list(groups))
    except submitit.core.utils.FailedJobError as err:
        reason = str(err).strip().splitlines()[-1]
        raise UserError(
            f"Slurm refused the job array ({reason}); check the --slurm-* flags"
        ) from None
    print(f"[launch] submitted Slurm job array {jobs[0].job_id.split('_')[0]}", flush=True)
    return jobs


def _wait(
    jobs: list[submitit.Job],
    poll_s: float,
    queued: list[Any] | None = None,
    submit: Callable[[Any], submitit.Job] | None = None,
    max_running: int = 1,
    check: Callable[[], None] | None = None,
    unit: str = "group",
    report: Callable[[], list[str]] | None = None,
) -> list[GroupOutcome]:
    """Poll `jobs` until all have ended, submitting `queued` groups while fewer than
    `max_running` run, calling `check` (which may raise) at each poll; outcomes come back in
    submission order."""
    queued = queued or []
    n_groups = len(jobs) + len(queued)
    outcomes: dict[int, GroupOutcome] = {}
    board = _Board(report)
    while len(outcomes) < n_groups:
        for index, job in enumerate(jobs):
            if index not in outcomes and job.done():
                outcomes[index] = _outcome(index, job)
        n_running = len(jobs) - len(outcomes)
        while queued and submit is not None and n_running < max_running:
            jobs.append(submit(queued.pop(0)))
            n_running += 1
        counts = collections.Counter(outcome.status for outcome in outcomes.values())
        counts.update(_activity(job) for index, job in enumerate(jobs) if index not in outcomes)
        counts["pending"] += len(queued)
        board.show(_count_line(counts, n_groups, unit), final=len(outcomes) == n_groups)
        if len(outcomes) < n_groups:
            if check is not None:
                check()
            time.sleep(poll_s)
    return [outcomes[index] for index in range(n_groups)]


def _outcome(index: int, job: submitit.Job) -> GroupOutcome:
    """How the job ended; for a job of several tasks, the first task that failed of its own
    accord (not because a peer went away), with that task's logs."""
    tasks = [job.task(k) for k in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    errors = [task.exception() for task in tasks]
    failed = [(task, str(e)) for task, e in zip(tasks, errors, strict=True) if e is not None]
    if not failed:
        return GroupOutcome(index, "done", result=tasks[0].result(), **_logs(job, tasks[0]))
    task, error = next((f for f in failed if not peer_gone(f[1])), failed[0])
    if len(tasks) > 1:
        error = f"rank {tasks.index(task)} of {len(tasks)}: {error}"
    return GroupOutcome(index, "failed", error=error, **_logs(job, task))


def _logs(job: submitit.Job, task: submitit.Job) -> dict[str, Any]:
    return {"job_id": job.job_id, "stdout": task.paths.stdout, "stderr": task.paths.stderr}


def _activity(job: submitit.Job) -> str:
    """'running' or 'pending' for an unfinished job (best effort where sacct is unavailable)."""
    state = job.state.upper()
    started = state == "UNKNOWN" and job.paths.stdout.exists()
    return "running" if state in ACTIVE_SLURM_STATES or started else "pending"


def _count_line(counts: dict[str, int], n_jobs: int, unit: str) -> str:
    """'[launch] N groups: a pending, b running, c done, d failed'."""
    line = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("pending", "running", "done", "failed"))
    return f"[launch] {n_jobs} {unit}s: {line}"


REPORT_EVERY_S = 15.0
"""Off a terminal, report lines are printed at most this often (and once more at the end)."""


class _Board:
    """The jobs' count and `report`'s lines while jobs run. On a terminal they are redrawn in
    place; elsewhere the count is printed when it changes, and the report's lines when they
    changed, at most every REPORT_EVERY_S and at the end."""

    def __init__(self, report: Callable[[], list[str]] | None):
        self.report = report
        self.tty = sys.stdout.isatty()
        self.count, self.lines, self.drawn = "", [], 0
        self.printed_at = -REPORT_EVERY_S

    def show(self, count: str, final: bool) -> None:
        lines = self.report() if self.report is not None else []
        if self.tty:
            if [count, *lines] != [self.count, *self.lines]:
                up = f"\x1b[{self.drawn}F\x1b[J" if self.drawn else ""
                print(up + "\n".join([count, *lines]), flush=True)
                self.count, self.lines, self.drawn = count, lines, 1 + len(lines)
            return
        if count != self.count:
            print(count, flush=True)
            self.count = count
        due = final or time.monotonic() - self.printed_at >= REPORT_EVERY_S
        if lines and lines != self.lines and due:
            print("\n".join(lines), flush=True)
            self.lines, self.printed_at = lines, time.monotonic()


@contextlib.contextmanager
def _cancelling_slurm_jobs(jobs: list[submitit.Job]):
    """Cancel the submitted jobs when the launch ends on the user's error (a job that can
    never start); an interrupted driver leaves them running, as Slurm jobs outlive it."""
    try:
        yield
    except UserError:
        for job in jobs:
            job.cancel(check=False)
        raise


def _check_startable(jobs: list[submitit.Job], slurms: list[SlurmConfig], unit: str) -> None:
    """Raise UserError when one of `jobs` is pending for a reason waiting will not clear."""
    index_of = {job.job_id.split("_")[0]: i for i, job in reversed(list(enumerate(jobs)))}
    try:
        listed = subprocess.run(
            ["squeue", "-h", "-j", ",".join(index_of), "-o", "%i|%T|%r"],
            capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return
    for line in listed.splitlines():
        job_id, state, reason = (line.split("|") + ["", ""])[:3]
        if state == "PENDING" and reason in NEVER_STARTS:
            index = index_of.get(job_id.split("_")[0], 0)
            request = describe_request(slurms[index], "slurm")
            raise UserError(
                f"Slurm will never start {unit} {index}'s job {job_id} (pending for "
                f"{reason}: {NEVER_STARTS[reason]}); it asks for {request}: "
                "change --cpus-per-group, --gpus-per-group, --mem-gb, --slurm-partition, "
                "--slurm-qos or --slurm-acct (its jobs were cancelled)"
            )


def describe_request(
    slurm: SlurmConfig, engine: str, custom: tuple[tuple[str, float], ...] = ()
) -> str:
    """What each job asks Slurm or Ray (`engine`) for, in words, as the plan prints it and
    the errors about a job that can never start say it (`custom`: Ray resources per process)."""
    cpus = f"{slurm.gpus_per_group or 0} GPU, {slurm.cpus_per_group or 'default'} CPUs per process"
    if engine == "ray":
        mem = f"{slurm.mem_gb:g} GB" if slurm.mem_gb else "no memory reservation"
        return f"{cpus}, {mem}" + "".join(f", {v:g} {name} per process" for name, v in custom)
    mem = f"{slurm.mem_gb:g} GB" if slurm.mem_gb else "the partition's default memory"
    where = [f"account {slurm.acct}"] * bool(slurm.acct)
    where += [f"partition {slurm.partition}"] * bool(slurm.partition)
    return f"{cpus}, {mem} per node, {slurm.nodes_per_group} node(s), {slurm.n_hours:g} h" + (
        f" ({', '.join(where)})" if where else ""
    )
