"""A stack of n SAEs behaves exactly like n separate SAEs; optimizer, resume, export, NaN."""

import dataclasses
import math

import pytest
import torch
from members import assert_member_alone, load_member_state_dict, member_schedule
from safetensors.torch import load, save
from synthetic import sparse_mixture

from saesweep.sae import ObjectiveConfig, SAEConfig, make_sae
from saesweep.sae.export import apply_exported
from saesweep.sae.jumprelu import JumpReLUConfig
from saesweep.sae.optim import LRSchedule, StackedAdam, bcast, clip_grad_norm_, default_lr
from saesweep.sae.registry import single_hook_names
from saesweep.sae.sparse import dead_latent_codes
from saesweep.sae.step import train_step
from saesweep.sae.switch import SwitchConfig

D_IN, D_SAE, B = 32, 128, 64
ARCHS = single_hook_names()
SEEDS, LRS = [3, 5, 7], [1e-3, 3e-3, 1e-2]
NORMALIZE = [True, False, True]
"""Per member: gradient scaled to norm 1 at every step, or clipped above 1."""


def _cfg(arch: str, **kw) -> SAEConfig:
    base = dict(arch=arch, d_sae=D_SAE, k=8, switch=SwitchConfig(n_experts=4), dead_tokens=3 * B)
    base |= dict(jumprelu=JumpReLUConfig(bandwidth=0.05, init_threshold=0.1))
    return SAEConfig(**(base | kw))


def _member_cfgs(arch):
    return [_cfg(arch, aux_coeff=a, dead_tokens=d) for a, d in [(1 / 32, 128), (0.1, 192), (0, 64)]]


OBJECTIVES = [
    ObjectiveConfig(sparsity_coeff=1e-3, sparsity_warmup_steps=5, load_balance_coeff=0.01),
    ObjectiveConfig(sparsity_coeff=3e-3, sparsity_warmup_steps=0, load_balance_coeff=0.1),
    ObjectiveConfig(sparsity_coeff=1e-2, sparsity_warmup_steps=10, load_balance_coeff=0.0),
]


def _data(steps, seed=1):
    return sparse_mixture(steps * B, D_IN, seed=seed, dtype=torch.float64)


def _run(sae, opt, data, steps, schedule=None, start=0, normalize=False):
    metrics = []
    for s in range(start, start + steps):
        if schedule is not None:
            opt.set_lr_factor(schedule.factor(s, sae.n))
        x = data[s * B : (s + 1) * B]
        metrics.append(train_step(sae, opt, x, s, max_grad_norm=1.0, normalize_grad=normalize))
    return metrics


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_equals_separate_members(arch):
    steps, data = 20, _data(20)
    schedule = LRSchedule(
        total_steps=steps, warmup_steps=[0, 5, 3], decay=["linear", "cosine", "none"]
    )
    cfgs = _member_cfgs(arch)
    stack = make_sae(cfgs, D_IN, SEEDS, OBJECTIVES, dtype=torch.float64)
    stack.init_b_dec(data[:256])
    opt = StackedAdam(stack.parameters(), lr=LRS)
    stacked = _run(stack, opt, data, steps, schedule, normalize=torch.tensor(NORMALIZE))
    for i in range(3):
        single = make_sae(cfgs[i], D_IN, [SEEDS[i]], OBJECTIVES[i], dtype=torch.float64)
        single.init_b_dec(data[:256])
        opt_i = StackedAdam(single.parameters(), lr=[LRS[i]])
        alone_schedule = member_schedule(schedule, i, 3)
        alone = _run(single, opt_i, data, steps, alone_schedule, normalize=NORMALIZE[i])
        assert_member_alone(stack, i, single, stacked, alone, rtol=1e-12, atol=1e-14)


def test_member_arithmetic_does_not_depend_on_its_peers():
    # a member with dead latents (AuxK codes) beside one without: the sparse/dense choice of a
    # backward once came from the whole stack's density, so the pair differed from one alone
    data = sparse_mixture(15 * B, D_IN, seed=1, dtype=torch.float32)
    cfgs = [_cfg("topk", k=4, aux_k=16, dead_tokens=d) for d in (B, 10**9)]
    saes = []
    for members in (cfgs, cfgs[:1]):
        sae = make_sae(members, D_IN, SEEDS[: len(members)])
        sae.init_b_dec(data[:256])
        _run(sae, StackedAdam(sae.parameters(), lr=LRS[: len(members)]), data, 15)
        saes.append(sae)
    assert saes[1].dead_mask().any()
    for name, p in saes[1].named_parameters():
        assert torch.equal(saes[0].get_parameter(name)[0], p[0]), name


