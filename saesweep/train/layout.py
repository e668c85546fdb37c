"""The sweep directory's layout: where runs, group states and locks live, made exclusively."""

from __future__ import annotations

import os
import time
from pathlib import Path

from saesweep.locks import check_unlocked, held_lock, wait_released
from saesweep.train.sweep import Group


def run_dir(sweep_dir: Path, run_id: int, tag: str) -> Path:
    return sweep_dir / "runs" / (f"run-{run_id:03d}" + (f"-{tag}" if tag else ""))


def state_dir(sweep_dir: Path, group_index: int) -> Path:
    return sweep_dir / "groups" / f"group-{group_index:03d}"


def create_sweep_dir(runs_root: Path, name: str) -> Path:
    """A new directory `<name>-<YYYYmmdd-HHMMSS>[-N]` under runs_root, created exclusively:
    two launches in the same second get two directories, and none is ever reused."""
    runs_root.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 10_000):
        path = runs_root / (stem if n == 1 else f"{stem}-{n}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"no free sweep directory name under {runs_root} for {stem}")


def lock_path(sweep_dir: Path, group_index: int) -> Path:
    return state_dir(sweep_dir, group_index) / "running.lock"


def busy_message(sweep_dir: Path, group_index: int) -> str:
    return (
        f"group {group_index} of {sweep_dir} is running (another process holds "
        f"{lock_path(sweep_dir, group_index)}); wait for it or stop it, then --resume"
    )


def group_lock(sweep_dir: Path, group_index: int):
    """Held by the process that trains the group, so that a second one is refused."""
    return held_lock(lock_path(sweep_dir, group_index), busy_message(sweep_dir, group_index))


def wait_stopped(sweep_dir: Path, group_index: int, within_s: float = 10.0) -> None:
    """Wait until the process training the group has ended (its lock released), at most
    `within_s` seconds: a job stopped by a signal commits its state before it ends."""
    wait_released(lock_path(sweep_dir, group_index), within_s)


def check_not_running(sweep_dir: Path, group: Group) -> None:
    """UserError when a process is training `group` of this sweep right now."""
    check_unlocked(lock_path(sweep_dir, group.index), busy_message(sweep_dir, group.index))


def group_finished(sweep_dir: Path, group: Group) -> bool:
    """Whether every run of the group has its final metrics.json."""
    return all(
        (run_dir(sweep_dir, i, c.tag) / "metrics.json").exists()
        for i, c in zip(group.run_ids, group.runs, strict=True)
    )
