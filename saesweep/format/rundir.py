"""The run directory, a contract between training, evaluation and export: one trained SAE in
the SAELens layout (sae_weights.safetensors, cfg.json) and its metrics.json, the run's commit
point, written once and last.

A run is exported (weights, cfg.json, and the training metrics as metrics.pending.json), then
evaluated (downstream fidelity, absorption), then committed: metrics.json with everything,
written atomically. A run without metrics.json is unfinished, whatever else it holds, so a
resume finishes it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from saesweep.errors import UserError
from saesweep.format.shards import checksum, file_checksum
from saesweep.store.file import write_atomic

CHECKPOINT_SCHEMA = 1
WEIGHTS_CHECKSUM = "saesweep_weights_checksum"
"""The key, in a run's cfg.json and metrics.json, of the checksum of the
sae_weights.safetensors they were written with: what binds the three files into one unit."""
METRICS = "metrics.json"
"""A run's metrics, and its commit point."""
PENDING_METRICS = "metrics.pending.json"
"""An exported run's training metrics, until its evaluation is committed as METRICS."""


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
    """One trained SAE, exported and committed with `metrics` (export_sae, commit_metrics)."""
    export_sae(run_dir, weights, sae_cfg, metrics)
    commit_metrics(run_dir)


def export_sae(
    run_dir: Path, weights: dict[str, torch.Tensor], sae_cfg: dict, metrics: dict
) -> None:
    """One trained SAE before its evaluation: metrics.json (the commit point) removed first,
    then sae_weights.safetensors, cfg.json and `metrics` as metrics.pending.json. cfg.json and
    the metrics carry the checksum of the weights they were written with (WEIGHTS_CHECKSUM),
    which load_sae and the report check: whenever and wherever a write stops, no reader takes
    one checkpoint's weights with another's cfg or metrics."""
    (run_dir / METRICS).unlink(missing_ok=True)
    data = write_tensors(run_dir / "sae_weights.safetensors", weights)
    unit = {WEIGHTS_CHECKSUM: checksum(data)}
    write_json(
        run_dir / "cfg.json", {**sae_cfg, "saesweep_schema_version": CHECKPOINT_SCHEMA, **unit}
    )
    write_json(run_dir / PENDING_METRICS, {**metrics, **unit})


def commit_metrics(run_dir: Path, evaluation: dict | None = None) -> dict:
    """Commit an exported run: its pending metrics and `evaluation` written as metrics.json,
    atomically and last; returns them."""
    pending = run_dir / PENDING_METRICS
    metrics = json.loads(pending.read_text()) | (evaluation or {})
    write_json(run_dir / METRICS, metrics)
    pending.unlink()
    return metrics


def merge_metrics(run_dirs: list[Path], results: list[dict]) -> None:
    """Add each result to its committed run's metrics.json (rewritten atomically): an
    evaluation of runs that are already finished. An unfinished run (no metrics.json) is
    refused: a metrics.json holding only these results would make it look finished."""
    paths = [Path(run_dir) / METRICS for run_dir in run_dirs]
    unfinished = [str(p.parent) for p in paths if not p.exists()]
    if unfinished:
        raise UserError(
            f"{', '.join(unfinished)} has no metrics.json: its training did not finish; "
            "resume its sweep (train.py --resume SWEEP_DIR) before evaluating it"
        )
    for path, extra in zip(paths, results, strict=True):
        write_json(path, json.loads(path.read_text()) | extra)


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


def load_sae(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json, weights) of a checkpoint, checked to be one unit (check_unit)."""
    if not (run_dir / "cfg.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (no cfg.json){_runs_beside(run_dir)}")
    cfg = json.loads((run_dir / "cfg.json").read_text())
    check_unit(run_dir, cfg)
    return cfg, load_file(str(run_dir / "sae_weights.safetensors"))


def _runs_beside(run_dir: Path) -> str:
    """'; runs there: ...' naming the run directories whose name starts as `run_dir`'s does
    (run-000 for run-000-topk), else those of its parent, else ''."""
    parent = run_dir.parent
    runs = (
        sorted(p.name for p in parent.iterdir() if (p / "cfg.json").is_file())
        if parent.is_dir()
        else []
    )
    close = [name for name in runs if name.startswith(run_dir.name)] or runs
    return f"; runs there: {', '.join(close[:8])}" if close else ""
