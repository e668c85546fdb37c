"""A group over several processes (torch.distributed, gloo on CPU): SAEs split over ranks
are bit-identical to one process, data-parallel replicas match it to float tolerance, a
killed rank ends the group and --resume continues it exactly."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from test_train import CPU_PARTITION, coll, last_commit, only_dir, run_train, weights  # noqa: F401

from saesweep.sae import CLTConfig, SAEConfig
from saesweep.sae.registry import architecture
from saesweep.train.distributed import assign_runs

MIXED = """
def make_cfgs():
    return [
        {"lr": 1e-3, "sae": {"arch": "topk", "d_sae": 64, "k": 4}},
        {"lr": 3e-3, "sae": {"arch": "relu", "d_sae": 32}},
        {"lr": 2e-3, "sae": {"arch": "topk", "d_sae": 64, "k": 4}},
        {"lr": 1e-3, "sae": {"arch": "relu", "d_sae": 32}},
    ]
"""


def mixed_args(
    coll: str,  # noqa: F811
    tmp_path: Path,
    root: str,
    *extra: str,
    sweep_text: str = MIXED,
) -> list[str]:
    """train.py's arguments for a sweep of four runs (`sweep_text`, the mixed sweep by
    default) on `coll`."""
    sweep = tmp_path / "mixed.py"
    sweep.write_text(sweep_text)
    return [
        "--sweep", str(sweep), "--runs-root", str(tmp_path / root), "--device", "cpu",
        "--train-data.uri", coll, "--train-data.collect", "", "--batch-size", "128",
        "--n-val", "512", "--ckpt-every", "5", "--wandb-mode", "disabled", *extra,
    ]  # fmt: skip


def finished(proc) -> None:
    out, err = proc.communicate()
    assert proc.returncode == 0, out + err


def assert_same_runs(a: Path, b: Path, exact: bool, n_runs: int = 4) -> None:
    """Equal final weights (exact), or each tensor within 1 % of its norm: data mode sums
    each gradient in another order, and over 200 steps one such difference can flip a near
    tie in a top-k and move a latent by a few lr steps (seen on CI: 8e-3 on one run)."""
    runs = sorted(p.name for p in (a / "runs").iterdir())
    assert runs == sorted(p.name for p in (b / "runs").iterdir()) and len(runs) == n_runs
    for run in runs:
        want, got = weights(a / "runs" / run), weights(b / "runs" / run)
        for name in want:
            if exact:
                assert torch.equal(want[name], got[name]), (run, name)
            else:
                off = float((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-6))
                assert off < 1e-2, (run, name, off)


def test_costliest_first_to_the_least_loaded_rank():
    assert assign_runs([64, 32, 64, 32], 2) == [[0, 1], [2, 3]]
    assert assign_runs([128, 32, 32, 32, 32], 2) == [[0], [1, 2, 3, 4]]
    assert assign_runs([8] * 5, 3) == [[0, 3], [1, 4], [2]]


def test_a_clt_costs_its_decoder_blocks_in_the_assignment():
    """A 3-layer CLT of d_sae 64 per layer: 3 encoders and 6 decoder blocks of d x 64, so it
    weighs as much as four SAEs of d_sae 64 and more than three; counted by d x d_sae alone it
    went with two of them."""
    d = 16
    sae = SAEConfig(arch="topk", d_sae=64, k=4)
    clt = SAEConfig(arch="clt", d_sae=64, k=4, clt=CLTConfig(layers=(0, 1, 2)))
    costs = [architecture(c.arch).sizes(c, d)[0] for c in (clt, sae, sae, sae, sae)]
    assert 4 * costs[1] < costs[0] < 5 * costs[1]
    assert assign_runs(costs, 2) == [[0], [1, 2, 3, 4]]


def _pid_of_rank(sweep_root: Path, rank: int) -> int | None:
    for log in sweep_root.glob(f"*/logs/*_{rank}_log.out"):
        for line in log.read_text().splitlines():
            if line.startswith(f"[group] rank {rank} of 2, pid "):
                return int(line.rsplit(" ", 1)[1])
    return None


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


STEPS = ["--n-train", "25600"]
"""200 steps of 128 tokens: the killed rank dies at step 30 or soon after, well before the end."""


@pytest.fixture(scope="module")
def one_process(coll, tmp_path_factory) -> Path:  # noqa: F811
    """The mixed sweep in one process: the reference of both modes."""
    root = tmp_path_factory.mktemp("one")
    finished(run_train(*mixed_args(coll, root, "one", *STEPS, "--executor", "debug")))
    return only_dir(root / "one")


def test_sae_mode_is_bit_identical_and_survives_a_killed_rank(coll, one_process, tmp_path):  # noqa: F811
    two = ["--executor", "local", "--procs-per-group", "2", *STEPS]
    proc = run_train(*mixed_args(coll, tmp_path, "two", *two))
    for _ in range(6000):
        commit = last_commit(tmp_path / "two")
        if commit.get("step", 0) >= 30:
            break
        time.sleep(0.02)
    assert commit.get("step", 0) >= 30, "the two-process group never committed a state"
    assert commit["procs"] == 2 and [f.split(".")[1] for f in commit["files"]] == [
        "rank-0",
        "rank-1",
    ]
    victim, survivor = _pid_of_rank(tmp_path / "two", 1), _pid_of_rank(tmp_path / "two", 0)
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == 1, out + err
    assert "group 0 failed: " in out and "rank 1 of 2" in out, out
    assert "_1_log.out" in out.split("group 0 failed: ")[1], "names the killed rank's log"
    assert not _alive(survivor), "the surviving rank stopped with its group"
    sweep_dir = only_dir(tmp_path / "two")
    assert not list(sweep_dir.glob("runs/*/metrics.json"))
    finished(run_train("--resume", str(sweep_dir)))
    assert_same_runs(one_process, sweep_dir, exact=True)
    results = (sweep_dir / "results.csv").read_text().splitlines()
    assert len(results) == 5


def test_data_mode_matches_one_process(coll, one_process, tmp_path):  # noqa: F811
    """The first logged step (20) to float rounding, the end to a near-tie flip's size."""
    two = ["--procs-per-group", "2", "--parallel", "data", *STEPS]
    finished(run_train(*mixed_args(coll, tmp_path, "two", "--executor", "local", *two)))
    assert_data_mode_matches(one_process, only_dir(tmp_path / "two"), 20, 25600)


