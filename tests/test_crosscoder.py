"""The acausal crosscoder as a module: its loss and gradients against a plain float64
reference that loops over layers, stacked == alone, resume, its checkpoint's forward, the
memory estimate, refusals."""

from __future__ import annotations

import pytest
import torch
from members import assert_member_alone, assert_members_match_reference, member_schedule
from safetensors.torch import load, save
from test_clt import ACTIVATIONS, LRS, OBJECTIVES, SEEDS

from saesweep.memory import group_bytes
from saesweep.sae import CrosscoderConfig, SAEConfig, SparseCodes, make_sae
from saesweep.sae.codes import MemberGroups
from saesweep.sae.crosscoder_export import ExportedCrosscoder
from saesweep.sae.jumprelu import JumpReLUConfig
from saesweep.sae.optim import LRSchedule, StackedAdam
from saesweep.sae.step import train_step

LAYERS, D, D_SAE, K, B = (1, 2, 3), 8, 24, 4, 32
L = len(LAYERS)


def _cfg(activation: str, **kw) -> SAEConfig:
    jumprelu = JumpReLUConfig(bandwidth=0.5, init_threshold=0.2)
    xc = CrosscoderConfig(layers=LAYERS, activation=activation)
    base = dict(arch="crosscoder", d_sae=D_SAE, k=K, crosscoder=xc, jumprelu=jumprelu)
    return SAEConfig(**(base | kw))


def _data(tokens: int, seed: int = 0) -> torch.Tensor:
    """x [tokens, L * D]: layers that share a low-rank part, on different scales."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(tokens, 4, generator=gen, dtype=torch.float64)
    mix = torch.randn(4, L * D, generator=gen, dtype=torch.float64)
    x = shared @ mix + 0.3 * torch.randn(tokens, L * D, generator=gen, dtype=torch.float64)
    return x * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).repeat_interleave(D)


def _reference_loss(p: dict, x, activation, coeff, bandwidth):
    """One crosscoder in float64, loops over layers: FVU over all layers plus the penalty."""
    xs = x.view(-1, L, D)
    W_enc, W_dec = p["W_enc"].view(L, D, D_SAE), p["W_dec"].view(D_SAE, L, D)
    pre = p["b_enc"] + sum(xs[:, i] @ W_enc[i] for i in range(L))
    penalty = 0
    if activation == "topk":
        top = pre.relu().topk(K, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    elif activation == "batchtopk":
        top = pre.relu().flatten().topk(K * len(pre))
        f = torch.zeros_like(pre).flatten().scatter(0, top.indices, top.values).view_as(pre)
    elif activation == "relu":
        f = pre.relu()
        norms = sum(W_dec[:, i].norm(dim=-1) for i in range(L))
        penalty = (f * norms).sum(-1).mean()
    else:
        thr = p["threshold"]
        window = ((pre - thr).abs() < bandwidth / 2).double()
        active = (pre > thr).double()
        moved = (thr - thr.detach()) * window / bandwidth  # the straight-through estimator
        f = pre * active - moved * thr.detach()
        penalty = (active - moved).sum(-1).mean()
    b_dec = p["b_dec"].view(L, D)
    recon = [f @ W_dec[:, i] + b_dec[i] for i in range(L)]
    sse = sum((recon[i] - xs[:, i]).pow(2).sum() for i in range(L))
    variance = sum((xs[:, i] - xs[:, i].mean(0)).pow(2).sum() for i in range(L))
    return sse / variance + coeff * penalty


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_loss_and_gradients_equal_a_plain_reference(activation):
    x = _data(B)
    sae = make_sae(_cfg(activation), D, SEEDS, OBJECTIVES, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)  # some pre-activations near the thresholds
        sae.b_dec.normal_(0, 0.1)
    result = sae.loss(x, step=2)
    result.loss.sum().backward()
    assert result.metrics["l0"].min() > 0
    assert all(p.grad.abs().sum() > 0 for p in sae.parameters())  # thresholds' too

    def reference(p, coeff):
        return _reference_loss(p, x, activation, coeff, 0.5)

    assert_members_match_reference(sae, result, 2, reference)


def test_per_layer_fvu_and_l0_are_reported():
    x = _data(B)
    sae = make_sae(_cfg("topk"), D, [0], dtype=torch.float64)
    metrics = sae.loss(x).metrics
    recon, _ = sae(x)
    xs, rs = x.view(B, L, D), recon[0].view(B, L, D)
    for j, layer in enumerate(LAYERS):
        want = (rs[:, j] - xs[:, j]).pow(2).sum() / (xs[:, j] - xs[:, j].mean(0)).pow(2).sum()
        torch.testing.assert_close(metrics[f"fvu_layer_{layer}"][0], want)
    assert metrics["l0"].item() == K  # one dictionary: k over all layers


def _train(sae, opt, x, steps, schedule=None, start=0):
    metrics = []
    for s in range(start, start + steps):
        if schedule is not None:
            opt.set_lr_factor(schedule.factor(s, sae.n))
        metrics.append(train_step(sae, opt, x[s * B : (s + 1) * B], s, normalize_grad=True))
    return metrics


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_stacked_crosscoders_equal_separate_members(activation):
    steps = 10
    x = _data(steps * B, seed=1)
    schedule = LRSchedule(total_steps=steps, warmup_steps=[0, 5, 3], decay=["linear"] * 3)
    cfgs = [_cfg(activation, dead_tokens=d) for d in (B, 2 * B, 3 * B)]  # AuxK acts (topk)
    stack = make_sae(cfgs, D, SEEDS, OBJECTIVES, dtype=torch.float64)
    stack.init_b_dec(x[:256])
    stacked = _train(stack, StackedAdam(stack.parameters(), lr=LRS), x, steps, schedule)
    for i in range(3):
        one = make_sae(cfgs[i], D, [SEEDS[i]], OBJECTIVES[i], dtype=torch.float64)
        one.init_b_dec(x[:256])
        opt = StackedAdam(one.parameters(), lr=[LRS[i]])
        alone = _train(one, opt, x, steps, member_schedule(schedule, i, 3))
        assert_member_alone(stack, i, one, stacked, alone, rtol=0, atol=0)


def test_resume_from_safetensors_is_bit_identical():
    x = _data(10 * B, seed=2)

    def fresh():
        sae = make_sae(_cfg("jumprelu"), D, SEEDS, OBJECTIVES, dtype=torch.float64)
        return sae, StackedAdam(sae.parameters(), lr=LRS)

    sae, opt = fresh()
    _train(sae, opt, x, 6)
    blobs = save(sae.state_dict()), save(opt.state_dict())
    _train(sae, opt, x, 4, start=6)
    resumed, resumed_opt = fresh()
    resumed.load_state_dict(load(blobs[0]))
    resumed_opt.load_state_dict(load(blobs[1]))
    _train(resumed, resumed_opt, x, 4, start=6)
    for name, t in sae.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_checkpoint_acts_on_raw_activations_layer_by_layer(activation):
    """member_state_dict folds each layer's scale; ExportedCrosscoder's per-layer loops on
    raw activations give the module's codes and reconstruction on scaled ones."""
    x, scales = _data(B), [0.5, 2.0, 3.0]
    sae = make_sae(_cfg(activation), D, SEEDS, OBJECTIVES, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.1)
    if activation == "batchtopk":  # inference: the running threshold, as exported
        sae.threshold.fill_(0.3)
        sae.eval()
    scale = torch.tensor(scales, dtype=torch.float64).repeat_interleave(D)
    with torch.no_grad():
        recon, codes = sae(x * scale)
    for i in range(len(SEEDS)):
        xc = ExportedCrosscoder(sae.sae_lens_cfg(), sae.member_state_dict(i, scales, scales))
        got = xc.encode(x.view(B, L, D))
        assert (got > 0).sum(-1).double().mean() > 1
        torch.testing.assert_close(got, _dense(codes)[i])
        torch.testing.assert_close(xc(x.view(B, L, D)), (recon[i] / scale).view(B, L, D))


