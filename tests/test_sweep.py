"""Sweep files, CLI overrides, seeds and parallel groups (no data touched)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import make_collection

from saesweep.collect.config import CollectConfig
from saesweep.configtools import parse_flags
from saesweep.errors import UserError
from saesweep.executors import SlurmConfig
from saesweep.memory import resolve_device
from saesweep.train.config import GroupConfig, HookChoice, RunFields, SweepConfig, TrainConfig
from saesweep.train.sweep import build_configs, load_sweep, split_groups, sweep_config

ROOT = Path(__file__).resolve().parents[1]


def parse_overrides(args: list[str]) -> dict:
    """train.py's config flags as a nested dict of the explicitly given TrainConfig fields."""
    (overrides,) = parse_flags(args, (TrainConfig,), "train.py")
    return overrides


def plan(path: Path, *flags: str, capsys=None) -> tuple[int, str, str]:
    """train.py --sweep PATH --dry-run in this process: (exit status, stdout, stderr)."""
    return run_train(path, "--dry-run", *flags, capsys=capsys)


def run_train(path: Path, *flags: str, capsys=None) -> tuple[int, str, str]:
    """train.py --sweep PATH in this process: (exit status, stdout, stderr)."""
    from saesweep.train.cli import main

    try:
        code = main(["--sweep", str(path), *flags])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "name,configs,groups",
    [
        ("my_sweep", 9, 1),
        ("grid", 9, 1),
        ("paired", 54, 6),
        ("conditional", 6, 1),
        ("parallel_groups", 4, 2),
        ("module_loading", 18, 9),
        ("simple", 9, 1),
        ("layers", 18, 9),
        ("architecture", 3, 1),
        ("lr_grid", 6, 1),
        ("k_grid", 4, 1),
        ("archs", 6, 1),
        ("demo", 6, 1),
        ("live_layers", 3, 1),
        ("transcoders", 5, 3),
        ("clt", 14, 7),
    ],
)
def test_every_sweep_file_plans(name, configs, groups):
    cfgs = build_configs(load_sweep(ROOT / "sweeps" / f"{name}.py"), {}, name)
    assert len(cfgs) == configs
    assert len(split_groups(cfgs)) == groups


def test_dry_run_prints_the_plan(capsys):
    code, out, err = plan(
        ROOT / "sweeps/parallel_groups.py", "--train-data.uri", "s3://nowhere/x", capsys=capsys
    )
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "4 configs in 2 groups"
    assert "group 0: 2 SAEs, data s3://nowhere/x layer=6" in out
    assert "group 1: 2 SAEs, data s3://nowhere/x layer=12" in out
    _, out, _ = plan(ROOT / "sweeps/lr_grid.py", "--max-parallel", "4", capsys=capsys)
    assert out.strip().splitlines()[-1] == "6 configs in 2 groups"
    code, _, err = plan(ROOT / "sweeps/lr_grid.py", "--max-parallel", "0", capsys=capsys)
    assert code == 2 and "--max-parallel 0 must be at least 1" in err
    code, _, err = plan(ROOT / "sweeps/lr_grid.py", "--executor", "foo", capsys=capsys)
    assert code == 2 and "--executor 'foo' is not one of" in err