def assert_data_mode_matches(
    one: Path, two: Path, first_log: int, tokens: int, n_runs: int = 4
) -> None:
    """Sweep `two` (data mode) against `one` (one process): the weights to a near-tie flip's
    size, held-out FVU and L0 to 1 %, `tokens` seen, the first logged loss (at step
    `first_log`) to float rounding."""
    assert_same_runs(one, two, exact=False, n_runs=n_runs)
    for run in (one / "runs").iterdir():
        want = json.loads((run / "metrics.json").read_text())
        got = json.loads((two / "runs" / run.name / "metrics.json").read_text())
        assert got["fvu"] == pytest.approx(want["fvu"], rel=1e-2)
        assert got["l0"] == pytest.approx(want["l0"], rel=1e-2)
        assert got["tokens_seen"] == want["tokens_seen"] == tokens
        first = [logged_losses(d / "runs" / run.name)[0] for d in (one, two)]
        assert first[0][0] == first[1][0] == first_log
        assert first[1][1] == pytest.approx(first[0][1], rel=1e-5), run.name


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) of each logged step of a run."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def test_two_task_group_on_slurm(coll, tmp_path, slurm_cluster):  # noqa: F811
    steps = ["--n-train", "6400"]
    finished(run_train(*mixed_args(coll, tmp_path, "one", *steps, "--executor", "debug")))
    slurm = ["--slurm-acct", "test", "--mem-gb", "1", *CPU_PARTITION, "--procs-per-group", "2"]
    finished(run_train(*mixed_args(coll, tmp_path, "slurm", *steps, *slurm, "--eval-every", "20")))
    sweep_dir = only_dir(tmp_path / "slurm")
    assert_same_runs(only_dir(tmp_path / "one"), sweep_dir, exact=True)
    for run in (sweep_dir / "runs").iterdir():  # held-out data broadcast to both ranks
        lines = [json.loads(x) for x in (run / "metrics.jsonl").open()]
        assert [x["step"] for x in lines if "eval/fvu" in x] == [20, 40], run
    logs = sorted(p.name.split("_")[1] for p in sweep_dir.glob("logs/*_log.out"))
    assert logs == ["0", "1"], "one Slurm job, two tasks"