def _dense(codes) -> torch.Tensor:
    """[n, B, d_sae] any kind of codes, dense."""
    if isinstance(codes, MemberGroups):
        return codes.merged(lambda m, group: _dense(group))
    if isinstance(codes, SparseCodes):
        n, b, _ = codes.values.shape
        out = codes.values.new_zeros(n, b, codes.d_sae)
        return out.scatter_add(-1, codes.indices, codes.values)
    return codes.acts


def test_the_memory_estimate_counts_every_layer():
    cfgs = _cfg("topk", crosscoder=CrosscoderConfig(layers=(1,))), _cfg("topk")
    latents = 4 * 4 * D_SAE  # one dictionary, whatever the layers
    for cfg, n in zip(cfgs, (1, L), strict=True):
        params = sum(p[0].numel() for p in make_sae(cfg, 32, [0]).parameters())
        width = 4 * 4 * 32 * n  # the layers side by side
        assert group_bytes([cfg], 32, 1) == params * 16 + latents + width


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(crosscoder=CrosscoderConfig()), "must name the layers"),
        (dict(crosscoder=CrosscoderConfig(layers=(2, 1))), "ascend"),
        (dict(skip=True), "skip"),
        (dict(k=D_SAE + 1), "must lie in"),
    ],
)
def test_configs_that_cannot_be_built_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        make_sae(_cfg("topk", **change), D, [0])
    with pytest.raises(ValueError, match="no d_out"):
        make_sae(_cfg("topk"), D, [0], d_out=D)
