"""An architecture defined only in this file (docs/adding-an-architecture.md builds it step
by step) registers, trains, stacks, exports and loads back through saesweep.load."""

from __future__ import annotations

import pytest
import torch
from synthetic import sparse_mixture
from torch import Tensor

import saesweep
from saesweep.errors import UserError
from saesweep.format.rundir import save_sae
from saesweep.sae import ARCHITECTURES, ObjectiveConfig, SAEConfig, make_sae, register
from saesweep.sae.base import LossResult, StackedSAE
from saesweep.sae.codes import Codes, DenseCodes
from saesweep.sae.config import arch_help
from saesweep.sae.optim import StackedAdam
from saesweep.sae.step import train_step
from saesweep.train.sweep import build_configs

D_IN, D_SAE, B, STEPS = 16, 64, 64, 30
SEEDS, LRS = [3, 5], [1e-3, 3e-3]
OBJECTIVES = [ObjectiveConfig(sparsity_coeff=c) for c in (1e-3, 1e-2)]


class ShrinkSAE(StackedSAE):
    """Soft thresholding: f = relu(pre - shift), the shift [n] a running estimate (a tenth of
    the mean active value) kept in a buffer of its own, not trained; L1 penalty."""

    arch = "shrink"
    sae_lens_architecture = "shrink"

    def register_member_buffers(self) -> None:
        super().register_member_buffers()
        self.register_buffer("shift", torch.zeros(self.n))

    def encode(self, x: Tensor) -> DenseCodes:
        return DenseCodes((self.linear(x) - self.shift.view(-1, 1, 1)).relu())

    def penalties(
        self, x: Tensor, target: Tensor, recon: Tensor, codes: Codes, step: int, variance: Tensor
    ) -> dict:
        return {"sparsity_loss": (self.sparsity_at(step), codes.acts.sum(-1).mean(-1))}

    def threshold_sample(self, codes: Codes) -> Tensor:
        acts = codes.acts.detach()
        return 0.1 * acts.sum((1, 2)) / (acts > 0).sum((1, 2)).clamp_min(1)

    def update_running_stats(self, result: LossResult, mask: Tensor) -> None:
        super().update_running_stats(result, mask)
        new = 0.9 * self.shift + 0.1 * result.threshold_sample
        self.shift.copy_(torch.where(mask, new, self.shift))

    def _export_extra(self, i: int, s: float) -> dict[str, Tensor]:
        return {"shift": self.shift[i].expand(self.d_sae)}

    @staticmethod
    def exported_acts(cfg: dict, sd: dict[str, Tensor], x_in: Tensor, pre: Tensor) -> Tensor:
        return (pre - sd["shift"]).relu()


@pytest.fixture
def shrink():
    """ShrinkSAE registered for one test (the registry is the process's)."""
    register(ShrinkSAE)
    yield ShrinkSAE
    del ARCHITECTURES[ShrinkSAE.arch]


def _train(cfgs, seeds, objectives, lrs, data) -> tuple[StackedSAE, list[dict]]:
    sae = make_sae(cfgs, D_IN, seeds, objectives, dtype=torch.float64)
    sae.init_b_dec(data[:256])
    opt = StackedAdam(sae.parameters(), lr=lrs)
    batches = data.split(B)[:STEPS]
    return sae, [train_step(sae, opt, x, step) for step, x in enumerate(batches)]


def test_a_registered_architecture_is_a_config_value(shrink):
    (cfg,) = build_configs([{"sae": {"arch": "shrink"}}], {}, "sweep")
    assert cfg.sae.arch == "shrink" and "shrink" in arch_help()
    with pytest.raises(ValueError, match="registered twice"):
        register(ShrinkSAE)
    with pytest.raises(UserError, match="did you mean 'shrink'"):
        build_configs([{"sae": {"arch": "shrnk"}}], {}, "sweep")


def test_an_unregistered_name_is_refused_with_the_closest():
    with pytest.raises(UserError, match=r"sae.arch='topkk'.*one of .*\(did you mean 'topk'\?\)"):
        build_configs([{"sae": {"arch": "topkk"}}], {}, "sweep")


def test_toy_trains_stacks_exports_and_loads(shrink, tmp_path):
    data = sparse_mixture(STEPS * B, D_IN, seed=1, dtype=torch.float64)
    cfgs = [SAEConfig(arch="shrink", d_sae=D_SAE, dead_tokens=d) for d in (B, 10 * B)]
    stack, metrics = _train(cfgs, SEEDS, OBJECTIVES, LRS, data)
    assert isinstance(stack, ShrinkSAE)
    assert (metrics[-1]["fvu"] < 0.5 * metrics[0]["fvu"]).all(), "both members learn"
    assert (stack.shift > 0).all()
    for i in range(2):
        alone, _ = _train(cfgs[i], SEEDS[i : i + 1], OBJECTIVES[i], LRS[i : i + 1], data)
        for name, p in alone.named_parameters():
            assert torch.equal(stack.get_parameter(name)[i], p[0]), name
        for name, buf in alone.named_buffers():
            assert torch.equal(stack.get_buffer(name)[i], buf[0]), name

    stack.eval()
    x = data[:B]
    recon, codes = stack(x)
    for i in range(2):
        run_dir = tmp_path / f"run-{i}"
        run_dir.mkdir()
        cfg = stack.sae_lens_cfg() | {"hook_name": "h", "seed": SEEDS[i]}
        save_sae(run_dir, stack.member_state_dict(i), cfg, {"arch": "shrink"})
        loaded = saesweep.load(run_dir)
        assert loaded.cfg["architecture"] == "shrink"
        torch.testing.assert_close(loaded.encode(x), codes.acts[i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loaded(x), recon[i], rtol=1e-12, atol=1e-12)
