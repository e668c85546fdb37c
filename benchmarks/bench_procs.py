"""Benchmark: one group of N SAEs trained by 1 process and by P processes (--procs-per-group).

    uv run benchmarks/bench_procs.py [--uri data/demo] [--n-saes 8] [--procs 1,2]
                                     [--parallel sae|data] [--device cpu|cuda]

Every process count runs the same sweep with `train.py` (local executor, so each pays the same
start-up), wandb and downstream fidelity off. Prints the wall seconds of each train.py, the
training rate (tokens/s every SAE sees, from the runs' logs) and both against one process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_group import run_sweep, sweep_file


def training_rate(runs_root: Path) -> float:
    """The slowest run's tokens/s over its whole training (the group waits for it)."""
    logs = sorted(runs_root.glob("*/runs/*/metrics.jsonl"))
    return min(json.loads(log.read_text().splitlines()[-1])["tokens_per_s"] for log in logs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="data/demo")
    parser.add_argument("--n-saes", type=int, default=8)
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--parallel", choices=["sae", "data"], default="sae")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-train", type=int, default=400_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--exp-factor", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args(argv)
    lrs = [1e-4 * 1.5**i for i in range(args.n_saes)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sweep = sweep_file(Path(tmp), lrs)
        for procs in map(int, args.procs.split(",")):
            root = Path(tmp) / f"p{procs}"
            flags = ("--executor", "local", "--device", args.device)
            flags += ("--procs-per-group", str(procs), "--parallel", args.parallel)
            wall, _ = run_sweep(sweep, root, args, flags)
            rows.append((procs, wall, training_rate(root)))
    print(
        f"{args.n_saes} TopK SAEs, {args.exp_factor}x, k={args.k}, {args.n_train:,} tokens, "
        f"batch {args.batch_size}, data {args.uri}, device {args.device}, "
        f"parallel {args.parallel}"
    )
    print(f"{'processes':>10s}{'wall s':>10s}{'tokens/s':>12s}{'x wall':>9s}{'x rate':>9s}")
    _, base_wall, base_rate = rows[0]
    for procs, wall, rate in rows:
        print(f"{procs:10d}{wall:10.1f}{rate:12,.0f}{base_wall / wall:9.2f}{rate / base_rate:9.2f}")


if __name__ == "__main__":
    main()
