"""The group trainer and train.py end to end on synthetic collections in the real format."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from groups import group_trainer
from safetensors.torch import load_file
from synthetic import make_collection

from saesweep.errors import UserError
from saesweep.executors import RayConfig, SlurmConfig, default_cpus, largest_node_cpus
from saesweep.sae import SAEConfig, SwitchConfig
from saesweep.sae.export import apply_exported
from saesweep.train.checkpoint import load_state, saved_state
from saesweep.train.config import DataConfig, TrainConfig
from saesweep.train.layout import create_sweep_dir, group_lock

ROOT = Path(__file__).resolve().parents[1]
D = 16
CPU_PARTITION = ("--gpus-per-group", "0", "--cpus-per-group", "1")
"""The test cluster's node has no GPU and may have only two cores."""


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("coll"))
    make_collection(uri, [512] * 5, d=D, sparse=True)
    return uri


def cfg(uri: str, **kw) -> TrainConfig:
    base = TrainConfig(
        train_data=DataConfig(uri=uri, shards=":-1", collect=""),
        val_data=DataConfig(uri="", shards="-1:", collect=""),
        n_train=4096,
        n_val=512,
        batch_size=128,
        warmup_steps=2,
        log_every=4,
        ckpt_every=5,
        wandb_mode="disabled",
        downstream_sequences=0,
        sae=SAEConfig(arch="topk", d_sae=64, k=4),
    )
    return dataclasses.replace(base, **kw)


def train(cfgs: list[TrainConfig], root: Path) -> list[dict]:
    dirs = [root / f"run-{i}" for i in range(len(cfgs))]
    return group_trainer(cfgs, dirs, root / "state").train()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sae_weights.safetensors"))


def assert_group_equals_alone(cfgs: list[TrainConfig], root: Path) -> None:
    """Train `cfgs` as one group under root/group and each alone under root/alone<i>: the
    weights agree (to float32 round-off of the batched matmuls)."""
    train(cfgs, root / "group")
    for i, c in enumerate(cfgs):
        train([c], root / f"alone{i}")
        alone, grouped = weights(root / f"alone{i}/run-0"), weights(root / f"group/run-{i}")
        for name in alone:
            torch.testing.assert_close(grouped[name], alone[name], rtol=1e-4, atol=1e-5)


def test_group_equals_separate_runs(coll, tmp_path):
    runs = ((1e-3, 1, True), (3e-3, 2, False), (1e-2, 3, True))
    cfgs = [cfg(coll, lr=lr, seed=s, normalize_grad=n) for lr, s, n in runs]
    assert_group_equals_alone(cfgs, tmp_path)
    train([dataclasses.replace(cfgs[1], normalize_grad=True)], tmp_path / "normalized")
    normalized = weights(tmp_path / "normalized/run-0")["W_dec"]
    assert not torch.allclose(normalized, weights(tmp_path / "alone1/run-0")["W_dec"], atol=1e-4)


def test_evaluation_while_training_is_logged_and_changes_nothing(coll, tmp_path):
    cfgs = [cfg(coll, seed=1), cfg(coll, seed=2, sae=SAEConfig(arch="relu", d_sae=64))]
    plain = train(cfgs, tmp_path / "plain")
    evaluated = train([dataclasses.replace(c, eval_every=8) for c in cfgs], tmp_path / "eval")
    for i in range(2):
        got, want = weights(tmp_path / f"eval/run-{i}"), weights(tmp_path / f"plain/run-{i}")
        assert all(torch.equal(got[k], want[k]) for k in want), "evaluating changed training"
        lines = [json.loads(x) for x in (tmp_path / f"eval/run-{i}/metrics.jsonl").open()]
        evals = [x for x in lines if "eval/fvu" in x]
        assert [x["step"] for x in evals] == [8, 16, 24, 32]
        assert all(x["eval/seconds"] > 0 and 0 <= x["eval/dead_pct"] <= 100 for x in evals)
        assert evals[-1]["eval/fvu"] == evaluated[i]["fvu"] == plain[i]["fvu"]
        assert evals[0]["eval/fvu"] > evals[-1]["eval/fvu"], "the SAE improves while training"


