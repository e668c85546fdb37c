"""Tiny topk SAEs trained on a 3000-token demo (MiniLM) collection, for the tests that read a
trained run against its collection (feature pages, exports)."""

from __future__ import annotations

from pathlib import Path

from groups import group_trainer

from saesweep.collect.config import CollectConfig
from saesweep.collect.run import collect
from saesweep.sae import SAEConfig
from saesweep.train.config import DataConfig, TrainConfig


def train_demo_runs(root: Path, run_dirs: list[Path], ks: list[int]) -> str:
    """Collect the demo collection under `root` and train a topk SAE (d_sae 256) of each k
    in `ks` into `run_dirs`, as one group; the collection's uri."""
    uri = str(root / "coll")
    collect(
        CollectConfig(
            out=uri, max_tokens=3000, shard_tokens=1000, ctx_len=64, batch_size=8, progress=False
        )
    )
    cfgs = [
        TrainConfig(
            train_data=DataConfig(uri=uri, shards=":-1", collect=""),
            val_data=DataConfig(uri="", shards="-1:", collect=""),
            n_train=4096,
            n_val=512,
            batch_size=256,
            wandb_mode="disabled",
            sae=SAEConfig(d_sae=256, k=k),
        )
        for k in ks
    ]
    group_trainer(cfgs, run_dirs, root / "state").train()
    return uri
