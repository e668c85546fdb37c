"""Transcoders and skip transcoders as modules: a planted sparse map recovered, the skip path's
gradient, stacked == one by one, export with both scales folded in."""

from __future__ import annotations

import pytest
import torch
from members import assert_member_alone, load_member_state_dict, member_schedule
from synthetic import sparse_map

from saesweep.sae import ObjectiveConfig, SAEConfig, make_sae
from saesweep.sae.export import apply_exported
from saesweep.sae.jumprelu import JumpReLUConfig
from saesweep.sae.optim import LRSchedule, StackedAdam
from saesweep.sae.registry import single_hook_names
from saesweep.sae.step import train_step
from saesweep.sae.switch import SwitchConfig

D_IN, D_OUT, D_SAE, B = 32, 24, 64, 128
ARCHS = single_hook_names()
SEEDS, LRS = [3, 5, 7], [1e-3, 3e-3, 1e-2]
OBJECTIVES = [
    ObjectiveConfig(sparsity_coeff=1e-3, sparsity_warmup_steps=5, load_balance_coeff=0.01),
    ObjectiveConfig(sparsity_coeff=3e-3, sparsity_warmup_steps=0, load_balance_coeff=0.1),
    ObjectiveConfig(sparsity_coeff=1e-2, sparsity_warmup_steps=10, load_balance_coeff=0.0),
]


def _cfg(arch: str, **kw) -> SAEConfig:
    base = dict(arch=arch, d_sae=D_SAE, k=4, switch=SwitchConfig(n_experts=4), dead_tokens=3 * B)
    base |= dict(jumprelu=JumpReLUConfig(bandwidth=0.05, init_threshold=0.1))
    return SAEConfig(**(base | kw))


def _train(sae, opt, x, y, steps, schedule=None):
    metrics = []
    for s in range(steps):
        if schedule is not None:
            opt.set_lr_factor(schedule.factor(s, sae.n))
        rows = slice(s * B, (s + 1) * B)
        metrics.append(train_step(sae, opt, x[rows], s, target=y[rows]))
    return metrics


@pytest.mark.parametrize(("arch", "skip"), [("topk", False), ("batchtopk", True)])
def test_transcoder_recovers_a_planted_sparse_map(arch, skip):
    # y combines the same 2 of 16 directions as x, over other directions in 24 dimensions
    steps, planted = 300, dict(n_dirs=16, active=2)
    x, y = sparse_map(steps * B, D_IN, D_OUT, seed=5, **planted)
    held_x, held_y = sparse_map(2048, D_IN, D_OUT, seed=6, **planted)
    sae = make_sae(_cfg(arch, k=2, dead_tokens=10 * B, skip=skip), D_IN, [0], d_out=D_OUT)
    sae.init_b_dec(y[:1024])
    _train(sae, StackedAdam(sae.parameters(), lr=[1e-2]), x, y, steps)
    sae.eval()
    with torch.no_grad():
        metrics = sae.loss(held_x, target=held_y).metrics
        recon, _ = sae(held_x)
    assert recon.shape == (1, 2048, D_OUT)
    assert metrics["fvu"].item() < 0.03, metrics  # measured 0.006 (topk)
    baseline = (held_y - held_y.mean(0)).pow(2).sum()
    assert (recon[0] - held_y).pow(2).sum() / baseline == pytest.approx(metrics["fvu"].item())


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_the_skip_path_gets_the_gradient_of_the_prediction(arch):
    x, y = sparse_map(B, D_IN, D_OUT, seed=1, dtype=torch.float64)
    sae = make_sae(_cfg(arch, skip=True), D_IN, [0, 1], d_out=D_OUT, dtype=torch.float64)
    assert sae.W_skip.shape == (2, D_IN, D_OUT) and not sae.W_skip.any()
    result = sae.loss(x, target=y)
    result.loss.sum().backward()
    recon, _ = sae(x)
    residual = (recon - y).detach()
    for i in range(2):
        # fvu objective (topk): 2 x^T r / total variance; mse objective (relu): 2 x^T r / numel
        denom = (y - y.mean(0)).pow(2).sum() if arch == "topk" else residual[i].numel()
        want = 2 * x.T @ residual[i] / denom
        torch.testing.assert_close(sae.W_skip.grad[i], want, rtol=1e-10, atol=1e-12)
    assert sae.W_skip.grad.abs().min() > 0


