"""Atomic files: SAE checkpoints in the SAELens layout (committed as one unit), and the group
trainer's state."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from saesweep.errors import UserError
from saesweep.format.shards import checksum, file_checksum
from saesweep.store.file import write_atomic

CHECKPOINT_SCHEMA = 1
WEIGHTS_CHECKSUM = "saesweep_weights_checksum"
"""The key, in a run's cfg.json and metrics.json, of the checksum of the
sae_weights.safetensors they were written with: what binds the three files into one unit."""


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
) -> bytes:
    """Write `tensors` as a safetensors file, atomically; returns the bytes written."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(contiguous, metadata=metadata)  # bytes: a full disk is an OSError, not Rust's
    write_atomic(path, lambda f: f.write(data))
    return data


def save_sae(run_dir: Path, weights: dict[str, torch.Tensor], sae_cfg: dict, metrics: dict) -> None:
    """One trained SAE, committed as one unit: sae_weights.safetensors, cfg.json, then
    metrics.json, the commit point (resume, the report and `group_finished` look for it), which
    is removed first. cfg.json and metrics.json carry the checksum of the weights they were
    written with (WEIGHTS_CHECKSUM), which load_sae and the report check: whenever and wherever
    a write stops, no reader takes one checkpoint's weights with another's cfg or metrics."""
    (run_dir / "metrics.json").unlink(missing_ok=True)
    data = write_tensors(run_dir / "sae_weights.safetensors", weights)
    unit = {WEIGHTS_CHECKSUM: checksum(data)}
    write_json(
        run_dir / "cfg.json", {**sae_cfg, "saesweep_schema_version": CHECKPOINT_SCHEMA, **unit}
    )
    write_json(run_dir / "metrics.json", {**metrics, **unit})


def check_unit(run_dir: Path, cfg: dict, metrics: dict | None = None) -> None:
    """A UserError unless `metrics` (a run's metrics.json, when given) and the run's weights
    are the ones its `cfg` (cfg.json) was committed with. Checkpoints without the checksum
    (SAELens's own, older saesweep) pass."""
    expected = cfg.get(WEIGHTS_CHECKSUM)
    if expected is None:
        return
    if metrics is not None and metrics.get(WEIGHTS_CHECKSUM, expected) != expected:
        torn = "metrics.json"
    elif metrics is None and file_checksum(run_dir / "sae_weights.safetensors") != expected:
        torn = "sae_weights.safetensors"
    else:
        return
    raise UserError(
        f"{run_dir / torn} is not the one {run_dir / 'cfg.json'} was written with (a checkpoint "
        "write was interrupted, or files were copied between runs); resume the sweep to "
        "rewrite the run, or copy the run directory whole"
    )


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
    """(cfg.json, weights) of a checkpoint, checked to be one unit (check_unit)."""
    cfg = json.loads((run_dir / "cfg.json").read_text())
    check_unit(run_dir, cfg)
    return cfg, load_file(str(run_dir / "sae_weights.safetensors"))