def test_mixed_architectures_and_checkpoint_format(coll, tmp_path):
    archs = ["topk", "batchtopk", "switch", "relu", "jumprelu"]
    cfgs = [
        cfg(coll, sae=SAEConfig(arch=a, d_sae=64, k=4, switch=SwitchConfig(n_experts=2)), seed=i)
        for i, a in enumerate(archs)
    ]
    results = train(cfgs, tmp_path)
    assert [r["arch"] for r in results] == archs
    val = _val_acts(coll)
    for i in range(len(archs)):
        run = tmp_path / f"run-{i}"
        sae_cfg = json.loads((run / "cfg.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        assert sae_cfg["d_in"] == D and sae_cfg["d_sae"] == 64
        assert {"mse", "fvu", "l0", "dead_pct", "tokens_seen"} <= set(metrics)
        assert metrics["tokens_seen"] == 4096 and not metrics["failed"]
        sd = weights(run)
        assert sd["W_enc"].shape == (D, 64) and sd["W_dec"].shape == (64, D)
        recon = apply_exported(sae_cfg, sd, val)
        fvu = ((recon - val) ** 2).sum() / ((val - val.mean(0)) ** 2).sum()
        assert fvu.item() == pytest.approx(metrics["fvu"], rel=1e-3, abs=1e-4)
        assert metrics["fvu"] < 1.0


def _val_acts(uri: str) -> torch.Tensor:
    from saesweep import Reader

    return torch.cat(
        list(
            Reader(uri, batch_size=512, shuffle=False, dtype=torch.float32, shards=slice(-1, None))
        )
    )


def test_diverging_sae_fails_alone(coll, tmp_path):
    good = [cfg(coll, lr=1e-3, seed=1), cfg(coll, lr=2e-3, seed=2)]
    bad = cfg(coll, lr=float("inf"), seed=3)
    results = train([good[0], bad, good[1]], tmp_path / "with")
    assert [r["failed"] for r in results] == [False, True, False]
    train(good, tmp_path / "without")
    for i, j in ((0, 0), (2, 1)):
        a, b = weights(tmp_path / f"with/run-{i}"), weights(tmp_path / f"without/run-{j}")
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_group_too_big_is_refused(coll, tmp_path):
    with pytest.raises(UserError, match="GiB"):
        group_trainer([cfg(coll, sae=SAEConfig(d_sae=2**33))], [tmp_path / "r"], tmp_path / "s")


def run_train(
    *args: str, cwd: Path = ROOT, ignore_sigint: bool = False, own_group: bool = False
) -> subprocess.Popen:
    """train.py in a subprocess; `ignore_sigint`: started as a non-interactive shell starts a
    background command (`train.py ... &` in a script), with SIGINT ignored; `own_group`: in a
    process group of its own, as a terminal's foreground job (Ctrl-C signals all of it)."""
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore if ignore_sigint else None,
        process_group=0 if own_group else None,
    )


def last_commit(root: Path) -> dict:
    """Group 0's last trainer-state commit under runs root `root` ({}: none yet), read while
    the trainer runs: a commit replaced, and its files deleted, between reading state.json
    and finding its files is read again."""
    for state in root.glob("*/groups/group-000/state.json"):
        for _ in range(99):
            with contextlib.suppress(UserError):
                return saved_state(state.parent)
            time.sleep(0.01)
        return saved_state(state.parent)
    return {}


def sweep_args(coll: str, root: Path) -> list[str]:
    return [
        "--sweep",
        str(ROOT / "sweeps/lr_grid.py"),
        "--runs-root",
        str(root),
        "--executor",
        "debug",
        "--train-data.uri",
        coll,
        "--train-data.collect",
        "",
        "--n-train",
        "20000",
        "--batch-size",
        "128",
        "--n-val",
        "512",
        "--sae.d-sae",
        "64",
        "--sae.k",
        "4",
        "--ckpt-every",
        "5",
        "--wandb-mode",
        "disabled",
    ]


def logged_steps(root: Path) -> list[int]:
    """The steps in the metrics.jsonl of run 0 of the sweep under runs root `root`, in order
    (a line cut short by a kill left out)."""
    steps = []
    for log in root.glob("*/runs/run-000*/metrics.jsonl"):
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                steps.append(json.loads(line)["step"])
    return steps


def only_dir(root: Path) -> Path:
    (found,) = [p for p in root.iterdir() if p.is_dir()]
    return found


def test_kill_9_resume_and_rerun_are_bit_identical(coll, tmp_path):
    """A run that commits its state by time (--ckpt-every-s), killed once it has logged a step
    past its last commit, resumes to the uninterrupted weights and logs every step once."""
    ref = run_train(*sweep_args(coll, tmp_path / "ref"))
    assert ref.wait() == 0, ref.stderr.read()
    ref_dir = only_dir(tmp_path / "ref")
    by_time = ["--ckpt-every", "100000", "--ckpt-every-s", "0.05", "--log-every", "1"]
    args = sweep_args(coll, tmp_path / "killed")
    del args[args.index("--ckpt-every") : args.index("--ckpt-every") + 2]
    proc = run_train(*args, *by_time)  # commits by time alone
    for _ in range(1200):  # killed once a step past the last commit is logged
        committed = last_commit(tmp_path / "killed").get("step", 0)
        if committed >= 20 and logged_steps(tmp_path / "killed")[-1:] > [committed]:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_dir = only_dir(tmp_path / "killed")
    assert not list(killed_dir.glob("runs/*/metrics.json"))
    (state,) = killed_dir.glob("groups/group-000/state.json")
    at_kill = saved_state(state.parent)
    resumed = run_train("--resume", str(killed_dir), "--executor", "debug")
    assert resumed.wait() == 0, resumed.stderr.read()
    # the resumed process's rate counts its own steps, and wall time goes on from the state's
    run_000 = next((killed_dir / "runs").glob("run-000*"))
    steps = logged_steps(tmp_path / "killed")
    assert steps == list(range(1, 20000 // 128 + 2)), "every step logged once, resumed included"
    last = json.loads((run_000 / "metrics.jsonl").read_text().splitlines()[-1])
    own_tokens = (last["step"] - at_kill["step"]) * 128
    own_wall = last["wall_s"] - at_kill["wall_s"]
    assert last["tokens_per_s"] * own_wall == pytest.approx(own_tokens, rel=1e-3)
    finished = json.loads((run_000 / "metrics.json").read_text())
    assert finished["wall_s"] > last["wall_s"] > at_kill["wall_s"] > 0
    rerun = run_train(
        "--rerun", str(ref_dir), "--executor", "debug", "--runs-root", str(tmp_path / "rerun")
    )
    assert rerun.wait() == 0, rerun.stderr.read()
    rerun_dir = only_dir(tmp_path / "rerun")
    for run in sorted(p.name for p in (ref_dir / "runs").iterdir()):
        expected = weights(ref_dir / "runs" / run)
        for other in (killed_dir, rerun_dir):
            got = weights(other / "runs" / run)
            assert all(torch.equal(expected[k], got[k]) for k in expected), (other, run)
    assert (ref_dir / "results.csv").read_text().count("\n") == 7
    assert json.loads((ref_dir / "sweep.json").read_text())["configs"][3]["seed"] == 45


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_terminated_driver_stops_its_local_job(coll, tmp_path, sigint):
    """The local job is cancelled with SIGINT; a driver that ignores SIGINT (a background
    command of a script: the full test suite run that way failed here) must not pass the
    ignoring on to submitit's controller, or the worker trains on alone."""
    args = sweep_args(coll, tmp_path / "runs")
    i = args.index("--executor")
    args[i + 1] = "local"
    i = args.index("--n-train")
    args[i + 1] = str(10**8)
    driver = run_train(*args, ignore_sigint=sigint == "ignored")
    for _ in range(1200):
        states = list((tmp_path / "runs").glob("*/groups/group-000/state.json"))
        logs = list((tmp_path / "runs").glob("*/logs/*_0_log.out"))
        if states and logs:
            break
        time.sleep(0.05)
    worker = int(logs[0].name.split("_")[0])
    assert _alive(worker)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait() != 0
    for _ in range(1200):
        if not _alive(worker):
            break
        time.sleep(0.05)
    assert not _alive(worker)


@pytest.fixture(scope="module")
def two_lr_sweep(coll, tmp_path_factory) -> tuple[list[str], Path]:
    """A two-SAE sweep of 256 steps (its train.py arguments) and its uninterrupted run's
    sweep directory."""
    tmp = tmp_path_factory.mktemp("two_lr")
    sweep = tmp / "two.py"
    sweep.write_text("def make_cfgs():\n    return [{'lr': 1e-3}, {'lr': 3e-3}]\n")
    args = sweep_args(coll, tmp / "ref")
    args[1] = str(sweep)
    for flag, value in (("--n-train", "8192"), ("--batch-size", "32"), ("--ckpt-every", "50")):
        args[args.index(flag) + 1] = value
    args += ["--log-every", "4"]
    ref = run_train(*args)
    assert ref.wait() == 0, ref.stderr.read()
    return args, only_dir(tmp / "ref")


@pytest.mark.parametrize(
    "executor,signum", [("local", signal.SIGINT), ("debug", signal.SIGTERM)], ids=["local", "debug"]
)
def test_an_interrupted_sweep_commits_its_step_and_resumes_bit_identical(
    two_lr_sweep, tmp_path, executor, signum
):
    """Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it) with
    local groups, or SIGTERM to one training in its own process: the group commits its state
    at the step it was on and train.py ends with one line that says where and how to resume,
    and 128 + the signal. --resume finishes it to the weights of an uninterrupted run, every
    step logged once; while it runs the driver shows the group's step, tokens/s, ETA and FVU
    range."""
    args, ref_dir = list(two_lr_sweep[0]), two_lr_sweep[1]
    args[args.index("--executor") + 1] = executor
    args[args.index("--runs-root") + 1] = str(tmp_path / "runs")
    driver = run_train(*args, own_group=executor == "local")
    while not logged_steps(tmp_path / "runs") and driver.poll() is None:
        time.sleep(0.05)
    if executor == "local":
        os.killpg(driver.pid, signum)
    else:
        driver.send_signal(signum)
    out, err = driver.communicate()
    assert driver.returncode == 128 + signum, err
    sweep_dir = only_dir(tmp_path / "runs")
    step = saved_state(sweep_dir / "groups/group-000")["step"]
    assert 0 < step < 256
    line = f"interrupted at step {step} of 256; resume with: uv run train.py --resume {sweep_dir}"
    assert out.splitlines()[-1] == line and (out + err).count("interrupted at") == 1, out + err
    assert "Traceback" not in out + err and "group 0 failed" not in out
    at_stop = logged_steps(tmp_path / "runs")
    assert at_stop[-1] == step - step % 4, "committed at the step it was on (log_every 4)"
    resumed = run_train("--resume", str(sweep_dir), "--executor", "local")
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    progress = (
        r"^group 0: step 256 of 256, [\d,]+ tokens/s, ETA 0:00:00, FVU 0\.\d{3}-0\.\d{3}, done$"
    )
    assert re.search(progress, out, flags=re.MULTILINE), out
    assert logged_steps(tmp_path / "runs") == list(range(4, 257, 4))
    for run in ("run-000", "run-001"):
        want, got = weights(ref_dir / "runs" / run), weights(sweep_dir / "runs" / run)
        assert all(torch.equal(want[k], got[k]) for k in want), run


def test_sweep_on_slurm(coll, tmp_path, slurm_cluster):
    sweep = tmp_path / "two_groups.py"
    sweep.write_text(
        "def make_cfgs():\n    return [{'lr': lr, 'n_train': n} "
        "for n in (2048, 4096) for lr in (1e-3, 3e-3)]\n"
    )
    args = sweep_args(coll, tmp_path / "runs")
    args[1] = str(sweep)
    for flag in ("--executor", "--n-train"):
        i = args.index(flag)
        del args[i : i + 2]
    proc = run_train(*args, "--slurm-acct", "test", "--mem-gb", "1", *CPU_PARTITION)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    sweep_dir = only_dir(tmp_path / "runs")
    metrics = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("runs/*/metrics.json"))]
    assert len(metrics) == 4
    assert all(m["slurm_job_id"] for m in metrics)
    assert len({m["slurm_job_id"] for m in metrics}) == 2
    assert [m["tokens_seen"] for m in metrics] == [2048, 2048, 4096, 4096]
    (script,) = (sweep_dir / "logs").glob("*submission.sh")
    assert "#SBATCH --array=0-1%2" in script.read_text()  # both groups may run at once


def test_unknown_slurm_partition_is_one_sentence(coll, tmp_path, slurm_cluster):
    args = sweep_args(coll, tmp_path / "runs")
    i = args.index("--executor")
    del args[i : i + 2]
    proc = run_train(*args, "--slurm-acct", "test", "--slurm-partition", "nowhere", *CPU_PARTITION)
    out, err = proc.communicate()
    assert proc.returncode == 2, err
    assert "Slurm refused the job array" in err and "invalid partition" in err
    assert "Traceback" not in err


def test_a_job_slurm_never_starts_ends_the_launch(coll, tmp_path, slurm_cluster):
    """More CPUs than the node has: sbatch accepts it, the job pends for PartitionConfig;
    train.py ends with one sentence and cancels the job instead of waiting."""
    args = sweep_args(coll, tmp_path / "runs")
    i = args.index("--executor")
    del args[i : i + 2]
    big = ["--gpus-per-group", "0", "--cpus-per-group", "64", "--mem-gb", "1"]
    proc = run_train(*args, "--slurm-acct", "test", *big)
    out, err = proc.communicate()
    assert proc.returncode == 2, out + err
    assert "Slurm will never start group 0's job" in err and "PartitionConfig" in err, err
    assert "64 CPUs per process" in err and "--cpus-per-group" in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: Slurm"), err
    job = re.search(r"job (\d+)", err).group(1)
    listed = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    assert listed.stdout.strip() in ("", "CANCELLED"), listed.stdout


def test_the_default_cpu_request_fits_the_largest_node(slurm_cluster):
    assert largest_node_cpus("slurm", SlurmConfig(), RayConfig()) == slurm_cluster.cpus
    assert largest_node_cpus("local", SlurmConfig(), RayConfig()) is None
    assert [default_cpus(4, None, 1), default_cpus(4, 2, 1), default_cpus(4, 2, 2)] == [4, 2, 1]


def test_one_live_wandb_run_per_sae(coll, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfgs = [
        cfg(coll, lr=lr, seed=i, wandb_mode="offline", n_train=1024)
        for i, lr in enumerate((1e-3, 2e-3))
    ]
    train(cfgs, tmp_path)
    for i in range(len(cfgs)):
        (run_dir,) = (tmp_path / f"run-{i}" / "wandb").glob("offline-run-*")
        (log,) = run_dir.glob("*.wandb")
        record = log.read_bytes()
        assert b"n_train" in record and b"fvu" in record and b"dead_pct" in record
        assert run_dir.name.endswith(f"run-{i}")


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_bf16_autocast_matches_float32(coll, tmp_path, arch):
    sae = SAEConfig(arch=arch, d_sae=64, k=4)
    ref = train([cfg(coll, sae=sae)], tmp_path / "fp32")[0]
    fast = train([cfg(coll, sae=sae, autocast="bfloat16")], tmp_path / "bf16")[0]
    assert not fast["failed"]
    assert fast["fvu"] == pytest.approx(ref["fvu"], abs=0.03)
    assert fast["l0"] == pytest.approx(ref["l0"], rel=0.1)
    a, b = weights(tmp_path / "fp32/run-0"), weights(tmp_path / "bf16/run-0")
    cos = torch.nn.functional.cosine_similarity(a["W_dec"], b["W_dec"], dim=1)
    assert cos.mean() > 0.95


def test_failed_group_is_listed_with_its_logs(coll, tmp_path):
    tiny = tmp_path / "tiny"
    make_collection(str(tiny), [10, 10], d=D, sparse=True)
    sweep = tmp_path / "two.py"
    sweep.write_text(
        f"def make_cfgs():\n    return [{{'train_data': {{'uri': {coll!r}}}}}, "
        f"{{'train_data': {{'uri': {str(tiny)!r}}}}}]\n"
    )
    args = sweep_args(coll, tmp_path / "runs")
    args[1] = str(sweep)
    for flag in ("--executor", "--train-data.uri"):
        i = args.index(flag)
        del args[i : i + 2]
    proc = run_train(*args, "--n-train", "2048")
    out, err = proc.communicate()
    assert proc.returncode == 2, "a group that stopped on the user's data exits 2"
    assert "group 1 failed" in out and "holds fewer tokens than one batch" in out
    log = out.split("logs: ")[1].split()[0]
    assert Path(log).exists() and "fewer tokens" in Path(log.replace(".out", ".err")).read_text()
    sweep_dir = only_dir(tmp_path / "runs")
    assert [p.parent.name for p in sweep_dir.glob("runs/*/metrics.json")] == ["run-000"]
    assert "run-000" in (sweep_dir / "results.csv").read_text()


def test_missing_demo_data_is_collected_first(tmp_path):
    toml = tmp_path / "small.toml"
    demo = (ROOT / "configs/demo.toml").read_text()
    for old, new in (
        ("max_tokens = 200000", "max_tokens = 6000"),
        ("batch_size = 32", "batch_size = 8"),
        ("shard_tokens = 32768", "shard_tokens = 1000"),
    ):
        demo = demo.replace(old, new)
    toml.write_text(demo)
    data = tmp_path / "data/demo"
    proc = run_train(
        "--sweep",
        str(ROOT / "sweeps/demo.py"),
        "--executor",
        "debug",
        "--runs-root",
        str(tmp_path / "runs"),
        "--train-data.collect",
        str(toml),
        "--n-train",
        "2048",
        "--batch-size",
        "256",
        "--n-val",
        "256",
        "--downstream-sequences",
        "0",
        "--wandb-mode",
        "disabled",
        cwd=tmp_path,
    )
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "holds no collection yet: collecting it" in out
    meta = json.loads((data / "encoder.layer.3/metadata.json").read_text())
    assert meta["complete"] and meta["n_tokens"] >= 6000
    rows = [
        r.split(",") for r in (only_dir(tmp_path / "runs") / "results.csv").read_text().splitlines()
    ]
    assert [r[1] for r in rows[1:]] == [
        "topk",
        "batchtopk",
        "matryoshka",
        "switch",
        "relu",
        "jumprelu",
    ]
    metrics = json.loads(
        next(only_dir(tmp_path / "runs").glob("runs/run-000*/metrics.json")).read_text()
    )
    # 256 held-out tokens are too few for any letter's probe: measured, but NaN
    assert metrics["absorption_tokens"] > 0 and metrics["absorption_letters"] == 0
    assert [r[3] for r in rows[1:]] == ["16", "16", "16", "16", "", ""]


def test_a_mistyped_uri_is_refused_and_nothing_is_written(coll, tmp_path):
    typo = tmp_path / "dta" / "demo"
    for uri in (str(typo), f"file://{typo}"):
        args = sweep_args(coll, tmp_path / "runs")
        args[args.index("--train-data.collect") + 1] = "configs/demo.toml"
        proc = run_train(*args, "--train-data.uri", uri)
        out, err = proc.communicate()
        assert proc.returncode == 2, err
        assert f"{uri} holds no collection" in err and "check --train-data.uri" in err
        assert "collecting" not in out and "Traceback" not in err
        assert not (tmp_path / "dta").exists() and not (tmp_path / "runs").exists()


def test_a_one_shard_collection_is_refused_before_launch_naming_the_flags(tmp_path):
    """The default slices train on all shards but the last and hold out the last: a
    collection of one shard is refused before any job, with what to do instead, and trains
    with --train-data.shards ':' beside another held-out collection."""
    make_collection(str(tmp_path / "one"), [2048], d=D, sparse=True)
    make_collection(str(tmp_path / "val"), [512], d=D, sparse=True, seed=1)
    args = sweep_args(str(tmp_path / "one"), tmp_path / "runs")
    for dry_run in ((), ("--dry-run",)):
        proc = run_train(*args, *dry_run)
        out, err = proc.communicate()
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert "--train-data.shards ':-1' selects none of the 1 shard(s) of" in err, err
        assert "--train-data.shards ':') and hold out another collection (--val-data.uri)" in err
        assert not (tmp_path / "runs").exists()
    fixed = [
        "--train-data.shards",
        ":",
        "--val-data.uri",
        str(tmp_path / "val"),
        "--n-train",
        "1024",
    ]
    proc = run_train(*args, *fixed)
    assert proc.wait() == 0, proc.stderr.read()


def test_a_one_shard_demo_collection_is_collected_then_refused_naming_the_flags(tmp_path):
    """The demo recipe over few documents collects one shard: collect says so, and the
    launch is refused before any job with the flags that fix it."""
    toml = tmp_path / "few.toml"
    toml.write_text((ROOT / "configs/demo.toml").read_text().replace("200000", "2000"))
    proc = run_train(
        "--executor", "debug", "--runs-root", str(tmp_path / "runs"),
        "--train-data.collect", str(toml), "--wandb-mode", "disabled", cwd=tmp_path,
    )  # fmt: skip
    out, err = proc.communicate()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "holds 1 shard(s) per hook, and train.py's default split needs 2" in out, out
    assert "--train-data.shards ':-1' selects none of the 1 shard(s) of data/demo" in err
    assert "--train-data.shards ':') and hold out another collection (--val-data.uri)" in err
    assert not (tmp_path / "runs").exists()


def test_a_corrupt_shard_names_the_flag_that_skips_it(tmp_path):
    coll = tmp_path / "coll"
    make_collection(str(coll), [512] * 5, d=D, sparse=True)
    shard = sorted((coll / "model.layers.1").glob("*.safetensors"))[1]
    raw = bytearray(shard.read_bytes())
    raw[-8:] = bytes(8)
    shard.write_bytes(bytes(raw))
    args = sweep_args(str(coll), tmp_path / "runs")
    proc = run_train(*args)
    out, err = proc.communicate()
    assert proc.returncode == 2, "a group that stopped on a corrupt shard exits 2"
    assert "does not match its checksum" in out and "--train-data.on-corrupt skip" in out
    proc = run_train(*args, "--train-data.on-corrupt", "skip", "--val-data.on-corrupt", "skip")
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert out.count("warning: skipping shard") >= 1


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--train-data.layer", "7"],
            "no hook matching hook=None layer=7; it holds: model.layers.1",
        ),
        (["--val-data.uri", "/nonexistent/x"], "/nonexistent/x holds no collection"),
        (["--batch-size", "1"], "batch_size=1, but it must be at least 2; set it in the sweep"),
        (["--lr", "-0.001"], "lr=-0.001, but it must be greater than 0 or unset"),
        (["--lr", "nan"], "lr=nan, but it must be greater than 0 or unset"),
        (["--sae.k", "0"], "sae.k=0, but it must be at least 1; set it in the sweep or with"),
        (["--decay-frac", "1.5"], "decay_frac=1.5, but it must be in [0, 1]"),
        (["--train-data.n-threads", "0"], "with --train-data.n-threads"),
        (["--sae.k", "1000"], "run 0 (topk, d_model 16): k=1000 must lie in [1, d_sae=64]"),
        (
            ["--sae.arch", "switch", "--sae.n-experts", "3"],
            "run 0 (switch, d_model 16): d_sae=64 must be a multiple of n_experts=3",
        ),
        (["--sae.d-sae", str(2**33)], "SAEs needs about"),
        (["--train-data.shards", "7:"], "--train-data.shards '7:' selects none of the 5 shard"),
        (
            ["--val-data.shards", "-2:"],
            "--train-data.shards ':-1' and --val-data.shards '-2:' share",
        ),
        pytest.param(
            ["--device", "cuda"],
            "--device cuda but this torch",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs no CUDA"),
        ),
    ],
)
def test_bad_data_is_refused_before_any_job(coll, tmp_path, flags, message):
    proc = run_train(*sweep_args(coll, tmp_path / "runs"), *flags)
    out, err = proc.communicate()
    assert proc.returncode == 2 and message in err and "Traceback" not in err
    assert not list((tmp_path / "runs").glob("*/*"))


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--train-data.shards", "7:"], "--train-data.shards '7:' selects none of the 5 shard"),
        (["--val-data.shards", "5:"], "--val-data.shards '5:' selects none of the 5 shard"),
        (
            ["--val-data.shards", "-2:"],
            "--train-data.shards ':-1' and --val-data.shards '-2:' share",
        ),
        (["--sae.k", "1000"], "run 0 (topk, d_model 16): k=1000 must lie in [1, d_sae=64]"),
    ],
)
def test_a_dry_run_refuses_what_the_launch_would(coll, tmp_path, flags, message):
    """--dry-run prints the plan, then runs the checks that read no more than the
    collection's manifest: the launch's sentence, exit status 2, nothing written."""
    proc = run_train(*sweep_args(coll, tmp_path / "runs"), "--dry-run", *flags)
    out, err = proc.communicate()
    assert proc.returncode == 2 and message in err and "Traceback" not in err, err
    assert "6 configs in 1 groups" in out
    assert not (tmp_path / "runs").exists()