def test_auxk_codes_are_as_wide_as_the_most_dead_latents_and_a_member_ignores_that_width():
    # AuxK's code holds min(aux_k, the stack's most dead latents) entries per token (it was
    # always aux_k wide, through dense products): a member with 3 dead latents beside one
    # with 40 gets a code 16 wide in the stack and 3 wide alone, and trains to the same bits
    data = sparse_mixture(12 * B, D_IN, seed=2, dtype=torch.float32)
    cfgs = [_cfg("topk", k=4, aux_k=16, dead_tokens=10**9) for _ in range(2)]
    widths, saes = [], []
    for members in (cfgs, cfgs[:1]):
        sae = make_sae(members, D_IN, SEEDS[: len(members)])
        sae.init_b_dec(data[:256])
        with torch.no_grad():
            sae.tokens_since_fired[0, :3] = 10**9
            sae.tokens_since_fired[1:, 50:90] = 10**9
        codes = sae.encode(data[:B])
        widths.append(dead_latent_codes(codes.pre, sae.dead_mask(), sae.aux_k)[0].shape[-1])
        metrics = _run(sae, StackedAdam(sae.parameters(), lr=LRS[: len(members)]), data, 12)
        assert (metrics[0]["aux_loss"] > 0).all()
        saes.append(sae)
    assert widths == [16, 3]
    for name, p in saes[1].named_parameters():
        assert torch.equal(saes[0].get_parameter(name)[0], p[0]), name


def test_jumprelu_member_on_the_sparse_path_does_not_depend_on_a_dense_peer():
    # each member's path follows its own entries per token: a low initial threshold (about
    # half the latents active: dense) beside a high one (a few: sparse)
    data = sparse_mixture(15 * B, D_IN, seed=1, dtype=torch.float32)
    cfgs = [_cfg("jumprelu", jumprelu=JumpReLUConfig(0.05, init_threshold=t)) for t in (3.0, 1e-3)]
    obj = ObjectiveConfig(sparsity_coeff=1e-3)
    saes, paths = [], []
    for part in (slice(0, 2), slice(0, 1), slice(1, 2)):
        sae = make_sae(cfgs[part], D_IN, SEEDS[part], obj)
        sae.init_b_dec(data[:256])
        codes = sae.encode(data[:B])
        paths.append([(m.tolist(), type(c).__name__) for m, c in getattr(codes, "groups", [])])
        _run(sae, StackedAdam(sae.parameters(), lr=LRS[part]), data, 15)
        saes.append(sae)
    assert paths[0] == [([1], "JumpReLUDenseCodes"), ([0], "JumpReLUEntryCodes")]
    for name, p in saes[0].named_parameters():
        assert torch.equal(p[0], saes[1].get_parameter(name)[0]), name
        assert torch.equal(p[1], saes[2].get_parameter(name)[0]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_init_anywhere_in_stack(arch):
    a = make_sae(_cfg(arch), D_IN, [1, 2, 3])
    b = make_sae(_cfg(arch), D_IN, [9, 3, 1, 4])
    c = make_sae(_cfg(arch), D_IN, [2])
    for name, p in a.named_parameters():
        assert torch.equal(p[0], b.get_parameter(name)[2])
        assert torch.equal(p[2], b.get_parameter(name)[1])
        assert torch.equal(p[1], c.get_parameter(name)[0])
    assert not torch.equal(a.W_dec[0], a.W_dec[1])


def test_stack_rejects_members_of_different_shape():
    with pytest.raises(ValueError, match="shape-defining"):
        make_sae([_cfg("topk", k=8), _cfg("topk", k=16)], D_IN, [0, 1])


@pytest.mark.parametrize("arch", ["topk", "relu", "switch"])
def test_nan_member_is_detected_and_masked(arch):
    data = _data(6)
    ref = make_sae(_cfg(arch), D_IN, SEEDS, dtype=torch.float64)
    bad = make_sae(_cfg(arch), D_IN, SEEDS, dtype=torch.float64)
    with torch.no_grad():
        bad.W_enc[1, 0, 0] = math.nan
    before = {n: p[1].clone() for n, p in bad.named_parameters()}
    loss = bad.loss(data[:B]).loss
    assert bad.finite_members(loss).tolist() == [True, False, True]
    opt_ref, opt_bad = StackedAdam(ref.parameters(), lr=LRS), StackedAdam(bad.parameters(), lr=LRS)
    _run(ref, opt_ref, data, 5)
    metrics = _run(bad, opt_bad, data, 5)
    assert metrics[-1]["updated"].tolist() == [True, False, True]
    assert opt_bad.step_count.tolist() == [5, 0, 5]
    for name, p in bad.named_parameters():
        for i in (0, 2):
            torch.testing.assert_close(p[i], ref.get_parameter(name)[i], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p[1], before[name], rtol=0, atol=0, equal_nan=True)


def test_stacked_adam_matches_torch_adam_and_adamw():
    for wd, torch_cls in [(0.0, torch.optim.Adam), (0.1, torch.optim.AdamW)]:
        gen = torch.Generator().manual_seed(0)
        p0 = torch.randn(1, 7, 5, generator=gen, dtype=torch.float64)
        mine, ref = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0[0].clone())
        opt = StackedAdam([mine], lr=[1e-2], weight_decay=wd)
        ref_opt = torch_cls([ref], lr=1e-2, weight_decay=wd)
        for _ in range(10):
            g = torch.randn(7, 5, generator=gen, dtype=torch.float64)
            mine.grad, ref.grad = g.unsqueeze(0).clone(), g.clone()
            opt.step()
            ref_opt.step()
        torch.testing.assert_close(mine[0], ref, rtol=1e-12, atol=1e-14)


