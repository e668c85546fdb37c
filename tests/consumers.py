"""The environments of the tools that read saesweep's exports (circuit-tracer, delphi,
sparsify, ...), each its own venv because their pins clash with ours, built once per test run
with uv and our torch (so uv's cache serves it), and a way to run a script in one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

VENVS_ENV = "SAESWEEP_CONSUMER_VENVS"
"""A directory that keeps the consumers' venvs between test runs (default: the run's
basetemp), for whoever iterates on an export."""


def consumer_python(
    root: Path, name: str, requirements: list[str], excludes: tuple[str, ...] = ()
) -> Path:
    """The python of venv `name` under `root` holding `requirements` and our torch, made
    unless an earlier call made it with the same requirements. `excludes`: dependencies left
    out (uv's --excludes), those a consumer declares but the code a test runs never imports,
    whose torch pins clash with ours."""
    venv = Path(os.environ.get(VENVS_ENV, root)) / name
    python, marker = venv / "bin" / "python", venv / "requirements.json"
    wanted = [*requirements, f"torch=={version('torch')}"]
    if marker.is_file() and json.loads(marker.read_text()) == [*wanted, *excludes]:
        return python
    here = "{}.{}".format(*sys.version_info[:2])
    subprocess.run(["uv", "venv", "-q", "--clear", "--python", here, str(venv)], check=True)
    excluded = venv / "excludes.txt"
    excluded.write_text("".join(f"{e}\n" for e in excludes))
    install = ["uv", "pip", "install", "-q", "--python", str(python), "--excludes", str(excluded)]
    subprocess.run([*install, *wanted], check=True)
    marker.write_text(json.dumps([*wanted, *excludes]))
    return python


def run_json(python: Path, script: str, *args: str) -> object:
    """Run `script` (Python source that prints one JSON value last) in a consumer's venv with
    `args` as sys.argv[1:], offline; its JSON value."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [str(python), "-c", script, *args], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
