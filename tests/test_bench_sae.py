"""benchmarks/bench.py sae: the step against its encoder GEMM, per stack size, and the last
line per stack that gpu_check.sh reads (its tokens/s after the last ': ')."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import torch

from saesweep.sae import SAEConfig
from saesweep.sae.step import train_step

ROOT = Path(__file__).resolve().parents[1]


def test_bench_sae_prints_the_gemm_ratio_and_tokens_per_s_of_each_stack():
    args = "--d-model 16 --n-latents 64 --k 4 --batch-size 64 --steps 1 --repeat 3"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "sae", *args.split()]
        + ["--n-saes", "1,3"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 4
    for ratio_line, rate_line, n in zip(lines[::2], lines[1::2], (1, 3), strict=True):
        ratio = re.search(r"per token\): ([\d.]+) \(([\d.]+)-([\d.]+)\)", ratio_line)
        assert ratio and float(ratio[2]) <= float(ratio[1]) <= float(ratio[3])
        assert float(ratio[2]) > 0 and "of 3 interleaved rounds" in ratio_line
        assert rate_line.startswith(f"{n} topk SAE(s) d_model 16, 64 latents, k=4, batch 64")
        per_sae = rate_line.rsplit(": ", 1)[1]
        assert re.fullmatch(r"[\d,]+ tokens/s per SAE", per_sae)


def test_dead_latents_are_held_dead_so_that_auxk_acts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("bench")
    cfg = dataclasses.replace(SAEConfig(arch="topk", d_sae=64, k=4), dead_tokens=10**12)
    timer = bench.StackTimer(cfg, 16, 2, 64, "cpu", False, dead=5)
    assert not timer.sae.dead_mask().any()
    timer.hold_dead()
    assert timer.sae.dead_mask().sum(-1).tolist() == [5, 5]
    assert bool(timer.sae.dead_mask()[:, :5].all())
    metrics = train_step(timer.sae, timer.opt, timer.x, 0)
    assert (metrics["aux_loss"] > 0).all() and torch.isfinite(metrics["loss"]).all()
