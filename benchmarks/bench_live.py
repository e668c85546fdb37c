"""Benchmark: training on the fly (--train-data.source model) against the bare forward pass, and
one forward pass feeding SAEs on several layers against a separate live run per layer.

    uv run benchmarks/bench_live.py [--collect configs/demo.toml] [--layers 0,1,2,3,4,5]
                                    [--n-train 50000] [--device cpu]

1. The bare forward pass: the collection config's model over the same text and batches, hooked
   at the deepest layer, nothing kept (bench.py's forward_only), tokens/s.
2. One cheap TopK SAE trained live on that layer (train.py, debug executor): training tokens/s
   from its log, against (1). The forward pass is the work; the goal is >= 0.9.
3. SAEs on every layer of --layers in one live group (one forward pass per batch) against one
   live train.py run per layer: wall seconds of the whole processes, start-up included. The
   goal on the demo model is <= 0.3.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import forward_only, measure
from bench_group import ROOT

from saesweep.collect.config import load_toml


def sweep_file(path: Path, collect: str, layers: list[int], shuffle_tokens: int) -> Path:
    live = {"source": "model", "collect": collect, "shuffle_tokens": shuffle_tokens}
    cfgs = [
        {"train_data": {**live, "layer": layer}, "val_data": {**live, "layer": layer}}
        for layer in layers
    ]
    path.write_text(f"def make_cfgs():\n    return {cfgs!r}\n")
    return path


def run_live(sweep: Path, runs_root: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(wall seconds of train.py, the slowest run's training tokens/s from its log)."""
    cmd = [
        sys.executable, str(ROOT / "train.py"), "--sweep", str(sweep), "--executor", "debug",
        "--runs-root", str(runs_root), "--n-train", str(args.n_train), "--n-val", "4096",
        "--batch-size", str(args.batch_size), "--sae.exp-factor", str(args.exp_factor),
        "--sae.k", str(args.k), "--device", args.device, "--wandb-mode", "disabled",
        "--downstream-sequences", "0", "--eval-downstream-sequences", "0",
        "--absorption.n-tokens", "0", "--log-every", "1000000",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - start
    logs = sorted(runs_root.glob("*/runs/*/metrics.jsonl"))
    rates = [json.loads(log.read_text().splitlines()[-1])["tokens_per_s"] for log in logs]
    return wall, min(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", default="configs/demo.toml")
    parser.add_argument("--layers", default="0,1,2,3,4,5")
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--shuffle-tokens", type=int, default=1 << 14)
    parser.add_argument("--exp-factor", type=int, default=2)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    base = load_toml(ROOT / args.collect)
    base = dataclasses.replace(base, hooks=(f"resid.{max(layers)}",), device=args.device)
    forward_only(base, base.batch_size)  # warm-up: imports, model load, first-batch costs
    bare = measure("forward", lambda: forward_only(base, args.n_train), 0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deepest = sweep_file(tmp / "one.py", args.collect, [max(layers)], args.shuffle_tokens)
        _, live_rate = run_live(deepest, tmp / "one", args)
        group_wall, _ = run_live(
            sweep_file(tmp / "all.py", args.collect, layers, args.shuffle_tokens),
            tmp / "all",
            args,
        )
        separate = 0.0
        for layer in layers:
            sweep = sweep_file(tmp / f"l{layer}.py", args.collect, [layer], args.shuffle_tokens)
            separate += run_live(sweep, tmp / f"l{layer}", args)[0]
    print(
        f"{args.collect}, {args.n_train:,} tokens, batch {args.batch_size}, TopK "
        f"{args.exp_factor}x k={args.k}, device {args.device}"
    )
    print(f"bare forward to layer {max(layers)}: {bare.tokens_per_s:,.0f} tokens/s")
    print(
        f"live training, layer {max(layers)}: {live_rate:,.0f} tokens/s; "
        f"live/forward {live_rate / bare.tokens_per_s:.2f}"
    )
    print(
        f"layers {args.layers}: one live group {group_wall:.1f} s, {len(layers)} separate live "
        f"runs {separate:.1f} s; group/separate {group_wall / separate:.2f}"
    )


if __name__ == "__main__":
    main()