def _reference_adam(params, grads, state, lr, wd, mask, t, betas=(0.9, 0.999), eps=1e-8):
    """Out-of-place masked Adam, the formula StackedAdam's in-place step must equal bit for
    bit: new tensors, then torch.where per member."""
    b1, b2 = betas
    step_size, bc2_sqrt, decay = lr / (1 - b1**t), (1 - b2**t).sqrt(), 1 - lr * wd
    out = []
    for p, g, (m, v) in zip(params, grads, state, strict=True):
        keep = bcast(mask, p).bool()
        m_new = m.lerp(g, 1 - b1)
        v_new = v * b2 + g * g * (1 - b2)
        denom = v_new.sqrt() / bcast(bc2_sqrt, p) + eps
        p_new = p * bcast(decay, p) - bcast(step_size, p) * m_new / denom
        pairs = ((p_new, p), (m_new, m), (v_new, v))
        out.append([torch.where(keep, new, old) for new, old in pairs])
    return out


@pytest.mark.parametrize("wd", [0.0, [0.0, 0.1, 0.01]])
def test_stacked_adam_in_place_equals_the_out_of_place_formula_bit_for_bit(wd):
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 16, 40), (3, 40), (3, 40, 16)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    lr = torch.tensor([1e-3, 3e-3, 1e-2], dtype=torch.float64)
    opt = StackedAdam(params, lr=lr, weight_decay=wd)
    ref = [[p.detach().clone(), torch.zeros(p.shape), torch.zeros(p.shape)] for p in params]
    t = torch.zeros(3, dtype=torch.float64)
    for step in range(6):
        mask = torch.tensor([True, step % 2 == 0, step != 3])
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step(update_mask=mask)
        t += mask
        wd_t = torch.as_tensor(wd, dtype=torch.float64).expand(3)
        ps, states = [r[0] for r in ref], [r[1:] for r in ref]
        ref = _reference_adam(ps, grads, states, lr, wd_t, mask, t.clamp_min(1))
        for p, m, v, (rp, rm, rv) in zip(params, opt.exp_avg, opt.exp_avg_sq, ref, strict=True):
            assert torch.equal(p.detach(), rp) and torch.equal(m, rm) and torch.equal(v, rv)


def test_clip_grad_norm_is_per_member():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    q = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([[3.0, 0, 0, 0], [0.3, 0, 0, 0], [0, 0, 0, 0]])
    q.grad = torch.tensor([4.0, 0.4, 0.0])
    norms = clip_grad_norm_([p, q], max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(p.grad[0, 0], torch.tensor(0.6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.grad[:2], torch.tensor([0.8, 0.4]), rtol=1e-5, atol=1e-6)


def test_normalized_gradients_have_norm_max_norm_per_member():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    p.grad = torch.tensor([[3.0, 4.0, 0, 0], [0.3, 0.4, 0, 0], [0.3, 0.4, 0, 0]])
    norms = clip_grad_norm_([p], max_norm=2.0, normalize=torch.tensor([True, True, False]))
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5, 0.5], dtype=torch.float64))
    want = torch.tensor([[1.2, 1.6], [1.2, 1.6], [0.3, 0.4]])
    torch.testing.assert_close(p.grad[:, :2], want, rtol=1e-5, atol=1e-6)


