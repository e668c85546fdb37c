"""--executor ray on a real local Ray cluster (loopback only): a sweep and a collection give
the local results, a killed worker's group starts again and resumes exactly, a request no
node can run ends in one sentence, and Ctrl-C cancels the sweep's tasks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ray_cluster import (
    RayCluster,
    RayClusterError,
    announced_addresses,
    start_ray_cluster,
    stop_ray_cluster,
)
from test_collect import _docs, by_token, read_hook, small
from test_distributed import STEPS, _alive, assert_same_runs, finished, mixed_args, one_process  # noqa: F401
from test_train import ROOT, coll, last_commit, only_dir  # noqa: F401

from saesweep.collect.run import collect


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> RayCluster:
    """The test cluster, and Ray's token authentication off for it and for every Ray the
    commands start: a local ray.init() would otherwise write ~/.ray/auth_token, which turns
    authentication on for every cluster started after it on this machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        try:
            cluster = start_ray_cluster(tmp_path_factory.mktemp("ray"))
        except RayClusterError as err:
            pytest.fail(str(err), pytrace=False)
        try:
            yield cluster
        finally:
            stop_ray_cluster(cluster)


def run_in(cluster: RayCluster, script: str, *args: str) -> subprocess.Popen:
    """train.py or collect.py in a subprocess inside the cluster's namespace."""
    return subprocess.Popen(
        cluster.command(sys.executable, str(ROOT / script), *args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def on_ray(cluster: RayCluster) -> list[str]:
    return ["--executor", "ray", "--ray-address", cluster.address]


def worker_pid(log_dir: Path, name: str) -> int | None:
    """The pid a Ray process printed first in its log `name` (None until it has)."""
    log = log_dir / name
    if log.exists():
        for line in log.read_text().splitlines():
            if line.startswith("[ray] rank "):
                return int(line.rsplit(" ", 1)[1])
    return None


def own_lines(stderr: str) -> list[str]:
    """stderr without Ray's warning that a loopback-only namespace has no route outside."""
    return [x for x in stderr.strip().splitlines() if "network_util.cc" not in x]


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None, polls: int = 30000):
    """`predicate()`'s first truthy value; fails with `proc`'s output if it ends first."""
    for _ in range(polls):
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"train.py ended before {what}: {out}{err}")
        time.sleep(0.02)
    raise AssertionError(f"never saw {what}")


def test_the_cluster_stays_on_loopback(ray_cluster):
    assert ray_cluster.listening(), "no Ray service listens"
    for address in ray_cluster.listening():
        host = address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
        assert host.startswith("127.") or host in ("::1", "*", "0.0.0.0", "::"), address
    announced = announced_addresses(ray_cluster)
    assert announced and all(a.startswith("127.") for a in announced), announced


