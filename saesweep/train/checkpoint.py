"""Atomic files: SAE checkpoints in the SAELens layout, and the group trainer's state."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

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


def load_sae(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = json.loads((run_dir / "cfg.json").read_text())
    return cfg, load_file(str(run_dir / "sae_weights.safetensors"))
