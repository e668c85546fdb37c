"""Jobs on a Ray cluster: one Ray task per process of a group, sized like the Slurm request,
started again as a whole when a worker or node is lost, cancelled with the sweep.

Each task runs `fn(group)` in a fresh worker (max_calls=1) with the driver's Python, as a
Slurm job does (every node sees the project and its environment at the same path), with its
output in `log_dir/ray_<index>_<attempt>_<rank>.out|.err`. A group of several processes is a
placement group whose ranks meet through torch.distributed's file rendezvous in `log_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from saesweep.errors import UserError
from saesweep.outcomes import GroupOutcome, peer_gone

MISSING = (
    "the ray executor needs Ray, an optional extra: run `uv sync --extra ray` "
    "(or `pip install 'saesweep[ray]'`)"
)
RENDEZVOUS_ENV = "SAESWEEP_RENDEZVOUS"
"""Set in a process of a several-process job with RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE: the group's file:// rendezvous (train/distributed.py reads them)."""
CPUS_ENV = "SAESWEEP_CPUS"
"""The CPUs Ray gave a process: its torch threads."""
CANCEL_GRACE_S = 60.0
"""How long cancelled tasks get to commit their state (a KeyboardInterrupt in the task)
before their workers are killed."""


@dataclasses.dataclass(frozen=True)
class ProcessRequest:
    """What one process of a job asks Ray for."""

    cpus: float
    gpus: float
    memory_gb: float | None
    custom: tuple[tuple[str, float], ...] = ()

    def resources(self) -> dict[str, float]:
        """As a placement-group bundle (Ray's resource names; memory in bytes)."""
        out = {"CPU": self.cpus, **dict(self.custom)}
        if self.gpus:
            out["GPU"] = self.gpus
        if self.memory_gb:
            out["memory"] = self.memory_gb * 2**30
        return out


def import_ray():
    """The ray module, its workers set to run this Python (not a fresh `uv run` environment,
    which Ray would otherwise build on each node for a driver started by `uv run`)."""
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    try:
        import ray
    except ImportError:
        raise UserError(MISSING) from None
    return ray


def connect(address: str | None):
    """Join the Ray cluster at `address` ('auto' or host:port), or start one on this machine
    for this command when None; returns the ray module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    options: dict[str, Any] = {
        "runtime_env": {"py_executable": sys.executable},
        "log_to_driver": False,
        "logging_level": "WARNING",
    }
    if address is None:
        options |= {"address": "local", "include_dashboard": False}
    try:
        ray.init(address=address, **options) if address else ray.init(**options)
    except (ConnectionError, RuntimeError) as err:
        where = f"at {address}" if address else "on this machine"
        raise UserError(
            f"cannot reach a Ray cluster {where} ({str(err).splitlines()[0]}); start one with "
            "`ray start --head` or fix --ray-address"
        ) from None
    return ray


def largest_node_cpus(address: str | None) -> int:
    """The most CPUs any alive node of the cluster has."""
    if address is None:
        return len(os.sched_getaffinity(0))
    return int(max(node["Resources"].get("CPU", 0) for node in alive_nodes(connect(address))))


def alive_nodes(ray) -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


def parse_custom(resources: str | None) -> tuple[tuple[str, float], ...]:
    """--ray-resources, a JSON object of custom resources per process."""
    if not resources:
        return ()
    try:
        parsed = json.loads(resources)
        if not isinstance(parsed, dict):
            raise ValueError
        return tuple((str(name), float(value)) for name, value in parsed.items())
    except (ValueError, TypeError):
        raise UserError(
            f"--ray-resources {resources!r} is not a JSON object of numbers "
            "(e.g. '{\"a100\": 1}')"
        ) from None


def check_feasible(
    ray, requests: Sequence[ProcessRequest], tasks: Sequence[int], described: Sequence[str], unit
):
    """Raise UserError for the first job that no node of the cluster could ever run
    (`described`: each job's request in words)."""
    nodes = [node["Resources"] for node in alive_nodes(ray)]
    for index, (request, n_tasks) in enumerate(zip(requests, tasks, strict=True)):
        wanted = request.resources()
        fits = [all(node.get(k, 0) >= v for k, v in wanted.items()) for node in nodes]
        total = {k: sum(node.get(k, 0) for node in nodes) for k in wanted}
        if not any(fits) or any(total[k] < v * n_tasks for k, v in wanted.items()):
            largest = max(nodes, key=lambda node: node.get("CPU", 0))
            raise UserError(
                f"{unit} {index} asks Ray for {described[index]}, in {n_tasks} process(es), "
                f"which no node of the cluster ({len(nodes)} nodes; the largest has "
                f"{node_resources(largest, request)}) can run; lower --cpus-per-group, "
                "--gpus-per-group or --mem-gb, or change --ray-resources"
            )


def node_resources(node: dict[str, float], request: ProcessRequest) -> str:
    """A node's CPUs, GPUs, memory and the custom resources `request` names, in words."""
    memory = node.get("memory", 0) / 2**30
    custom = "".join(f", {node.get(name, 0):g} {name}" for name, _ in request.custom)
    return f"{node.get('CPU', 0):g} CPUs, {node.get('GPU', 0):g} GPUs, {memory:.1f} GB{custom}"


@dataclasses.dataclass
class Attempt:
    """One start of one job: its placement group (several processes) and rank tasks."""

    index: int
    number: int
    refs: list
    placement: Any = None
    logs: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)


