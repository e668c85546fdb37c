"""Checkpoints load in SAELens (SAE.load_from_disk) and compute what our reference forward does."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from synthetic import make_collection

from saesweep.sae import SAEConfig
from saesweep.sae.export import apply_exported, exported_acts
from saesweep.train.checkpoint import load_sae
from saesweep.train.config import DataConfig, TrainConfig
from saesweep.train.trainer import GroupTrainer

ARCHS = ["topk", "batchtopk", "relu", "jumprelu"]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("saelens")
    make_collection(str(root / "coll"), [256] * 3, d=16, sparse=True)
    base = TrainConfig(
        train_data=DataConfig(uri=str(root / "coll"), shards=":-1", collect=""),
        val_data=DataConfig(uri="", shards="-1:", collect=""),
        n_train=1024,
        n_val=256,
        batch_size=128,
        wandb_mode="disabled",
        downstream_sequences=0,
    )
    cfgs = [
        dataclasses.replace(
            base, seed=i, sae=SAEConfig(arch=a, d_sae=32, k=4, jumprelu_init_threshold=0.05)
        )
        for i, a in enumerate(ARCHS)
    ]
    dirs = [root / a for a in ARCHS]
    GroupTrainer(cfgs, dirs, root / "state").train()
    return dict(zip(ARCHS, dirs, strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_lens_loads_and_matches(run_dirs, arch):
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(run_dirs[arch]), device="cpu")
    cfg, sd = load_sae(run_dirs[arch])
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        ours_acts = exported_acts(cfg, sd, x)
        assert (ours_acts > 0).any()
        torch.testing.assert_close(sae.encode(x), ours_acts, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae(x), apply_exported(cfg, sd, x), rtol=1e-5, atol=1e-5)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (16, 32)
