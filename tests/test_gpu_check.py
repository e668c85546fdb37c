"""benchmarks/gpu_check.sh, the GPU acceptance script, on a machine without a GPU: one line
saying so, exit status 0 (its GPU path runs where a GPU is lent; docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its checks")
def test_gpu_check_says_no_gpu_in_one_line(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gpu_check: no GPU: torch sees no CUDA device here, so nothing was checked"
    ]
    assert not (tmp_path / "work").exists()