def test_the_clt_sweep_plans_its_clts_beside_the_transcoder_set(capsys):
    code, out, err = plan(ROOT / "sweeps/clt.py", capsys=capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "14 configs in 7 groups"
    hooks = ", ".join([*(f"mlp_in.{i}" for i in range(6)), *(f"mlp.{i}" for i in range(6))])
    assert f"group 0: 2 SAEs, data data/demo-clt hook=None, layered runs' hooks {hooks}," in out
    for layer in range(6):
        assert f"hook=mlp_in.{layer} -> target mlp.{layer}, n_train=65,536" in out
    assert out.count("topk      width=2x k=16") == 6


def test_d_vit_is_d_model():
    (cfg,) = build_configs([{"sae": {"d_vit": 1024}}], {}, "x")
    assert cfg.sae.d_model == 1024 and cfg.sae.d_vit is None


def test_seed_document_groups():
    cfgs = build_configs(load_sweep(ROOT / "sweeps/parallel_groups.py"), {}, "x")
    groups = split_groups(cfgs)
    assert [[r.train_hooks.layer for r in g.runs] for g in groups] == [[6, 6], [12, 12]]
    assert [g.config.train_data.layer for g in groups] == [6, 12]
    assert [[r.lr for r in g.runs] for g in groups] == [[1e-4, 3e-4], [1e-4, 3e-4]]


def test_cli_beats_sweep_beats_defaults(tmp_path):
    sweep = [{"lr": 1e-3, "sae": {"k": 64, "exp_factor": 4}, "train_data": {"layer": 3}}]
    overrides = parse_overrides(["--sae.k", "32", "--train-data.uri", "s3://b/p", "--lr=5e-4"])
    (cfg,) = build_configs(sweep, overrides, "x")
    assert cfg.lr == 5e-4
    assert cfg.sae.k == 32, "an explicit flag wins even when it equals the default"
    assert cfg.sae.exp_factor == 4, "deep merge keeps sibling fields from the sweep"
    assert (cfg.train_data.uri, cfg.train_data.layer) == ("s3://b/p", 3)
    assert cfg.sae.arch == "topk" and cfg.n_train == 1_000_000


def test_seeds_increment_from_base():
    sweep = [{"lr": lr} for lr in (1e-4, 2e-4, 3e-4)]
    assert [c.seed for c in build_configs(sweep, {}, "x")] == [42, 43, 44]
    assert [c.seed for c in build_configs(sweep, parse_overrides(["--seed", "100"]), "x")] == [
        100,
        101,
        102,
    ]


def test_flag_parsing():
    assert parse_overrides(["--sae.exp-factor", "16"]) == {"sae": {"exp_factor": 16}}
    assert parse_overrides(["--slurm-acct", "A", "--mem-gb", "none"]) == {
        "slurm": {"acct": "A", "mem_gb": None},
    }
    with pytest.raises(UserError, match="did you mean --sae.exp-factor"):
        parse_overrides(["--sae.exp-factr", "16"])
    with pytest.raises(UserError, match="expected int"):
        parse_overrides(["--sae.k", "many"])


def test_groups_split_on_data_fields_only():
    sweep = [
        {"lr": 1e-3, "sae": {"arch": "relu"}},
        {"lr": 2e-3, "tag": "b"},
        {"n_train": 5},
        {"device": "cuda"},
        {"train_data": {"layer": 1}},
    ]
    groups = split_groups(build_configs(sweep, {}, "x"))
    assert [g.run_ids for g in groups] == [(0, 1), (2,), (3,), (4,)]
    assert [g.run_ids for g in split_groups(build_configs(sweep[:2] * 3, {}, "x"), 4)] == [
        (0, 1, 2, 3),
        (4, 5),
    ]


def test_a_config_projects_into_three_levels_and_joins_back():
    """Every flat field sits on exactly one level; the levels join back to the config."""
    sweep = [{"lr": 3e-4, "tag": "a", "sae": {"k": 16}, "train_data": {"layer": 2},
              "n_train": 5000, "device": "cpu", "runs_root": "out", "slurm_acct": "A",
              "health": {"l0_min": 5.0}}]  # fmt: skip
    (cfg,) = build_configs(sweep, {}, "x")
    sweep_level, group_level, run_level = cfg.sweep_level, cfg.group_level, cfg.run_level
    assert (sweep_level.runs_root, sweep_level.slurm.acct, sweep_level.health.l0_min) == (
        "out",
        "A",
        5.0,
    )
    assert (group_level.n_train, group_level.device, group_level.train_data.layer) == (
        5000,
        "cpu",
        2,
    )
    assert (run_level.lr, run_level.tag, run_level.sae.k, run_level.seed) == (3e-4, "a", 16, 42)
    assert run_level.train_hooks == HookChoice(layer=2) and run_level.val_hooks == HookChoice()
    names = [f.name for c in (SweepConfig, GroupConfig, RunFields) for f in dataclasses.fields(c)]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert TrainConfig.joined(sweep_level, group_level, run_level) == cfg


def test_a_live_group_level_leaves_the_hooks_to_its_runs():
    live = {"source": "model", "collect": "configs/demo.toml"}
    sweep = [
        {"train_data": {**live, "layer": 1}, "val_data": {"layer": 1}},
        {"train_data": {**live, "hook": "resid.3", "target_layer": 4}, "lr": 1e-3},
    ]
    cfgs = build_configs(sweep, {}, "x")
    assert cfgs[0].group_level == cfgs[1].group_level
    assert cfgs[0].group_level.train_data.layer is None
    assert [c.run_level.train_hooks for c in cfgs] == [
        HookChoice(layer=1),
        HookChoice(hook="resid.3", target_layer=4),
    ]
    (group,) = split_groups(cfgs)
    joined = [TrainConfig.joined(cfgs[0].sweep_level, group.config, r) for r in group.runs]
    assert joined == cfgs


def test_a_live_plan_lists_every_hook_of_its_clts(tmp_path, capsys):
    """One forward pass feeds a live CLT's layers and an SAE's hook; no 'first hook'."""
    sweep = tmp_path / "live_clt.py"
    sweep.write_text(
        f"""
def make_cfgs():
    live = {{"source": "model", "collect": "{ROOT / "configs/demo.toml"}"}}
    clt = {{"layers": [1, 2], "input_site": "resid", "target_site": "mlp"}}
    return [
        {{"train_data": live, "sae": {{"arch": "clt", "d_sae": 64, "k": 4, "clt": clt}}}},
        {{"train_data": {{**live, "layer": 3}}}},
    ]
"""
    )
    code, out, err = plan(sweep, capsys=capsys)
    assert code == 0, err
    assert "one forward pass for hooks mlp.1, mlp.2, resid.1, resid.2, resid.3," in out, out


def test_groups_are_equal_group_levels_split_by_max_parallel():
    sweep = [{"lr": 1e-3}, {"n_val": 7}, {"lr": 2e-3, "warmup_steps": 3}, {"n_val": 7}]
    groups = split_groups(build_configs(sweep, {}, "x"), 1)
    assert [g.run_ids for g in groups] == [(0,), (2,), (1,), (3,)]
    assert [g.config.n_val for g in groups] == [100_000, 100_000, 7, 7]
    assert [[r.warmup_steps for r in g.runs] for g in groups] == [[100], [3], [100], [100]]


@pytest.mark.parametrize(
    "sweep,message",
    [
        (
            [{"lr": 1e-3}, {"runs_root": "a"}, {"runs_root": "b"}],
            "configs 0 and 1 set runs_root to 'runs' and 'a', but it is one setting of the "
            "whole sweep",
        ),
        (
            [{}, {}, {"health": {"l0_min": 5.0}}],
            "configs 0 and 2 set health.l0_min to 20.0 and 5.0",
        ),
        ([{"slurm_acct": "A"}, {"slurm": {"acct": "B"}}], "--slurm.acct"),
        ([{}, {"wandb_mode": "disabled"}], "set wandb_mode to 'offline' and 'disabled'"),
    ],
)
def test_a_sweep_level_field_that_differs_is_one_sentence(
    tmp_path, capsys, monkeypatch, sweep, message
):
    """Named with two configs before anything is created (run directories land in tmp_path)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sweep.py"
    path.write_text(f"def make_cfgs():\n    return {sweep!r}\n")
    with pytest.raises(UserError, match=re.escape(message)):
        sweep_config(build_configs(sweep, {}, "x"), "x")
    for flags in ([], ["--dry-run"]):
        code, out, err = run_train(path, "--train-data.collect", "", *flags, capsys=capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: {path} configs 0 and") and not out
        assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    "source,message",
    [
        (None, "does not exist"),
        ("def make_cfgs(:\n", "syntax error at line 1"),
        ("x = 1\n", "must define a function make_cfgs()"),
        (
            "def make_cfgs():\n    return 1 / 0\n",
            "raised ZeroDivisionError: division by zero (line 2)",
        ),
        ("def make_cfgs():\n    return {'lr': 1}\n", "returned dict, not a list of dicts"),
        ("def make_cfgs():\n    return [{'lr': 1e-3}, 3]\n", "item 1 is int, not a dict"),
        (
            "def make_cfgs():\n    return [{'sae': {'exp_factr': 4}}]\n",
            "unknown key 'exp_factr' (did you mean 'exp_factor'?)",
        ),
        ("def make_cfgs():\n    return [{'lr': 'fast'}]\n", "key 'lr' has value 'fast'"),
        ("def make_cfgs():\n    return [{1: 2}]\n", "config 0: key 1 is not a string"),
        (
            "def make_cfgs():\n    return [{'sae': {'d_vit': 768, 'd_model': 384}}]\n",
            "sae.d_vit=768 and sae.d_model=384 differ",
        ),
        ("import helper_mod\ndef make_cfgs():\n    return helper_mod.CFGS\n", None),
    ],
)
def test_bad_sweep_files_exit_2(tmp_path, source, message, capsys):
    path = tmp_path / "sweep.py"
    (tmp_path / "helper_mod.py").write_text("CFGS = [{'lr': 1e-3}]\n")
    if source is not None:
        path.write_text(source)
    code, out, err = plan(path, capsys=capsys)
    if message is None:
        assert code == 0 and out.strip().endswith("1 configs in 1 groups")
        return
    assert code == 2, out
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "entry,field",
    [("train.py", "--sae.exp-factor"), ("collect.py", "--act-dtype")],
)
def test_help_lists_config_fields_under_one_usage_line(entry, field):
    out = subprocess.run(
        [sys.executable, str(ROOT / entry), "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0
    assert field in out.stdout and out.stdout.count("usage:") == 1
    assert out.stdout.startswith(f"usage: {entry} [")


def test_shard_slices_as_text():
    from saesweep.configtools import parse_slice

    shards = list(range(5))
    for spec, want in (
        (":-1", [0, 1, 2, 3]),
        ("-1:", [4]),
        ("-1", [4]),
        ("3", [3]),
        ("1:3", [1, 2]),
    ):
        assert shards[parse_slice(spec)] == want, spec


def test_auto_device_is_decided_where_the_work_runs():
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cuda:1", cuda_available=False) == "cuda:1"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    (cfg,) = build_configs([{}], {}, "x")
    assert cfg.device == "auto" and CollectConfig().device == "auto"


def test_dry_run_shows_each_groups_device_and_slurm_request(capsys, tmp_path):
    coll = tmp_path / "coll"
    make_collection(str(coll), [512] * 3, d=768, sparse=True)
    uri = ["--train-data.uri", str(coll)]
    code, out, err = plan(ROOT / "sweeps/lr_grid.py", *uri, "--slurm-acct", "A", capsys=capsys)
    assert code == 0, err
    assert "device=auto (cuda where the job runs sees a GPU, else cpu)" in out
    # two shuffle windows of 2**20 tokens x 768 x 4 bytes = 6 GiB, plus 4 GB
    assert "Slurm: 1 GPU, 4 CPUs per process, 10 GB per node, 1 node(s), 1 h (account A)" in out
    code, out, err = plan(
        ROOT / "sweeps/lr_grid.py",
        *uri,
        "--slurm-acct=A",
        "--gpus-per-group",
        "0",
        "--slurm.partition",
        "cpu",
        "--n-hours",
        "24",
        "--train-data.shuffle-tokens",
        "65536",
        capsys=capsys,
    )
    assert code == 0, err
    line = next(li for li in out.splitlines() if "Slurm:" in li)
    assert (
        line.strip().startswith("Slurm: 0 GPU, 4 CPUs per process, ")
        and "24 h (account A, partition cpu)" in line
    )
    code, out, err = plan(
        ROOT / "sweeps/lr_grid.py", *uri, "--device", "cpu", "--slurm-acct", "A", capsys=capsys
    )
    assert "device=cpu" in out and "Slurm: 0 GPU" in out
    code, out, err = plan(ROOT / "sweeps/lr_grid.py", *uri, "--device", "cpu", capsys=capsys)
    assert "device=cpu" in out and "Slurm:" not in out
    # a group of 4 processes on 2 nodes: 4 GPUs, and per node 2 x 4 GB plus the windows
    code, out, err = plan(
        ROOT / "sweeps/lr_grid.py",
        *uri,
        "--slurm-acct",
        "A",
        "--procs-per-group",
        "4",
        "--nodes-per-group",
        "2",
        capsys=capsys,
    )
    assert code == 0, err
    assert "Slurm: 4 GPU, 4 CPUs per process, 14 GB per node, 2 node(s)" in out
    assert "4 processes, parallel sae" in out


def test_switch_in_data_parallel_is_refused_before_launch(tmp_path, capsys):
    """Switch's load balance and capacity are over the whole batch: split by --parallel data
    they would differ from one process, so such a group is refused in one sentence, before
    any sweep directory or job."""
    from saesweep.train.cli import main

    make_collection(str(tmp_path / "coll"), [512] * 3)
    flags = ["--train-data.uri", str(tmp_path / "coll"), "--train-data.collect", "",
             "--procs-per-group", "2", "--parallel", "data", "--device", "cpu",
             "--runs-root", str(tmp_path / "runs")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(["--sweep", str(ROOT / "sweeps/archs.py"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "trains Switch SAEs (runs switch), whose load" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_every_slurm_setting_has_a_flag():
    flags = [
        "--slurm-acct",
        "A",
        "--slurm-partition",
        "p",
        "--slurm-qos",
        "high",
        "--slurm-exclude",
        "n[1-2]",
        "--slurm-constraint",
        "a100",
        "--slurm-setup",
        "module load cuda",
        "--slurm-extra",
        "reservation=r1,mail-type=END",
        "--mem-gb",
        "64",
        "--cpus-per-group",
        "8",
        "--gpus-per-group",
        "2",
        "--n-hours",
        "3",
    ]
    (cfg,) = build_configs([{}], parse_overrides(flags), "x")
    assert cfg.slurm == SlurmConfig(
        acct="A",
        partition="p",
        qos="high",
        n_hours=3.0,
        gpus_per_group=2,
        cpus_per_group=8,
        mem_gb=64.0,
        exclude="n[1-2]",
        constraint="a100",
        setup=("module load cuda",),
        extra=("reservation=r1", "mail-type=END"),
    )
    (same,) = build_configs([{"slurm_acct": "A", "slurm": {"qos": "high"}}], {}, "x")
    assert (same.slurm.acct, same.slurm.qos) == ("A", "high")


def test_no_dependency_names_a_file_on_this_machine():
    for name in ("pyproject.toml", "uv.lock"):
        text = (ROOT / name).read_text()
        assert "file://" not in text and "path = " not in text and "{ path" not in text, name