def test_a_dry_run_notes_held_out_shards_too_small_for_the_evaluations(coll, tmp_path):
    """Held-out shards with fewer tokens than absorption and downstream fidelity ask for: one
    line before launch naming the flags (not a refusal: they use what there is)."""
    proc = run_train(*sweep_args(coll, tmp_path / "runs"), "--dry-run")
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    note = next(line for line in out.splitlines() if line.startswith("note: the held-out"))
    assert "hold 512 tokens, fewer than absorption 8,192 (--absorption.n-tokens)" in note
    assert "downstream fidelity 64 sequences of up to 64 tokens" in note
    assert "--val-data.shards" in note
    proc = run_train(
        *sweep_args(coll, tmp_path / "runs"), "--dry-run", "--absorption.n-tokens", "256",
        "--downstream-sequences", "4",
    )  # fmt: skip
    out, err = proc.communicate()
    assert proc.returncode == 0 and "note: the held-out" not in out, out + err


def test_launches_in_the_same_second_get_their_own_directories(tmp_path):
    made = [create_sweep_dir(tmp_path, "lr_grid") for _ in range(5)]
    assert len(set(made)) == 5 and all(p.is_dir() for p in made)
    assert any(p.name.endswith("-2") for p in made), "a name taken this second gets a suffix"


