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


def saved_position(path: Path) -> dict:
    """{"step": N, "reader": Reader.state_dict(), "wall_s": T} of a saved trainer state."""
    with _damaged_state(path), safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["position"])


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, position) of a saved trainer state."""
    position = saved_position(path)
    with _damaged_state(path):
        return load_file(str(path)), position


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
