"""signum_schedulefree: the paper's recurrences, stacked members equal to members alone,
resume, and the averaged weights the trainer evaluates and exports."""

import pytest
import torch
from members import member_schedule
from safetensors.torch import load, save
from synthetic import sparse_mixture

from saesweep.sae import SAEConfig, make_sae
from saesweep.sae.optim import LRSchedule, default_lr
from saesweep.sae.schedulefree import StackedSignumScheduleFree
from saesweep.sae.step import train_step

D_IN, D_SAE, B = 32, 128, 64
SEEDS, LRS = [3, 5, 7], [1e-3, 3e-3, 1e-2]


def _reference(p0: torch.Tensor, grads: list[torch.Tensor], lrs: list[float], beta: float):
    """(y, x) after the steps, from "The Road Less Scheduled" with sign descent on z and
    weights lr_max^2: x, z and y kept apart, the average's weights summed anew each step."""
    x, z, y = p0.clone(), p0.clone(), p0.clone()
    weights = []
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True)):
        z = z - lr * torch.sign(g)
        weights.append(max(lrs[: t + 1]) ** 2)
        c = weights[-1] / sum(weights)
        x = (1 - c) * x + c * z
        y = beta * x + (1 - beta) * z
    return y, x


def test_signum_schedulefree_follows_the_papers_recurrences():
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(1, 7, 5, generator=gen, dtype=torch.float64)
    param = torch.nn.Parameter(p0.clone())
    opt = StackedSignumScheduleFree([param], lr=[1e-2])
    factors = [0.25, 0.5, 0.75, 1.0, 1.0, 0.6, 0.3, 0.1]  # warmup, then decay
    grads = [torch.randn(7, 5, generator=gen, dtype=torch.float64) for _ in factors]
    for g, f in zip(grads, factors, strict=True):
        opt.set_lr_factor(f)
        param.grad = g.unsqueeze(0).clone()
        opt.step()
    y, x = _reference(p0[0], grads, [1e-2 * f for f in factors], beta=0.95)
    torch.testing.assert_close(param[0], y, rtol=1e-12, atol=1e-14)
    training = param.detach().clone()
    with opt.evaluation_point():
        torch.testing.assert_close(param[0], x, rtol=1e-12, atol=1e-14)
    assert torch.equal(param, training), "the training point comes back bit for bit"
    assert not torch.allclose(x, y)


def _run(sae, opt, data, steps, schedule, start=0):
    for s in range(start, start + steps):
        opt.set_lr_factor(schedule.factor(s, sae.n))
        train_step(sae, opt, data[s * B : (s + 1) * B], s)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_stacked_signum_schedulefree_equals_members_alone(arch):
    steps = 15
    data = sparse_mixture(steps * B, D_IN, seed=1, dtype=torch.float64)
    schedule = LRSchedule(steps, warmup_steps=[0, 5, 3], decay=["linear", "cosine", "none"])
    cfgs = [SAEConfig(arch=arch, d_sae=D_SAE, k=8, dead_tokens=d) for d in (2 * B, 10**9, B)]
    stack = make_sae(cfgs, D_IN, SEEDS, dtype=torch.float64)
    stack.init_b_dec(data[:256])
    opt = StackedSignumScheduleFree(stack.parameters(), LRS)
    _run(stack, opt, data, steps, schedule)
    for i in range(3):
        one = make_sae(cfgs[i], D_IN, [SEEDS[i]], dtype=torch.float64)
        one.init_b_dec(data[:256])
        one_opt = StackedSignumScheduleFree(one.parameters(), [LRS[i]])
        _run(one, one_opt, data, steps, member_schedule(schedule, i, 3))
        for name, p in one.named_parameters():
            assert torch.equal(stack.get_parameter(name)[i], p[0]), name
        with opt.evaluation_point(), one_opt.evaluation_point():
            for name, p in one.named_parameters():
                assert torch.equal(stack.get_parameter(name)[i], p[0]), name


def test_signum_schedulefree_resumes_bit_identical():
    data = sparse_mixture(10 * B, D_IN, seed=2, dtype=torch.float64)
    schedule = LRSchedule(10, warmup_steps=4)

    def fresh():
        sae = make_sae(SAEConfig(d_sae=D_SAE, k=8, dead_tokens=B), D_IN, SEEDS)
        return sae.double(), StackedSignumScheduleFree(sae.parameters(), LRS)

    sae, opt = fresh()
    _run(sae, opt, data, 6, schedule)
    blob_sae, blob_opt = save(sae.state_dict()), save(opt.state_dict())
    _run(sae, opt, data, 4, schedule, start=6)
    resumed, resumed_opt = fresh()
    resumed.load_state_dict(load(blob_sae))
    resumed_opt.load_state_dict(load(blob_opt))
    _run(resumed, resumed_opt, data, 4, schedule, start=6)
    for name, t in sae.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name
    for name, t in opt.state_dict().items():
        assert torch.equal(t, resumed_opt.state_dict()[name]), name


def test_default_lr_of_signum_schedulefree_is_sparsifys():
    assert default_lr(2**14, "signum_schedulefree") == pytest.approx(5e-3)
    assert default_lr(1536, "signum_schedulefree") == pytest.approx(1.6330e-2, rel=1e-4)