def test_sweep_with_a_killed_worker_equals_one_process(coll, one_process, ray_cluster, tmp_path):  # noqa: F811
    """Two groups as Ray tasks; group 0's worker is killed after its first commit; Ray's
    loss is seen, the group starts again from that commit, and every run ends bit-identical
    to the one-process sweep."""
    args = mixed_args(coll, tmp_path, "ray", *STEPS, *on_ray(ray_cluster), "--max-parallel", "2")
    proc = run_in(ray_cluster, "train.py", *args)
    committed = lambda: last_commit(tmp_path / "ray").get("step", 0) >= 30  # noqa: E731
    wait_for(committed, "a commit of group 0", proc)
    logs = only_dir(tmp_path / "ray") / "logs"
    os.kill(worker_pid(logs, "ray_0_0_0.out"), signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == 0, out + err
    assert "group 0: " in out and "starting it again" in out, out
    assert worker_pid(logs, "ray_0_1_0.out"), "group 0 ran a second attempt"
    assert not (logs / "ray_1_1_0.out").exists(), "group 1 ran once"
    sweep_dir = only_dir(tmp_path / "ray")
    assert_same_runs(one_process, sweep_dir, exact=True)
    lines = [json.loads(x) for x in (sweep_dir / "runs/run-000/metrics.jsonl").open()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == sorted(set(steps)), "each step logged once"


def test_two_process_group_is_bit_identical(coll, one_process, ray_cluster, tmp_path):  # noqa: F811
    two = ["--procs-per-group", "2", *STEPS, *on_ray(ray_cluster)]
    finished(run_in(ray_cluster, "train.py", *mixed_args(coll, tmp_path, "two", *two)))
    sweep_dir = only_dir(tmp_path / "two")
    assert_same_runs(one_process, sweep_dir, exact=True)
    pids = {worker_pid(sweep_dir / "logs", f"ray_0_0_{rank}.out") for rank in (0, 1)}
    assert len(pids) == 2 and None not in pids, "two processes, one Ray task each"


def test_ctrl_c_cancels_the_tasks(coll, ray_cluster, tmp_path):  # noqa: F811
    args = mixed_args(coll, tmp_path, "stop", *STEPS, *on_ray(ray_cluster))
    proc = run_in(ray_cluster, "train.py", *args)
    wait_for(lambda: last_commit(tmp_path / "stop").get("step", 0) >= 10, "a commit", proc)
    sweep_dir = only_dir(tmp_path / "stop")
    worker = worker_pid(sweep_dir / "logs", "ray_0_0_0.out")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    assert proc.returncode == 130, out + err
    assert f"; resume with: uv run train.py --resume {sweep_dir}" in out + err, out + err
    assert "Traceback" not in err, err
    wait_for(lambda: not _alive(worker), "the worker stop", polls=15000)
    assert not list(sweep_dir.glob("runs/*/metrics.json"))


def test_resume_after_the_driver_died(coll, one_process, ray_cluster, tmp_path):  # noqa: F811
    """kill -9 of train.py: Ray stops its tasks (their owner is gone), and --resume
    finishes the sweep bit-identical to one process."""
    args = mixed_args(coll, tmp_path, "dead", *STEPS, *on_ray(ray_cluster))
    proc = run_in(ray_cluster, "train.py", *args)
    wait_for(lambda: last_commit(tmp_path / "dead").get("step", 0) >= 10, "a commit", proc)
    sweep_dir = only_dir(tmp_path / "dead")
    worker = worker_pid(sweep_dir / "logs", "ray_0_0_0.out")
    proc.kill()
    proc.communicate()
    wait_for(lambda: not _alive(worker), "the worker stop", polls=15000)
    finished(run_in(ray_cluster, "train.py", "--resume", str(sweep_dir)))
    assert_same_runs(one_process, sweep_dir, exact=True)


def test_a_lost_worker_without_retries_is_the_failure_line(coll, ray_cluster, tmp_path):  # noqa: F811
    no_retry = ["--ray-max-retries", "0"]
    args = mixed_args(coll, tmp_path, "lost", *STEPS, *on_ray(ray_cluster), *no_retry)
    proc = run_in(ray_cluster, "train.py", *args)
    logs = wait_for(lambda: next((tmp_path / "lost").glob("*/logs"), None), "the logs", proc)
    os.kill(wait_for(lambda: worker_pid(logs, "ray_0_0_0.out"), "the worker"), signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == 1, out + err
    failure = out.split("group 0 failed: ")[1]
    assert "WorkerCrashedError" in failure or "worker died" in failure.lower(), failure
    assert f"logs: {logs / 'ray_0_0_0.out'} {logs / 'ray_0_0_0.err'}" in failure, failure


@pytest.mark.parametrize(
    ("flags", "asks"),
    [
        (["--cpus-per-group", "64"], "64 CPUs per process"),
        (["--ray-resources", '{"tpu": 1}'], "1 tpu per process, in 1 process(es)"),
        (["--procs-per-group", "3", "--cpus-per-group", "1"], "in 3 process(es)"),
    ],
)
def test_a_request_no_node_can_run_is_one_sentence(coll, ray_cluster, tmp_path, flags, asks):  # noqa: F811
    args = mixed_args(coll, tmp_path, "big", "--n-train", "2560", *on_ray(ray_cluster), *flags)
    proc = run_in(ray_cluster, "train.py", *args)
    out, err = proc.communicate()
    assert proc.returncode == 2, out + err
    assert "group 0 asks Ray for " in err and asks in err and "no node of the cluster" in err, err
    assert "Traceback" not in err and len(own_lines(err)) == 1, err
    assert not list((tmp_path / "big").glob("*/logs/ray_*")), "nothing was submitted"


def test_two_machines_on_ray_equal_one_here(ray_cluster, tmp_path):
    """Without --ray-address collect.py starts a Ray of its own (in the test cluster's
    namespace, to stay on loopback) for its two machine tasks."""
    docs = _docs(tmp_path)
    collect(small(tmp_path / "one", max_tokens=None, dataset=str(docs), act_dtype="float32"))
    flags = {
        "--dataset": str(docs), "--out": str(tmp_path / "two"), "--n-machines": "2",
        "--gpus-per-group": "0", "--cpus-per-group": "1", "--ctx-len": "64",
        "--slurm-log-dir": str(tmp_path / "logs"),
        "--act-dtype": "float32", "--shard-tokens": "1500", "--batch-size": "8",
    }  # fmt: skip
    args = [x for pair in flags.items() for x in pair]
    proc = run_in(ray_cluster, "collect.py", *args, "--executor", "ray")  # a Ray of its own
    out, err = proc.communicate()
    assert proc.returncode == 0, out + err
    assert "on 2 Ray tasks" in out
    one = by_token(read_hook(str(tmp_path / "one"), "encoder.layer.3"))
    two = by_token(read_hook(str(tmp_path / "two"), "encoder.layer.3"))
    for key in ("token_ids", "seq_ids", "positions"):
        assert torch.equal(one[key], two[key])
    torch.testing.assert_close(one["acts"], two["acts"], rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "logs").glob("ray_*.out")) == [
        "ray_0_0_0.out",
        "ray_1_0_0.out",
    ]


def test_missing_ray_names_the_command_that_installs_it(coll, tmp_path, capsys, monkeypatch):  # noqa: F811
    from saesweep.train.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as when the extra is not installed
    args = mixed_args(coll, tmp_path, "none", "--executor", "ray")
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert "uv sync --extra ray" in capsys.readouterr().err
