"""Each running group's progress: the trainer writes it to its state directory, the driver
reads it from the sweep directory (the one thing both see, locally and on Slurm) and shows a
line per group."""

from __future__ import annotations

import datetime
import json
import math
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
    """The trainer's side: {phase, step, total_steps, tokens_per_s, eta_s, fvu: [min, max]}
    written atomically, at most every WRITE_EVERY_S seconds while training (from the first
    step on, and at the last step), then once more when the final evaluation starts.

    The tokens/s shown, and the ETA, count from this process's first step on: start-up (the
    model, the first read, the first step's warm-up) would hold the rate down for many
    steps. Until a second step has ended, the trainer's own rate stands in."""

    def __init__(self, state_dir: Path, total_steps: int, clock=time.monotonic):
        self.path, self.total_steps, self.clock = state_dir / PROGRESS, total_steps, clock
        self.last = -WRITE_EVERY_S
        self.first: tuple[int, float] | None = None  # (step, time) of the first call
        self.figures: dict = {"tokens_per_s": None, "eta_s": None, "fvu": None}

    def training(
        self, step: int, tokens_per_s: float, batch: int, fvus: list[float] | None = None
    ) -> None:
        """At any step (`tokens_per_s`: the trainer's rate since it started); `fvus` at log
        steps (between them the last log step's range stays)."""
        now = self.clock()
        self.first = self.first or (step, now)
        if now - self.last < WRITE_EVERY_S and step < self.total_steps:
            return
        self.last = now
        first_step, since = self.first
        if step > first_step and now > since:
            tokens_per_s = (step - first_step) * batch / (now - since)
        eta_s = (self.total_steps - step) * batch / tokens_per_s if tokens_per_s > 0 else None
        fvu = self.figures["fvu"]
        if fvus is not None:
            fvus = [f for f in fvus if math.isfinite(f)]  # a failed SAE's is not
            fvu = [min(fvus), max(fvus)] if fvus else None
        self.figures = {"tokens_per_s": tokens_per_s, "eta_s": eta_s, "fvu": fvu}
        self._write("training", step)

    def evaluating(self, step: int, stage: str) -> None:
        """The final evaluation's `stage` (e.g. 'loss recovered') has started."""
        self._write("evaluating", step, stage)

    def _write(self, phase: str, step: int, stage: str | None = None) -> None:
        progress = {"phase": phase, "stage": stage, "step": step, "total_steps": self.total_steps}
        write_json(self.path, progress | self.figures)


def read_progress(path: Path, since: float) -> dict | None:
    """The progress at `path` when written at or after `since` (a time.time()); None when
    there is none (or it is being replaced)."""
    try:
        if path.stat().st_mtime < since:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe(group_index: int, progress: dict, finished: bool) -> str:
    """One line: 'group 0: step 120 of 157, 9,876 tokens/s, ETA 0:00:03, FVU 0.212-0.351'
    (', evaluating: STAGE' or ', done' after it once training ended)."""
    line = f"group {group_index}: step {progress['step']} of {progress['total_steps']}"
    if progress["tokens_per_s"] is not None:
        eta = progress["eta_s"]
        eta = str(datetime.timedelta(seconds=round(eta))) if eta is not None else "unknown"
        line += f", {progress['tokens_per_s']:,.0f} tokens/s, ETA {eta}"
    if progress["fvu"] is not None:
        line += f", FVU {progress['fvu'][0]:.3f}-{progress['fvu'][1]:.3f}"
    if finished:
        return f"{line}, done"
    if progress["phase"] != "evaluating":
        return line
    stage = progress.get("stage")
    return f"{line}, evaluating: {stage}" if stage else f"{line}, evaluating"


class ProgressReport:
    """The driver's side (run_groups' `report`): a line for each group of `groups` that has
    written progress since this report was made."""

    def __init__(self, sweep_dir: Path, groups: list[Group]):
        self.sweep_dir, self.groups = sweep_dir, groups
        self.since = time.time()

    def __call__(self) -> list[str]:
        lines = []
        for group in self.groups:
            path = state_dir(self.sweep_dir, group.index) / PROGRESS
            progress = read_progress(path, self.since)
            if progress is not None:
                finished = group_finished(self.sweep_dir, group)
                lines.append(describe(group.index, progress, finished))
        return lines