@pytest.mark.parametrize("tag", ["/../../../escaped", "a/b", "..", ".hidden", "x\x1b[2J"])
def test_a_tag_that_is_not_a_plain_name_is_refused(coll, tmp_path, tag):
    proc = run_train(*sweep_args(coll, tmp_path / "runs"), "--tag", tag)
    out, err = proc.communicate()
    assert proc.returncode == 2 and "tag=" in err and "plain name" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()


def test_resume_skips_finished_groups_and_refuses_a_running_one(coll, tmp_path):
    args = sweep_args(coll, tmp_path / "runs")
    out, err = run_train(*args, "--n-train", "2048").communicate()
    sweep_dir = only_dir(tmp_path / "runs")
    proc = run_train("--resume", str(sweep_dir), "--executor", "debug")
    out, err = proc.communicate()
    assert proc.returncode == 0 and "nothing to resume" in out, err
    assert "sweep directory" not in out, "no group ran again"
    (sweep_dir / "runs/run-000-lr0.0001/metrics.json").unlink()
    with group_lock(sweep_dir, 0):
        proc = run_train("--resume", str(sweep_dir), "--executor", "debug")
        out, err = proc.communicate()
        assert proc.returncode == 2 and "group 0 of" in err and "is running" in err, err
    proc = run_train("--resume", str(sweep_dir), "--executor", "debug")
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert (sweep_dir / "runs/run-000-lr0.0001/metrics.json").exists()


