"""What one parallel-group job does."""

from __future__ import annotations

import json
from pathlib import Path

import submitit

from saesweep.train.layout import group_lock, run_dir, state_dir
from saesweep.train.sweep import Group
from saesweep.train.trainer import GroupTrainer


class GroupJob(submitit.helpers.Checkpointable):
    """Trains one group; on preemption or time limit submitit requeues it and the trainer
    resumes from its last saved state (written every ckpt_every steps)."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = sweep_dir

    def __call__(self, group: Group) -> list[dict]:
        dirs = [
            run_dir(self.sweep_dir, i, c.tag)
            for i, c in zip(group.run_ids, group.cfgs, strict=True)
        ]
        with group_lock(self.sweep_dir, group.index):
            trainer = GroupTrainer(
                list(group.cfgs),
                dirs,
                state_dir(self.sweep_dir, group.index),
                self.sweep_dir.name,
                group.index,
            )
            results = trainer.train()
        for metrics in results:
            print(json.dumps({k: v for k, v in metrics.items() if k != "density_hist"}))
        return results