def run_process(fn, group, place: dict[str, str], out: str, err: str):
    """One process of a job, inside its Ray worker: output to its log files, its place in the
    group (RANK, WORLD_SIZE, ... and the CPUs it was given), then `fn(group)`; the traceback
    of a failure in its log."""
    import torch

    with open(out, "a") as out_file, open(err, "a") as err_file:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out_file.fileno(), 1)
        os.dup2(err_file.fileno(), 2)
    os.environ |= place
    torch.set_num_threads(int(place[CPUS_ENV]))
    print(f"[ray] rank {place['RANK']} of {place['WORLD_SIZE']}, pid {os.getpid()}", flush=True)
    try:
        return fn(group)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise


SYSTEM_FAILURES = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError")
"""Ray's errors for a process lost under a task (not an error of the task's own code)."""


class RayJobs:
    """Jobs of one command on a connected cluster: started, watched, started again when
    lost, cancelled together."""

    def __init__(self, ray, fn, groups, requests, tasks, log_dir: Path, unit: str):
        self.ray, self.fn, self.groups, self.unit = ray, fn, list(groups), unit
        self.requests, self.tasks, self.log_dir = list(requests), list(tasks), log_dir
        self.attempts: dict[int, Attempt] = {}

    def start(self, index: int, number: int) -> None:
        """Submit attempt `number` of job `index`: its tasks, in a placement group when
        several."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        request, n_tasks = self.requests[index], self.tasks[index]
        attempt = Attempt(index, number, [])
        if n_tasks > 1:
            bundles = [request.resources() for _ in range(n_tasks)]
            attempt.placement = placement_group(bundles, strategy="PACK")
        rendezvous = self.log_dir / f"ray_{index}_{number}.rendezvous"
        rendezvous.unlink(missing_ok=True)
        remote = self.ray.remote(max_calls=1)(run_process)  # a fresh worker per process
        for rank in range(n_tasks):
            out, err = (self.log_dir / f"ray_{index}_{number}_{rank}.{k}" for k in ("out", "err"))
            attempt.logs.append((out, err))
            options = task_options(request)
            if attempt.placement is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    attempt.placement, placement_group_bundle_index=rank
                )
            place = {
                "RANK": str(rank),
                "WORLD_SIZE": str(n_tasks),
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
                CPUS_ENV: str(max(1, int(request.cpus))),
            }
            if n_tasks > 1:
                place[RENDEZVOUS_ENV] = f"file://{rendezvous}"
            args = (self.fn, self.groups[index], place, str(out), str(err))
            attempt.refs.append(remote.options(**options).remote(*args))
        self.attempts[index] = attempt

    def run(self, max_retries: int, poll_s: float, progress) -> list[GroupOutcome]:
        """Start every job, wait for all (a lost job started again up to max_retries times),
        return their outcomes in order."""
        for index in range(len(self.groups)):
            self.start(index, 0)
        print(f"[launch] {len(self.groups)} {self.unit}s submitted to Ray", flush=True)
        outcomes: dict[int, GroupOutcome] = {}
        while len(outcomes) < len(self.groups):
            for index, attempt in list(self.attempts.items()):
                end = ended(self.ray, attempt)
                if end is None:
                    continue
                stop(self.ray, attempt, force=True)
                del self.attempts[index]
                status, result, error, rank = end
                if status == "lost" and attempt.number < max_retries:
                    print(f"[launch] {self.unit} {index}: {error}; starting it again", flush=True)
                    self.start(index, attempt.number + 1)
                    continue
                outcomes[index] = outcome(attempt, status, result, error, rank)
            progress(self.counts(outcomes), len(outcomes) == len(self.groups))
            if len(outcomes) < len(self.groups):
                time.sleep(poll_s)
        return [outcomes[index] for index in range(len(self.groups))]

    def counts(self, outcomes: dict[int, GroupOutcome]) -> dict[str, int]:
        """Jobs per state; a job runs once its first process has opened its log."""
        running = sum(a.logs[0][0].exists() for a in self.attempts.values())
        counts = {"pending": len(self.attempts) - running, "running": running}
        return counts | {
            s: sum(o.status == s for o in outcomes.values()) for s in ("done", "failed")
        }

    def cancel(self) -> None:
        """Cancel every running job: a KeyboardInterrupt in each task first (it commits its
        state), its worker killed after CANCEL_GRACE_S."""
        attempts = list(self.attempts.values())
        for attempt in attempts:
            stop(self.ray, attempt, force=False)
        refs = [ref for attempt in attempts for ref in attempt.refs]
        self.ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
        for attempt in attempts:
            stop(self.ray, attempt, force=True)


def task_options(request: ProcessRequest) -> dict[str, Any]:
    """Ray task options of one process: its resources, no retry of its own (a lost process
    restarts its whole job)."""
    options = {"num_cpus": request.cpus, "num_gpus": request.gpus, "max_retries": 0}
    options["resources"] = dict(request.custom)
    if request.memory_gb:
        options["memory"] = int(request.memory_gb * 2**30)
    return options


def ended(ray, attempt: Attempt) -> tuple[str, Any, str, int] | None:
    """None while the attempt runs; else (status, result, error, rank of the error): 'done',
    'lost' (a worker or node went away: start again) or 'failed'."""
    ready, _ = ray.wait(attempt.refs, num_returns=len(attempt.refs), timeout=0)
    failures = []
    for rank, ref in enumerate(attempt.refs):
        if ref in ready:
            try:
                ray.get(ref)
            except Exception as err:  # Ray wraps the task's own exception
                failures.append((rank, err))
    if not failures:
        return None if len(ready) < len(attempt.refs) else ("done", ray.get(attempt.refs[0]), "", 0)
    lost = [f for f in failures if type(f[1]).__name__ in SYSTEM_FAILURES]
    if lost:
        return "lost", None, str(lost[0][1]).splitlines()[0], lost[0][0]
    if len(ready) < len(attempt.refs) and any(peer_gone(str(e)) for _, e in failures):
        return None  # a peer's loss shows as a collective error first: wait for every rank
    rank, err = failures[0]
    cause = getattr(err, "cause", None) or err
    return "failed", None, f"{type(cause).__name__}: {cause}", rank


def outcome(attempt: Attempt, status: str, result, error: str, rank: int) -> GroupOutcome:
    out, err = attempt.logs[rank]
    if len(attempt.refs) > 1 and status != "done":
        error = f"rank {rank} of {len(attempt.refs)}: {error}"
    job_id = f"ray_{attempt.index}_{attempt.number}"
    status = "done" if status == "done" else "failed"
    return GroupOutcome(attempt.index, status, result, error, job_id, out, err)


def stop(ray, attempt: Attempt, force: bool) -> None:
    """Cancel the attempt's tasks that have not ended (never an ended one: Ray 2.60 aborts the
    driver on a forced cancel of a task that a first cancel already ended)."""
    _, running = ray.wait(attempt.refs, num_returns=len(attempt.refs), timeout=0)
    for ref in running:
        ray.cancel(ref, force=force)
    if attempt.placement is not None and force:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(attempt.placement)


def run_on_ray(
    fn: Callable[[Any], Any],
    groups: Sequence[Any],
    *,
    address: str | None,
    requests: Sequence[ProcessRequest],
    tasks: Sequence[int],
    described: Sequence[str],
    log_dir: Path,
    max_retries: int,
    poll_s: float,
    unit: str,
    progress: Callable[[dict[str, int], bool], None],
) -> list[GroupOutcome]:
    """Run every job on the cluster to its end (see the module's docstring)."""
    ray = connect(address)
    log_dir.mkdir(parents=True, exist_ok=True)
    jobs = RayJobs(ray, fn, groups, requests, tasks, log_dir, unit)
    try:
        check_feasible(ray, requests, tasks, described, unit)
        return jobs.run(max_retries, poll_s, progress)
    except BaseException:
        jobs.cancel()
        raise
    finally:
        ray.shutdown()
