"""Atomic files: SAE checkpoints in the SAELens layout, and the group trainer's state."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from saesweep.errors import UserError
from saesweep.store.file import write_atomic

CHECKPOINT_SCHEMA = 1


def write_json(path: Path, value) -> None:
    text = json.dumps(value, indent=1, default=_json_default)
    write_atomic(path, lambda f: f.write(text.encode()))


def _json_default(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(contiguous, metadata=metadata)  # bytes: a full disk is an OSError, not Rust's
    write_atomic(path, lambda f: f.write(data))


def save_sae(run_dir: Path, weights: dict[str, torch.Tensor], sae_cfg: dict, metrics: dict) -> None:
    """One trained SAE: cfg.json, sae_weights.safetensors, metrics.json (weights written first,
    so a directory with cfg.json always has whole weights beside it)."""
    write_tensors(run_dir / "sae_weights.safetensors", weights)
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "cfg.json", {**sae_cfg, "saesweep_schema_version": CHECKPOINT_SCHEMA})


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


def load_sae(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = json.loads((run_dir / "cfg.json").read_text())
    return cfg, load_file(str(run_dir / "sae_weights.safetensors"))
