"""Benchmark: one group of N SAEs against N separate one-SAE runs on the same data.

    uv run benchmarks/bench_group.py [--uri data/demo] [--n-saes 8] [--n-train 100000]

Each side runs `train.py` as whole processes (debug executor, wandb and downstream fidelity off),
so the separate runs pay what a user would pay: start-up, reading and decoding the data, and
evaluation, once per SAE. Prints wall seconds, bytes read from storage and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep_file(directory: Path, lrs: list[float]) -> Path:
    path = directory / "bench_sweep.py"
    path.write_text(f"def make_cfgs():\n    return [{{'lr': lr}} for lr in {lrs!r}]\n")
    return path


def run_sweep(
    sweep: Path, runs_root: Path, args: argparse.Namespace, flags: tuple[str, ...] = ()
) -> tuple[float, int]:
    """(wall seconds, bytes read) of one train.py process (debug executor unless `flags`
    name one)."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--sweep",
        str(sweep),
        *(flags if "--executor" in flags else ("--executor", "debug", *flags)),
        "--runs-root",
        str(runs_root),
        "--train-data.uri",
        args.uri,
        "--n-train",
        str(args.n_train),
        "--batch-size",
        str(args.batch_size),
        "--sae.exp-factor",
        str(args.exp_factor),
        "--sae.k",
        str(args.k),
        "--wandb-mode",
        "disabled",
        "--downstream-sequences",
        "0",
        "--log-every",
        "1000000",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - start
    logs = sorted(runs_root.glob("*/runs/*/metrics.jsonl"))
    last = json.loads(logs[0].read_text().splitlines()[-1])
    return wall, int(last["reader/bytes_read"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default="data/demo")
    parser.add_argument("--n-saes", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--exp-factor", type=int, default=4)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args(argv)
    lrs = [1e-4 * 1.5**i for i in range(args.n_saes)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        group_wall, group_bytes = run_sweep(sweep_file(tmp, lrs), tmp / "group", args)
        separate = []
        for i, lr in enumerate(lrs):
            (tmp / f"s{i}").mkdir()
            separate.append(run_sweep(sweep_file(tmp / f"s{i}", [lr]), tmp / f"s{i}", args))
    sep_wall, sep_bytes = sum(w for w, _ in separate), sum(b for _, b in separate)
    print(
        f"{args.n_saes} TopK SAEs, {args.exp_factor}x, k={args.k}, {args.n_train:,} tokens "
        f"each, data {args.uri}"
    )
    print(f"{'':22s}{'wall s':>10s}{'MB read':>12s}")
    print(f"{'one group':22s}{group_wall:10.1f}{group_bytes / 1e6:12.1f}")
    print(f"{'separate runs, total':22s}{sep_wall:10.1f}{sep_bytes / 1e6:12.1f}")
    print(
        f"group / separate: wall {group_wall / sep_wall:.3f}, bytes read "
        f"{group_bytes / sep_bytes:.4f} (1/{args.n_saes} = {1 / args.n_saes:.4f})"
    )


if __name__ == "__main__":
    main()
