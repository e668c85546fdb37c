"""Checkpoints load in SAELens (SAE.load_from_disk) and compute what our reference forward does."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from groups import group_trainer
from synthetic import make_collection

import saesweep
from saesweep.errors import UserError
from saesweep.format.rundir import load_sae
from saesweep.sae import JumpReLUConfig, ObjectiveConfig, SAEConfig, make_sae
from saesweep.sae.export import apply_exported, exported_acts
from saesweep.train.config import DataConfig, TrainConfig

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
    jumprelu = JumpReLUConfig(init_threshold=0.05)
    cfgs = [
        dataclasses.replace(base, seed=i, sae=SAEConfig(arch=a, d_sae=32, k=4, jumprelu=jumprelu))
        for i, a in enumerate(ARCHS)
    ]
    dirs = [root / a for a in ARCHS]
    group_trainer(cfgs, dirs, root / "state").train()
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
        loaded = saesweep.load(run_dirs[arch])  # the documented one-line loader
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(loaded(x), apply_exported(cfg, sd, x))
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (16, 32)
    assert loaded.cfg["hook_name"] == "model.layers.1" and loaded.to("cpu").cfg == loaded.cfg


def _saelens_training_sae(arch: str, sae, coefficient: float, target_l0: float = 0.0):
    """SAELens's own training SAE for member 0 of `sae`, its coefficient = `coefficient`
    (JumpReLU: its quadratic loss around `target_l0` where that is > 0)."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    shape = dict(d_in=sae.d_in, d_sae=sae.d_sae, dtype="float64")
    if arch == "relu":
        cfg = StandardTrainingSAEConfig(
            **shape, l1_coefficient=coefficient, apply_b_dec_to_input=False
        )
        lens = StandardTrainingSAE(cfg)
    else:
        cfg = JumpReLUTrainingSAEConfig(
            **shape,
            l0_coefficient=coefficient,
            jumprelu_bandwidth=sae.cfg.jumprelu.bandwidth,
            jumprelu_init_threshold=sae.cfgs[0].jumprelu.init_threshold,
            jumprelu_sparsity_loss_mode="quadratic" if target_l0 else "step",
            target_l0=target_l0 or None,
        )
        lens = JumpReLUTrainingSAE(cfg)
    with torch.no_grad():
        for name, value in sae.member_state_dict(0).items():
            lens.get_parameter(name).copy_(value)
    return lens


@pytest.mark.parametrize(
    ("arch", "target_l0"), [("relu", 0.0), ("jumprelu", 0.0), ("jumprelu", 5.0)]
)
def test_sparsity_coeff_times_d_in_is_saelens_coefficient(arch, target_l0):
    # ours: per-element MSE + c * penalty; SAELens (and the papers): squared error summed over
    # d_in + lambda * penalty. With lambda = d_in * c the two losses differ by the factor d_in
    from sae_lens.saes.sae import TrainStepInput

    d_in, c = 16, 2**-6
    cfg = SAEConfig(arch=arch, d_sae=64, jumprelu=JumpReLUConfig(0.05, init_threshold=0.01))
    objective = ObjectiveConfig(sparsity_coeff=c, target_l0=target_l0)
    sae = make_sae(cfg, d_in, [0], objective, dtype=torch.float64)
    x = torch.randn(256, d_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = sae.loss(x)
    result.loss.sum().backward()
    assert result.metrics["sparsity_loss"].item() > 0
    lens = _saelens_training_sae(arch, sae, d_in * c, target_l0)
    key = "l1" if arch == "relu" else "l0"
    out = lens.training_forward_pass(TrainStepInput(x, {key: d_in * c}, None, 0, False))
    out.loss.backward()
    assert d_in * result.loss.item() == pytest.approx(out.loss.item(), rel=1e-12)
    for name in ("W_enc", "b_enc", "W_dec"):
        grad = lens.get_parameter(name).grad
        torch.testing.assert_close(
            d_in * sae.get_parameter(name).grad[0], grad, rtol=1e-9, atol=1e-12
        )
    if arch == "jumprelu":  # both train the threshold itself
        want = lens.threshold.grad.double()
        torch.testing.assert_close(d_in * sae.threshold.grad[0], want, rtol=1e-5, atol=1e-7)


def test_loading_a_path_that_is_no_run_names_the_runs_there(run_dirs):
    """run-000 for run-000-topk: the runs whose name starts so; else every run beside it."""
    run = run_dirs[ARCHS[0]]
    with pytest.raises(UserError, match=f"is not a run directory .*; runs there: {run.name}$"):
        saesweep.load(run.parent / run.name[:3])
    with pytest.raises(UserError, match=f"; runs there: {', '.join(sorted(ARCHS))}$"):
        saesweep.load(run.parent / "run-000")