def test_trainer_exports_signum_schedulefree_at_its_average_and_stacks_by_optimizer(coll, tmp_path):
    signum = cfg(coll, optimizer="signum_schedulefree", lr=1e-2)
    results = train([signum, cfg(coll, lr=1e-2)], tmp_path)
    commit = saved_state(tmp_path / "state")
    state = load_state(tmp_path / "state" / commit["files"][0])
    stacks = {k.split(".")[0] for k in state if k.endswith(".opt.z.1")}
    assert stacks == {"0"}, "the signum run has its own stack, the Adam run another"
    y, z = state["0.sae.b_enc"], state["0.opt.z.1"]
    exported = weights(tmp_path / "run-0")["b_enc"]
    assert torch.equal(exported, y.lerp(z, 1 - 1 / 0.95)[0])
    assert not torch.allclose(exported, y[0])
    assert results[0]["lr"] == 1e-2 and results[0]["fvu"] < 1.0


def test_the_dead_window_scales_with_the_run():
    sae = SAEConfig()
    assert [sae.dead_window(n) for n in (4096, 10**6, 10**8, 10**9)] == [
        205,
        50_000,
        5_000_000,
        10_000_000,
    ]
    assert sae.dead_window(None) == 10_000_000
    assert SAEConfig(dead_tokens=7).dead_window(10**6) == 7


def test_a_default_run_has_auxk_active_after_its_window(coll, tmp_path):
    # n_train 4,096: the window is 205 tokens (2 steps); a fixed 10M window never passes
    run = cfg(coll, log_every=1)
    explicit = dataclasses.replace(
        run, sae=SAEConfig(arch="topk", d_sae=64, k=4, dead_tokens=10**7)
    )
    trainer = group_trainer([run, explicit], [tmp_path / "a", tmp_path / "b"], tmp_path / "s")
    assert trainer.stacks[0].sae.dead_tokens.tolist() == [205, 10**7]
    trainer.train()
    logs = [[r["aux_loss"] for r in _log_lines(tmp_path / d) if "aux_loss" in r] for d in "ab"]
    assert max(logs[0][4:]) > 0, "AuxK acts after the window"
    assert max(logs[1]) == 0, "with a 10M window no latent counts as dead"
    default_length = group_trainer([cfg(coll, n_train=10**6)], [tmp_path / "c"], tmp_path / "t")
    assert default_length.stacks[0].sae.dead_tokens.tolist() == [50_000]


def _log_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
