"""run_groups on the debug and local executors and on a real one-node Slurm cluster."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from saesweep.executors import SlurmConfig, run_groups

# Job processes cannot import this test module: ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

POLL_S = 0.2


def square_or_fail(group: int) -> tuple[int, int]:
    if group < 0:
        raise ValueError(f"bad group {group}")
    return group * group, os.getpid()


def report_slurm_job(out_path: str) -> dict[str, str]:
    env = {key: os.environ[key] for key in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID")}
    env["account"] = os.environ["SLURM_JOB_ACCOUNT"]
    Path(out_path).write_text(f"task {env['SLURM_ARRAY_TASK_ID']}\n")
    return env


class CountSteps(submitit.helpers.Checkpointable):
    """Counts steps; the count survives a requeue because checkpoint() pickles `self`."""

    def __init__(self, n_steps: int):
        self.n_steps = n_steps
        self.steps_done: list[int] = []
        self.starts: list[int] = []

    def __call__(self, out_dir: str) -> dict[str, list[int]]:
        out = Path(out_dir)
        self.starts.append(len(self.steps_done))
        job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        (out / "job_id").write_text(job_id)
        while len(self.steps_done) < self.n_steps:
            time.sleep(0.1)
            self.steps_done.append(len(self.steps_done))
            (out / "progress").write_text(str(len(self.steps_done)))
        return {"steps_done": self.steps_done, "starts": self.starts}

    def checkpoint(self, out_dir: str) -> submitit.helpers.DelayedSubmission:
        print(f"checkpoint at step {len(self.steps_done)}", flush=True)
        return super().checkpoint(out_dir)


@pytest.mark.parametrize("executor", ["debug", "local"])
def test_groups_run_in_order_and_a_failure_does_not_stop_others(executor, tmp_path):
    outcomes = run_groups(
        square_or_fail,
        [1, -2, 3],
        executor=executor,
        log_dir=tmp_path,
        slurm=SlurmConfig(),
        max_concurrent=2,
        poll_s=POLL_S,
    )
    assert [o.status for o in outcomes] == ["done", "failed", "done"]
    assert [o.result[0] for o in (outcomes[0], outcomes[2])] == [1, 9]
    assert outcomes[1].result is None
    assert "ValueError: bad group -2" in outcomes[1].error
    pids = {o.result[1] for o in (outcomes[0], outcomes[2])}
    if executor == "debug":
        assert pids == {os.getpid()}
    else:
        assert len(pids) == 2 and os.getpid() not in pids
        assert all(o.stdout.exists() and o.stderr.exists() for o in outcomes)


def test_slurm_job_array_runs_one_task_per_group(slurm_cluster, tmp_path):
    out_paths = [str(tmp_path / f"group{i}.txt") for i in range(2)]
    slurm = SlurmConfig(acct="test", n_hours=0.25, cpus_per_group=1, mem_gb=0.5)
    outcomes = run_groups(
        report_slurm_job,
        out_paths,
        executor="slurm",
        log_dir=tmp_path / "logs",
        slurm=slurm,
        poll_s=POLL_S,
    )
    assert [o.status for o in outcomes] == ["done", "done"], [o.error for o in outcomes]
    assert [o.result["SLURM_ARRAY_TASK_ID"] for o in outcomes] == ["0", "1"]
    assert [o.result["account"] for o in outcomes] == ["test", "test"]
    assert all(o.result["SLURM_JOB_ID"].isdigit() for o in outcomes)
    array_id = outcomes[0].job_id.split("_")[0]
    assert [o.job_id for o in outcomes] == [f"{array_id}_0", f"{array_id}_1"]
    assert [Path(p).read_text() for p in out_paths] == ["task 0\n", "task 1\n"]
    assert all(o.stdout.exists() for o in outcomes)


@pytest.mark.timeout(240)
def test_slurm_preempted_array_task_is_requeued_and_resumes_from_its_checkpoint(
    slurm_cluster, tmp_path
):
    n_steps = 40
    group_dirs = [tmp_path / "g0", tmp_path / "g1"]
    for group_dir in group_dirs:
        group_dir.mkdir()
    outcomes = []
    launcher = threading.Thread(
        target=lambda: outcomes.extend(
            run_groups(
                CountSteps(n_steps),
                [str(d) for d in group_dirs],
                executor="slurm",
                log_dir=tmp_path / "logs",
                slurm=SlurmConfig(acct="test", cpus_per_group=1),
                poll_s=POLL_S,
            )
        ),
        daemon=True,
    )
    launcher.start()
    progress = group_dirs[0] / "progress"
    wait_for(lambda: int(read_or_empty(progress) or 0) >= 5 or not launcher.is_alive(), 90)
    assert launcher.is_alive(), f"jobs ended before the signal: {outcomes}"
    job_id = (group_dirs[0] / "job_id").read_text()
    try:
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        launcher.join(timeout=150)
    finally:
        subprocess.run(["scancel", job_id.split("_")[0]], check=False, timeout=30)
    assert not launcher.is_alive(), "the requeued job did not finish"
    assert [o.status for o in outcomes] == ["done", "done"], [o.error for o in outcomes]
    assert [o.result["steps_done"] for o in outcomes] == [list(range(n_steps))] * 2
    resumed, untouched = (o.result["starts"] for o in outcomes)
    assert len(resumed) == 2 and resumed[0] == 0 and 5 <= resumed[1] < n_steps
    assert untouched == [0]
    log = outcomes[0].stdout.read_text() + outcomes[0].stderr.read_text()
    assert f"checkpoint at step {resumed[1]}" in log
    assert f"Requeued job {job_id}" in log


def read_or_empty(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def wait_for(check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"condition not met within {timeout_s}s"
        time.sleep(0.1)
