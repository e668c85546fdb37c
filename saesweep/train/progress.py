"""Each running group's progress: the trainer writes it to its state directory, the driver
reads it from the sweep directory (the one thing both see, locally and on Slurm) and shows a
line per group."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from saesweep.format.rundir import write_json
from saesweep.train.layout import group_finished, state_dir
from saesweep.train.sweep import Group

PROGRESS = "progress.json"
"""A group's latest progress, in its state directory."""
WRITE_EVERY_S = 2.0
"""The trainer rewrites a group's progress at a log step at most this often."""


class ProgressWriter:
    """The trainer's side: {step, total_steps, tokens_per_s, eta_s, fvu: [min, max], phase}
    written atomically, at most every WRITE_EVERY_S seconds while training."""

    def __init__(self, state_dir: Path, total_steps: int):
        self.path, self.total_steps = state_dir / PROGRESS, total_steps
        self.last = -WRITE_EVERY_S

    def training(self, step: int, tokens_per_s: float, batch: int, fvus: list[float]) -> None:
        now = time.monotonic()
        if now - self.last < WRITE_EVERY_S and step < self.total_steps:
            return
        self.last = now
        eta_s = (self.total_steps - step) * batch / tokens_per_s if tokens_per_s > 0 else None
        fvu = [min(fvus), max(fvus)] if fvus else None
        self._write("training", step, {"tokens_per_s": tokens_per_s, "eta_s": eta_s, "fvu": fvu})

    def evaluating(self, step: int) -> None:
        self._write("evaluating", step, {})

    def _write(self, phase: str, step: int, values: dict) -> None:
        progress = {"phase": phase, "step": step, "total_steps": self.total_steps}
        write_json(self.path, progress | values)


def read_progress(sweep_dir: Path, group_index: int) -> dict | None:
    """The group's latest progress (None: none written yet, or being replaced)."""
    try:
        return json.loads((state_dir(sweep_dir, group_index) / PROGRESS).read_text())
    except (OSError, ValueError):
        return None


def describe(group_index: int, progress: dict) -> str:
    """One line: 'group 0: step 120 of 157, 9,876 tokens/s, ETA 0:00:03, FVU 0.212-0.351'."""
    head = f"group {group_index}: step {progress['step']:,} of {progress['total_steps']:,}"
    if progress["phase"] == "evaluating":
        return f"{head}, evaluating"
    eta = progress["eta_s"]
    eta = str(datetime.timedelta(seconds=round(eta))) if eta is not None else "unknown"
    fvu = progress["fvu"]
    fvu = f"{fvu[0]:.3f}-{fvu[1]:.3f}" if fvu else "not yet logged"
    return f"{head}, {progress['tokens_per_s']:,.0f} tokens/s, ETA {eta}, FVU {fvu}"


class ProgressReport:
    """The driver's side: a line for each group of `groups` that has written progress and has
    not finished (run_groups' `report`)."""

    def __init__(self, sweep_dir: Path, groups: list[Group]):
        self.sweep_dir, self.groups = sweep_dir, groups

    def __call__(self) -> list[str]:
        lines = []
        for group in self.groups:
            progress = read_progress(self.sweep_dir, group.index)
            if progress is not None and not group_finished(self.sweep_dir, group):
                lines.append(describe(group.index, progress))
        return lines
