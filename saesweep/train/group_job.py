"""What one parallel-group job does."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import submitit

from saesweep.interrupt import raising, stop_signals
from saesweep.memory import resolve_device
from saesweep.train.config import SweepConfig
from saesweep.train.distributed import start_world, stop_world
from saesweep.train.layout import group_lock, run_dir, state_dir
from saesweep.train.sweep import Group
from saesweep.train.trainer import GroupTrainer


class GroupJob(submitit.helpers.Checkpointable):
    """Trains one group; on preemption or time limit submitit requeues it and the trainer
    resumes from its last saved state (written every ckpt_every steps). SIGINT (and SIGTERM
    outside Slurm) stops it with Interrupted, its state committed (interrupt.stop_signals)."""

    def __init__(self, sweep_dir: Path, sweep_cfg: SweepConfig):
        self.sweep_dir, self.sweep_cfg = sweep_dir, sweep_cfg

    def __call__(self, group: Group) -> list[dict]:
        """Train the group (as one of its procs_per_group processes: rank 0 holds its lock,
        returns and prints the group's metrics)."""
        dirs = [
            run_dir(self.sweep_dir, i, c.tag)
            for i, c in zip(group.run_ids, group.runs, strict=True)
        ]
        world = start_world(group.config, resolve_device(group.config.device))
        if world.size > 1:
            print(f"[group] rank {world.rank} of {world.size}, pid {os.getpid()}", flush=True)
        try:
            lock = group_lock(self.sweep_dir, group.index) if world.leader else nullcontext()
            with raising(stop_signals()), lock:
                trainer = GroupTrainer(
                    group.config,
                    list(group.runs),
                    dirs,
                    state_dir(self.sweep_dir, group.index),
                    self.sweep_cfg,
                    self.sweep_dir.name,
                    group.index,
                    world,
                )
                results = trainer.train()
        finally:
            stop_world(world)
        if world.leader:
            for metrics in results:
                print(json.dumps({k: v for k, v in metrics.items() if k != "density_hist"}))
        return results
