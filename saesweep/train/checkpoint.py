"""The group trainer's state, committed atomically (the run directory itself is
format.rundir's)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from saesweep.errors import UserError
from saesweep.format.rundir import write_json

COMMIT_FILE = "state.json"
"""A group's trainer-state commit, in its state directory: the step, reader position and
wall time, and the per-rank tensor files that belong to them."""

LEGACY_STATE_FILE = "state.safetensors"
"""The one-file trainer state of saesweep before 2026-12-01 (position in its metadata)."""


def commit_state(state_dir: Path, commit: dict) -> None:
    """Make `commit` (whose files are written whole) the group's state, atomically; then
    remove the state files no commit names any more."""
    write_json(state_dir / COMMIT_FILE, commit)
    for path in state_dir.glob("state-*.safetensors"):
        if path.name not in commit["files"]:
            path.unlink(missing_ok=True)
    (state_dir / LEGACY_STATE_FILE).unlink(missing_ok=True)


def saved_state(state_dir: Path) -> dict | None:
    """The group's last commit (commit_state's dict), or None when it has none."""
    path, legacy = state_dir / COMMIT_FILE, state_dir / LEGACY_STATE_FILE
    if path.exists():
        with _damaged_state(path):
            commit = json.loads(path.read_text())
            missing = [f for f in commit["files"] if not (state_dir / f).exists()]
        if missing:
            raise UserError(f"the trainer state {path} names missing files {missing}")
        return commit
    if legacy.exists():
        with _damaged_state(legacy), safe_open(str(legacy), "pt") as f:
            position = json.loads(f.metadata()["position"])
        return {"wall_s": 0.0} | position | {"procs": 1, "parallel": "sae", "files": [legacy.name]}
    return None


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one saved trainer-state file."""
    with _damaged_state(path):
        return load_file(str(path))


@contextlib.contextmanager
def _damaged_state(path: Path):
    """A state file that cannot be read (truncated, not safetensors) is a UserError naming it."""
    try:
        yield
    except (SafetensorError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise UserError(
            f"the trainer state {path} is damaged ({err}); delete it to train that group "
            "from its start, or resume from a copy"
        ) from None