def test_lr_schedule_and_default_lr():
    sched = LRSchedule(
        total_steps=100,
        warmup_steps=[10, 0, 0],
        decay=["none", "linear", "cosine"],
        decay_start=0.5,
    )
    assert sched.factor(0, 3).tolist() == pytest.approx([0.1, 1.0, 1.0])
    assert sched.factor(75, 3).tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert sched.factor(100, 3).tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert default_lr(2**14) == pytest.approx(1e-3)
    assert default_lr(2**16) == pytest.approx(5e-4)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_resume_from_safetensors_is_bit_identical(arch):
    data = _data(10)
    objective = ObjectiveConfig(sparsity_coeff=1e-3)

    def fresh():
        sae = make_sae(_member_cfgs(arch), D_IN, SEEDS, objective, dtype=torch.float64)
        return sae, StackedAdam(sae.parameters(), lr=LRS)

    sae, opt = fresh()
    _run(sae, opt, data, 6)
    blob_sae, blob_opt = save(sae.state_dict()), save(opt.state_dict())
    _run(sae, opt, data, 4, start=6)
    resumed, resumed_opt = fresh()
    resumed.load_state_dict(load(blob_sae))
    resumed_opt.load_state_dict(load(blob_opt))
    _run(resumed, resumed_opt, data, 4, start=6)
    for name, t in sae.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name


def test_a_state_with_the_moved_coefficient_buffers_loads():
    """Group checkpoints written before JumpReLU and Switch owned target_l0 and
    load_balance_coeff hold both for every stack; other unknown keys are still refused."""
    sae = make_sae(_cfg("topk"), D_IN, SEEDS)
    old = sae.state_dict() | {"target_l0": torch.zeros(3), "load_balance_coeff": torch.ones(3)}
    other = make_sae(_cfg("topk"), D_IN, [1, 2, 4])
    other.load_state_dict(old)
    for name, t in sae.state_dict().items():
        assert torch.equal(other.state_dict()[name], t), name
    with pytest.raises(RuntimeError, match="Unexpected key.*threshold"):
        other.load_state_dict(old | {"threshold": torch.zeros(3)})


@pytest.mark.parametrize("arch", ARCHS)
def test_export_folds_input_scale_into_raw_space(arch):
    scale = 0.37
    raw = _data(11) / scale
    sae = make_sae(_cfg(arch, dead_tokens=B), D_IN, SEEDS, dtype=torch.float64)
    sae.init_b_dec(raw[:256] * scale)
    opt = StackedAdam(sae.parameters(), lr=LRS)
    for s in range(10):
        train_step(sae, opt, raw[s * B : (s + 1) * B] * scale, s)
    sae.eval()
    x = raw[10 * B :]
    recon, _ = sae(x * scale)
    cfg = sae.sae_lens_cfg()
    for i in range(3):
        sd = sae.member_state_dict(i, input_scale=scale)
        assert sd["W_enc"].shape == (D_IN, D_SAE) and sd["W_dec"].shape == (D_SAE, D_IN)
        torch.testing.assert_close(apply_exported(cfg, sd, x), recon[i] / scale)
    clone = make_sae(_cfg(arch), D_IN, [0, 0, 0], dtype=torch.float64).eval()
    for i in range(3):
        load_member_state_dict(clone, i, sae.member_state_dict(i, input_scale=scale), scale)
    torch.testing.assert_close(clone(x * scale)[0], recon)


def test_sae_lens_cfg_fields():
    cfg = make_sae(_cfg("topk"), D_IN, [0]).sae_lens_cfg()
    assert cfg["architecture"] == "topk" and cfg["k"] == 8
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    assert make_sae(_cfg("batchtopk"), D_IN, [0]).sae_lens_cfg()["architecture"] == "jumprelu"
    assert make_sae(_cfg("relu"), D_IN, [0]).sae_lens_cfg()["apply_b_dec_to_input"] is False
    wide = dataclasses.replace(_cfg("topk"), d_sae=None, exp_factor=4)
    assert make_sae(wide, D_IN, [0]).d_sae == 4 * D_IN


@pytest.mark.parametrize("arch", ARCHS)
def test_per_member_inputs_equal_shared_input(arch):
    sae = make_sae(_cfg(arch), D_IN, SEEDS, dtype=torch.float64)
    x = _data(1)
    shared = sae.loss(x)
    per_member = sae.loss(x.expand(3, *x.shape).clone())
    torch.testing.assert_close(shared.loss, per_member.loss)
    torch.testing.assert_close(shared.metrics["fvu"], per_member.metrics["fvu"])
