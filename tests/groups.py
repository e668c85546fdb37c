"""A group trainer built from flat configs, as train.py's group job builds it."""

from __future__ import annotations

from pathlib import Path

from saesweep.train.config import TrainConfig
from saesweep.train.sweep import split_groups, sweep_config
from saesweep.train.trainer import GroupTrainer


def group_trainer(
    cfgs: list[TrainConfig], run_dirs: list[Path], state_dir: Path, **kwargs
) -> GroupTrainer:
    """The trainer of `cfgs`, which form one group of one sweep."""
    (group,) = split_groups(cfgs)
    sweep_cfg = sweep_config(cfgs, "the test's")
    return GroupTrainer(group.config, list(group.runs), run_dirs, state_dir, sweep_cfg, **kwargs)