def test_a_skip_transcoder_learns_a_linear_map_through_its_skip():
    x, _ = sparse_map(200 * B, D_IN, D_OUT, seed=2)
    A = torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(3)) / D_IN**0.5
    sae = make_sae(
        _cfg("relu", skip=True), D_IN, [0], ObjectiveConfig(sparsity_coeff=0.1), d_out=D_OUT
    )
    _train(sae, StackedAdam(sae.parameters(), lr=[1e-2]), x, x @ A, 200)
    cos = torch.nn.functional.cosine_similarity(sae.W_skip[0].flatten(), A.flatten(), dim=0)
    assert cos > 0.95, cos


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_transcoders_equal_separate_members(arch, skip):
    steps = 12
    x, y = sparse_map(steps * B, D_IN, D_OUT, seed=1, dtype=torch.float64)
    schedule = LRSchedule(total_steps=steps, warmup_steps=[0, 5, 3], decay=["linear"] * 3)
    cfgs = [
        _cfg(arch, aux_coeff=a, dead_tokens=d, skip=skip)
        for a, d in [(1 / 32, 2 * B), (0.1, 3 * B), (0, B)]
    ]
    stack = make_sae(cfgs, D_IN, SEEDS, OBJECTIVES, d_out=D_OUT, dtype=torch.float64)
    stack.init_b_dec(y[:256])
    stacked = _train(stack, StackedAdam(stack.parameters(), lr=LRS), x, y, steps, schedule)
    assert stack.W_dec.shape == (3, D_SAE, D_OUT) and stack.b_dec.shape == (3, D_OUT)
    for i in range(3):
        one = make_sae(cfgs[i], D_IN, [SEEDS[i]], OBJECTIVES[i], d_out=D_OUT, dtype=torch.float64)
        one.init_b_dec(y[:256])
        opt = StackedAdam(one.parameters(), lr=[LRS[i]])
        alone = _train(one, opt, x, y, steps, member_schedule(schedule, i, 3))
        assert_member_alone(stack, i, one, stacked, alone, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_folds_both_scales_into_raw_space(arch):
    s_in, s_out = 0.37, 2.5
    raw_x, raw_y = sparse_map(11 * B, D_IN, D_OUT, seed=4, dtype=torch.float64)
    raw_x, raw_y = raw_x / s_in, raw_y / s_out
    sae = make_sae(_cfg(arch, skip=True), D_IN, SEEDS, d_out=D_OUT, dtype=torch.float64)
    sae.init_b_dec(raw_y[:256] * s_out)
    _train(sae, StackedAdam(sae.parameters(), lr=LRS), raw_x * s_in, raw_y * s_out, 10)
    sae.eval()
    x = raw_x[10 * B :]
    recon, _ = sae(x * s_in)
    cfg = sae.sae_lens_cfg()
    assert cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == D_OUT
    clone = make_sae(_cfg(arch, skip=True), D_IN, [0, 0, 0], d_out=D_OUT, dtype=torch.float64)
    for i in range(3):
        sd = sae.member_state_dict(i, input_scale=s_in, target_scale=s_out)
        assert sd["W_dec"].shape == (D_SAE, D_OUT) and sd["W_skip"].shape == (D_OUT, D_IN)
        assert sd["W_skip"].abs().sum() > 0
        torch.testing.assert_close(apply_exported(cfg, sd, x), recon[i] / s_out)
        load_member_state_dict(clone, i, sd, s_in, s_out)
    torch.testing.assert_close(clone.eval()(x * s_in)[0], recon)


def test_sae_lens_architecture_names_of_transcoders():
    def name(arch, skip):
        return make_sae(_cfg(arch, skip=skip), D_IN, [0], d_out=D_OUT).sae_lens_cfg()[
            "architecture"
        ]

    assert (name("relu", False), name("relu", True)) == ("transcoder", "skip_transcoder")
    assert name("jumprelu", True) == "jumprelu_skip_transcoder"
    assert name("batchtopk", False) == name("matryoshka", False) == "jumprelu_transcoder"
    assert name("topk", True) == "topk_skip_transcoder"
    assert make_sae(_cfg("topk"), D_IN, [0]).sae_lens_cfg()["architecture"] == "topk"
    with pytest.raises(ValueError, match="sae.skip needs a target hook"):
        make_sae(_cfg("topk", skip=True), D_IN, [0])
    sae = make_sae(_cfg("topk"), D_IN, [0], d_out=D_IN)
    assert sae.transcoder and not sae.apply_b_dec_to_input
    with pytest.raises(ValueError, match="needs a target"):
        sae.loss(torch.zeros(4, D_IN))
