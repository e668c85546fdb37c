"""Per-architecture behaviour of the stacked SAEs on real tensors."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from groups import group_trainer
from synthetic import make_collection, sparse_mixture

from saesweep.sae import ObjectiveConfig, SAEConfig, make_sae, sparse
from saesweep.sae.base import geometric_median, squared_error, total_variance
from saesweep.sae.jumprelu import JumpReLUConfig
from saesweep.sae.optim import StackedAdam
from saesweep.sae.registry import single_hook_names
from saesweep.sae.sparse import to_dense
from saesweep.sae.step import train_step
from saesweep.sae.switch import SwitchConfig
from saesweep.train.config import DataConfig, TrainConfig

D_IN, D_SAE, B = 32, 128, 128


def _cfg(arch, **kw):
    return SAEConfig(**(dict(arch=arch, d_sae=D_SAE, k=4, switch=SwitchConfig(n_experts=4)) | kw))


def _x(n=B, seed=1):
    return sparse_mixture(n, D_IN, seed=seed)


def test_topk_l0_is_exactly_k():
    sae = make_sae(_cfg("topk", k=6), D_IN, [0, 1])
    x = torch.randn(B, D_IN) * 3
    _, codes = sae(x)
    assert (codes.values > 0).sum(-1).eq(6).all()
    assert sae.loss(x).metrics["l0"].tolist() == [6.0, 6.0]


def test_batchtopk_mean_l0_is_k_in_training_and_threshold_at_inference():
    sae = make_sae(_cfg("batchtopk", k=5), D_IN, [0, 1])
    opt = StackedAdam(sae.parameters(), lr=[1e-3, 1e-3])
    x = torch.randn(B, D_IN) * 3
    _, codes = sae(x)
    per_token = (codes.values > 0).sum(-1)
    assert per_token.float().mean(-1).tolist() == [5.0, 5.0]
    assert per_token.min() < per_token.max(), "batch top-k lets tokens differ in L0"
    metrics = train_step(sae, opt, x, 0)
    kept_min = codes.values.where(codes.values > 0, torch.inf).amin(dim=(1, 2))
    assert metrics["l0"].tolist() == [5.0, 5.0]
    assert sae.threshold.tolist() == pytest.approx(kept_min.tolist(), rel=0.05)
    sae.eval()
    pre = sae.linear_pre(x)
    _, codes = sae(x)
    expected = pre * (pre > sae.threshold.view(-1, 1, 1))
    assert torch.equal(codes.acts, expected)


def test_batchtopk_threshold_is_updated_in_float32_under_bf16_autocast():
    sae = make_sae(_cfg("batchtopk", k=5), D_IN, [0, 1])
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    with torch.autocast("cpu", torch.bfloat16):
        result = sae.loss(torch.randn(B, D_IN, generator=torch.Generator().manual_seed(4)) * 3)
    sample = result.threshold_sample
    assert sample.dtype == torch.float32 and (sample > 0).all()
    sae.after_optimizer_step(result)
    mom = sae.cfg.batchtopk.threshold_momentum
    assert torch.equal(sae.threshold, mom * torch.full((2,), 0.3) + (1 - mom) * sample)


def test_switch_vectorized_dispatch_matches_per_expert_loop():
    whole_batch = SwitchConfig(n_experts=4, capacity_factor=4.0)
    cfg = _cfg("switch", k=3, switch=whole_batch)
    sae = make_sae(cfg, D_IN, [0, 1])
    with torch.no_grad():
        sae.b_enc.normal_()
    x = _x()
    _, codes = sae(x)
    got = to_dense(codes.values, codes.indices, D_SAE)
    assert codes.dropped.tolist() == [0.0, 0.0]
    for i in range(2):
        torch.testing.assert_close(got[i], _switch_loop_reference(sae, i, x))


def _switch_loop_reference(sae, i, x):
    m = sae.expert_width
    x_in = x - sae.b_dec[i]
    probs = (x_in @ sae.W_router[i] + sae.b_router[i]).softmax(-1)
    p, expert = probs.max(-1)
    acts = torch.zeros(x.shape[0], sae.d_sae)
    for e in range(sae.n_experts):
        rows = (expert == e).nonzero().squeeze(1)
        block = slice(e * m, (e + 1) * m)
        pre = (x_in[rows] @ sae.W_enc[i][:, block] + sae.b_enc[i][block]).relu()
        v, j = pre.topk(sae.k, dim=-1)
        acts[rows.unsqueeze(1), j + e * m] = v * p[rows].unsqueeze(1)
    return acts.detach()


def test_switch_capacity_drops_tokens_past_capacity():
    sae = make_sae(_cfg("switch", switch=SwitchConfig(n_experts=4, capacity_factor=0.5)), D_IN, [0])
    x = _x()
    _, codes = sae(x)
    capacity = sae.capacity(B)
    _, expert = sae.route(sae.encoder_input(x))
    alive = (codes.values > 0).any(-1)[0]
    for e in range(sae.n_experts):
        tokens = (expert[0] == e).nonzero().squeeze(1)
        assert not alive[tokens[capacity:]].any()
    dropped = codes.dropped.item()
    expected = sum(max(0, int((expert[0] == e).sum()) - capacity) for e in range(4)) / B
    assert dropped == pytest.approx(expected) and dropped > 0


def test_switch_load_balance_loss_reaches_the_router():
    x = _x()

    def router_grad(coeff):
        sae = make_sae(_cfg("switch"), D_IN, [0], ObjectiveConfig(load_balance_coeff=coeff))
        result = sae.loss(x)
        result.loss.sum().backward()
        return sae.W_router.grad.clone(), result.metrics

    g0, m0 = router_grad(0.0)
    g1, m1 = router_grad(10.0)
    assert g0.abs().sum() > 0, "expert outputs scaled by router prob give the router a gradient"
    assert not torch.allclose(g0, g1)
    assert m1["load_balance"].item() >= 1.0 - 1e-6  # E * sum f P >= 1 with equality iff uniform
    assert m1["loss"].item() == pytest.approx(m1["mse"].item() + 10 * m1["load_balance"].item())


def test_switch_load_balance_spreads_tokens():
    x = _x(B * 100, seed=3)
    fractions = []
    for coeff in (0.0, 1.0):
        sae = make_sae(_cfg("switch"), D_IN, [0], ObjectiveConfig(load_balance_coeff=coeff))
        opt = StackedAdam(sae.parameters(), lr=[3e-3])
        for s in range(100):
            m = train_step(sae, opt, x[s * B : (s + 1) * B], s)
        fractions.append(m["load_balance"].item())
    assert fractions[1] < fractions[0]
    assert fractions[1] < 1.2


def test_jumprelu_threshold_gets_gradient_and_l0_penalty_counts_active():
    obj = ObjectiveConfig(sparsity_coeff=1e-2)
    cfg = _cfg("jumprelu", jumprelu=JumpReLUConfig(bandwidth=0.1, init_threshold=0.5))
    sae = make_sae(cfg, D_IN, [0], obj)
    result = sae.loss(_x())
    assert result.metrics["sparsity_loss"].item() == result.metrics["l0"].item()
    result.loss.sum().backward()
    assert sae.threshold.grad.abs().sum() > 0
    # thresholds near many pre-activations: the L0 term pushes them up (negative gradient)
    only_l0, x = make_sae(cfg, D_IN, [0], obj), _x()
    terms = only_l0.penalties(x, x, None, only_l0.encode(x), 0, total_variance(x))
    terms["sparsity_loss"][1].sum().backward()
    assert (only_l0.threshold.grad <= 0).all() and (only_l0.threshold.grad < 0).any()


def _papers_threshold_grad(sae, i, x, lam, eps):
    """Member i's d loss / d threshold by the paper's pseudo-derivatives, from dense raw
    pre-activations z: d/dt of z H(z - t) is -(t / eps) K((z - t) / eps), of H(z - t) is
    -(1 / eps) K((z - t) / eps), K the rectangle on (-1/2, 1/2)."""
    p = {k: v[i].detach() for k, v in sae.named_parameters()}
    z = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    t = p["threshold"]
    acts = (z * (z > t)).requires_grad_()
    ((acts @ p["W_dec"] + p["b_dec"] - x).pow(2).mean()).backward()
    kernel = ((z - t).abs() < eps / 2).to(z.dtype) / eps
    d_t = (acts.grad * -(t * kernel)).sum(0) + lam * (-kernel).mean(0)
    return d_t, (-kernel).mean(0)


def test_jumprelu_threshold_gradients_match_the_papers_estimator_below_half_bandwidth():
    # SAELens's defaults: threshold 0.01 < bandwidth / 2. A ReLU before the estimators made every
    # negative pre-activation a 0 inside the kernel window: -(1 / eps) P(z <= 0) extra
    lam, eps = 0.125, 0.05  # lam exact in the float32 buffer it is stored in
    cfg = _cfg("jumprelu", jumprelu=JumpReLUConfig(bandwidth=eps, init_threshold=0.01))
    sae = make_sae(cfg, D_IN, [0, 1], ObjectiveConfig(sparsity_coeff=lam), dtype=torch.float64)
    x = _x().double()
    sae.loss(x).loss.sum().backward()
    l0_only = make_sae(cfg, D_IN, [0, 1], dtype=torch.float64)
    terms = l0_only.penalties(x, x, None, l0_only.encode(x), 0, total_variance(x))
    terms["sparsity_loss"][1].sum().backward()
    for i in range(2):
        want, want_l0 = _papers_threshold_grad(sae, i, x, lam, eps)
        assert (want_l0 != 0).sum() > 10
        torch.testing.assert_close(sae.threshold.grad[i], want, rtol=1e-10, atol=1e-12)
        got_l0 = l0_only.threshold.grad[i]
        torch.testing.assert_close(got_l0, want_l0, rtol=1e-10, atol=1e-12)
        assert got_l0.mean().item() == pytest.approx(want_l0.mean().item(), rel=1e-10)


def _dense_jumprelu_loss(sae, x, step):
    """The reference: the paper's estimator on dense [n, B, d_sae] raw pre-activations z in
    plain autograd: H(z - t) with d/dt -(1 / eps) K, z H(z - t) with d/dz H and d/dt -(t / eps) K
    (K the rectangle on (-1/2, 1/2)); a dense decode."""
    eps, t = sae.cfg.jumprelu.bandwidth, sae.threshold.unsqueeze(1)
    z = sae.linear(x)
    on = (z > t).to(z.dtype)
    kernel = ((z - t).abs() < eps / 2).to(z.dtype).detach() / eps
    moved = t - t.detach()  # value 0, gradient 1 in t
    step_fn = on - kernel * moved
    acts = z * on - t.detach() * kernel * moved
    recon = acts @ sae.W_dec + sae.b_dec.unsqueeze(1)
    mse = (recon - x).pow(2).mean((1, 2))
    return mse + sae.sparsity_at(step) * step_fn.sum(-1).mean(-1)


@pytest.mark.parametrize(
    ("dense_above", "top"), [(0.0, 1.5), (1.0, 1.5), (0.375, 0.0)], ids=["dense", "sparse", "mixed"]
)
def test_jumprelu_paths_match_the_dense_reference(dense_above, top, monkeypatch):
    # sparse: each token's entries within reach of a threshold; thresholds spread so that
    # some sit below bandwidth / 2 (negative pre-activations in the window). mixed: member 0's
    # thresholds near 0 (dense), member 1's up to 1.5 (sparse)
    monkeypatch.setattr(sparse, "DENSE_ABOVE", dense_above)
    cfg = _cfg("jumprelu", jumprelu=JumpReLUConfig(bandwidth=0.05, init_threshold=0.01))
    obj = ObjectiveConfig(sparsity_coeff=0.01)
    sae = make_sae(cfg, D_IN, [0, 1], obj, dtype=torch.float64)
    with torch.no_grad():
        sae.threshold.uniform_(0.0, 1.5, generator=torch.Generator().manual_seed(0))
        sae.threshold[0] *= top / 1.5
    kinds = {type(c).__name__ for _, c in getattr(sae.encode(_x().double()), "groups", [])}
    assert kinds == ({"JumpReLUDenseCodes", "JumpReLUEntryCodes"} if top == 0 else set())
    x = _x().double()
    result = sae.loss(x, step=3)
    result.loss.sum().backward()
    got = {k: p.grad.clone() for k, p in sae.named_parameters()}
    sae.zero_grad()
    want = _dense_jumprelu_loss(sae, x, step=3)
    want.sum().backward()
    torch.testing.assert_close(result.loss, want, rtol=1e-12, atol=0)
    assert (got["threshold"] != 0).sum() > 20
    for k, p in sae.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize(("target_l0", "moves"), [(1.0, "up"), (float(D_SAE), "down")])
def test_jumprelu_threshold_moves_by_lr_and_stays_non_negative(target_l0, moves):
    # the threshold is trained itself: Adam's first step moves it by lr (its log moved it by
    # lr x 0.001 here); an L0 target far above or below L0 pushes every threshold with
    # pre-activations in its kernel window up or down, and a step below 0 is projected to 0
    cfg = _cfg("jumprelu", jumprelu=JumpReLUConfig(bandwidth=0.05, init_threshold=1e-3))
    sae = make_sae(cfg, D_IN, [0], ObjectiveConfig(sparsity_coeff=1.0, target_l0=target_l0))
    opt = StackedAdam(sae.parameters(), lr=[1e-2], betas=sae.adam_betas)
    train_step(sae, opt, _x(), 0, max_grad_norm=None)
    pushed = sae.threshold.grad[0] != 0
    assert pushed.sum() > 10
    moved = sae.threshold[0][pushed]
    if moves == "up":
        torch.testing.assert_close(moved, torch.full_like(moved, 1e-3 + 1e-2), rtol=1e-4, atol=0)
    else:
        assert torch.equal(moved, torch.zeros_like(moved))
    assert (sae.threshold >= 0).all()


def test_jumprelu_threshold_gradient_under_bf16_autocast_matches_float32():
    # bf16 spaces values 2^-7 apart near 1.0, wider than this kernel (|z - t| < 5e-4): with
    # bf16 pre-activations the window holds no value and the thresholds get no gradient.
    jumprelu = JumpReLUConfig(bandwidth=1e-3, init_threshold=1.003)
    cfg = SAEConfig(arch="jumprelu", d_sae=512, jumprelu=jumprelu, init_encoder_scale=1.0)
    sae = make_sae(cfg, 64, [0])
    x = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for autocast in (False, True):
        sae.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = sae.loss(x).loss
        loss.sum().backward()
        grads.append(sae.threshold.grad.clone())
    assert (grads[0] != 0).sum() > 100
    assert torch.equal(grads[1] != 0, grads[0] != 0)
    cos = torch.nn.functional.cosine_similarity(grads[1].flatten(), grads[0].flatten(), dim=0)
    assert cos > 0.99


def test_relu_l1_is_weighted_by_decoder_norms_and_warms_up():
    obj = ObjectiveConfig(sparsity_coeff=0.5, sparsity_warmup_steps=10)
    sae = make_sae(_cfg("relu"), D_IN, [0], obj)
    with torch.no_grad():
        sae.W_dec[0, :10] *= 3.0
    x = _x()
    _, codes = sae(x)
    norms = sae.W_dec[0].norm(dim=-1)
    expected = (codes.acts[0] * norms).sum(-1).mean()
    metrics = sae.loss(x, step=4).metrics
    assert metrics["sparsity_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(
        metrics["mse"].item() + 0.5 * 0.4 * expected.item(), rel=1e-5
    )
    assert sae.sparsity_at(20).item() == pytest.approx(0.5)
    assert sae.W_dec.norm(dim=-1).min().item() == pytest.approx(0.1, rel=1e-4)  # April-2024 init


def test_help_names_the_sparsity_coefficient_conversion():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "train.py"), "--help"], cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0
    help_text = " ".join(out.stdout.replace("\u2502", " ").split())  # without the box edges
    assert "--objective.sparsity-coeff" in help_text
    assert "is d_in x sparsity_coeff: pass lambda / d_in" in help_text


@pytest.mark.parametrize(
    ("arch", "decoder_norm", "unit"),
    [
        ("topk", "auto", True),
        ("topk", "free", False),
        ("relu", "auto", False),
        ("relu", "unit", True),
    ],
)
def test_decoder_norm_projects_the_gradient_and_renormalizes_rows_or_leaves_them(
    arch, decoder_norm, unit
):
    sae = make_sae(_cfg(arch, decoder_norm=decoder_norm), D_IN, [0, 1])
    opt = StackedAdam(sae.parameters(), lr=[1e-2, 1e-2])
    result = sae.loss(_x())
    result.loss.sum().backward()
    grad = sae.W_dec.grad.clone()
    sae.before_optimizer_step()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert (parallel.abs().max() < 1e-6) == unit
    assert torch.equal(sae.W_dec.grad, grad) != unit
    opt.step()
    sae.after_optimizer_step(result)
    norms = sae.W_dec.norm(dim=-1)
    assert torch.allclose(norms, torch.ones(2, D_SAE)) == unit


def test_decoder_renormalization_in_place_equals_the_masked_formula_bit_for_bit():
    sae = make_sae(_cfg("topk"), D_IN, [0, 1, 2])
    result = sae.loss(_x())
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(3, D_SAE, 1, generator=torch.Generator().manual_seed(0)) + 0.5)
    W = sae.W_dec.detach().clone()
    mask = torch.tensor([True, False, True])
    sae.after_optimizer_step(result, update_mask=mask)
    want = torch.where(mask.view(-1, 1, 1), W / W.norm(dim=-1, keepdim=True), W)
    assert torch.equal(sae.W_dec, want)


@pytest.mark.parametrize("per_member", [False, True])
def test_squared_error_equals_pow_sum_bit_for_bit_forward_and_backward(per_member):
    gen = torch.Generator().manual_seed(0)
    recon = torch.randn(3, B, D_IN, generator=gen, requires_grad=True)
    target = torch.randn(*((3,) if per_member else ()), B, D_IN, generator=gen)
    target.requires_grad_(True)
    weights = torch.randn(3, generator=gen)
    grads = []
    for fn in (squared_error, lambda r, t: (r - t).pow(2).sum(dim=(1, 2))):
        loss = fn(recon, target)
        grads.append((loss, *torch.autograd.grad((loss * weights).sum(), (recon, target))))
    for mine, ref in zip(*grads, strict=True):
        assert torch.equal(mine, ref)


def test_init_encoder_scale_scales_each_members_tied_encoder():
    cfgs = [_cfg("topk", init_encoder_scale=s) for s in (1.0, 0.25)]
    sae = make_sae(cfgs, D_IN, [0, 1])
    for i, scale in enumerate((1.0, 0.25)):
        torch.testing.assert_close(sae.W_enc[i], sae.W_dec[i].T * scale, rtol=0, atol=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(2, D_SAE))
    jumprelu = make_sae(_cfg("jumprelu"), D_IN, [0])  # its default, 0.1
    torch.testing.assert_close(jumprelu.W_enc[0], jumprelu.W_dec[0].T * 0.1, rtol=0, atol=0)


def test_dead_latent_counters_and_auxk():
    sae = make_sae(_cfg("topk", dead_tokens=2 * B, aux_k=16), D_IN, [0, 1])
    x = _x()
    result = sae.loss(x)
    fired = result.fired
    sae.after_optimizer_step(result, update_mask=torch.tensor([True, False]))
    assert torch.equal(sae.tokens_since_fired[0], torch.where(fired[0], 0, B))
    assert sae.tokens_since_fired[1].eq(0).all()
    with torch.no_grad():
        sae.tokens_since_fired[:, :64] = 10 * B  # half the latents dead
    result = sae.loss(x)
    assert result.metrics["dead_pct"].tolist() == [50.0, 50.0]
    assert (result.metrics["aux_loss"] > 0).all()
    result.loss.sum().backward()
    dead_enc_grad = sae.W_enc.grad[..., :64].abs().sum()
    assert dead_enc_grad > 0


def test_after_optimizer_step_uses_the_loss_result_it_is_given():
    # loss() leaves the module as it was; the counters and threshold follow the result passed
    sae = make_sae(_cfg("batchtopk", dead_tokens=2 * B), D_IN, [0, 1])
    state, attrs = {k: v.clone() for k, v in sae.state_dict().items()}, dict(vars(sae))
    first = sae.loss(_x(seed=1))
    second = sae.loss(torch.randn(B // 2, D_IN, generator=torch.Generator().manual_seed(2)))
    assert vars(sae) == attrs
    assert all(torch.equal(v, state[k]) for k, v in sae.state_dict().items())
    assert not torch.equal(first.fired, second.fired)
    assert (first.tokens, second.tokens) == (B, B // 2)
    sae.after_optimizer_step(first)
    assert torch.equal(sae.tokens_since_fired, torch.where(first.fired, 0, B))
    assert sae.threshold.tolist() == first.threshold_sample.tolist()
    assert first.threshold_sample.tolist() != second.threshold_sample.tolist()


def test_auxk_on_a_batch_without_variance_stops_no_member():
    cfgs = [_cfg("topk", dead_tokens=1, aux_coeff=c) for c in (1 / 32, 0.0)]
    sae = make_sae(cfgs, D_IN, [0, 1])
    opt = StackedAdam(sae.parameters(), lr=[1e-3, 1e-3])
    train_step(sae, opt, _x(), 0)
    assert sae.dead_mask().any(-1).all()
    same = _x(1).expand(2, D_IN).clone()  # variance exactly 0: AuxK was inf, and 0 * inf NaN
    metrics = train_step(sae, opt, same, 1)
    assert metrics["updated"].tolist() == [True, True]
    assert torch.isfinite(metrics["loss"]).all() and metrics["loss"][1] == metrics["fvu"][1]


def test_auxk_weight_against_reconstruction_does_not_depend_on_the_data_scale():
    # FVU and AuxK share the batch's total variance: scaling x scales both alike (it once
    # divided a per-element MSE, so AuxK's effective weight grew as 1 / variance)
    sae = make_sae(_cfg("topk", aux_k=16, aux_coeff=0.5), D_IN, [0, 1], dtype=torch.float64)
    with torch.no_grad():
        sae.tokens_since_fired[:, ::2] = 10**9
    terms = []
    for scale in (1.0, 100.0):
        m = sae.loss(_x().double() * scale).metrics
        aux = 0.5 * m["aux_loss"]
        terms.append((m["loss"] - aux, aux))
    (main_1, aux_1), (main_100, aux_100) = terms
    assert (aux_1 > 0).all()
    torch.testing.assert_close(aux_100 / main_100, aux_1 / main_1, rtol=1e-9, atol=0)
    torch.testing.assert_close(main_100, main_1, rtol=1e-9, atol=0)


def test_trainer_gives_jumprelu_adam_without_momentum(tmp_path):
    # Rajamanoharan et al. 2024 and dictionary_learning train JumpReLU with Adam beta1 = 0
    make_collection(str(tmp_path / "coll"), [256] * 2, d=D_IN)
    data = DataConfig(uri=str(tmp_path / "coll"), shards=":-1", collect="")
    base = TrainConfig(train_data=data, n_train=256, batch_size=128, wandb_mode="disabled")
    cfgs = [dataclasses.replace(base, sae=_cfg(arch)) for arch in ("jumprelu", "topk")]
    trainer = group_trainer(cfgs, [tmp_path / "a", tmp_path / "b"], tmp_path / "state")
    betas = {s.sae.arch: s.opt.betas for s in trainer.stacks}
    assert betas == {"jumprelu": (0.0, 0.999), "topk": (0.9, 0.999)}


def test_init_b_dec_geometric_median_resists_outliers():
    points = torch.randn(200, D_IN) * 0.1 + 1.0
    points[:20] = 1000.0
    sae = make_sae(_cfg("topk"), D_IN, [0, 1])
    sae.init_b_dec(points)
    assert (sae.b_dec - 1.0).abs().max() < 0.1
    assert torch.equal(sae.b_dec[0], sae.b_dec[1])
    mean_sae = make_sae(_cfg("topk", b_dec_init="mean"), D_IN, [0])
    mean_sae.init_b_dec(points)
    torch.testing.assert_close(mean_sae.b_dec[0], points.mean(0))
    square = torch.tensor([[0.0, 0], [2, 0], [0, 2], [2, 2]])
    torch.testing.assert_close(geometric_median(square).float(), torch.tensor([1.0, 1.0]))


def test_auto_b_dec_is_zeros_for_jumprelu_and_the_median_else():
    points = torch.randn(200, D_IN) * 0.1 + 1.0
    jump = make_sae(_cfg("jumprelu"), D_IN, [0])
    jump.init_b_dec(points)
    assert torch.equal(jump.b_dec, torch.zeros_like(jump.b_dec))
    median = make_sae(_cfg("jumprelu", b_dec_init="geometric_median"), D_IN, [0])
    median.init_b_dec(points)
    assert (median.b_dec - 1.0).abs().max() < 0.1


CONVERGENCE = {
    "topk": ObjectiveConfig(),
    "batchtopk": ObjectiveConfig(),
    "switch": ObjectiveConfig(load_balance_coeff=0.01),
    "relu": ObjectiveConfig(sparsity_coeff=1e-2, sparsity_warmup_steps=50),
    "jumprelu": ObjectiveConfig(sparsity_coeff=3e-3, sparsity_warmup_steps=50),
    "matryoshka": ObjectiveConfig(),
}


@pytest.mark.parametrize("arch", single_hook_names())
def test_every_architecture_learns_sparse_synthetic_data(arch):
    steps = 200
    data, held_out = _x(steps * B, seed=5), _x(1024, seed=6)
    jumprelu = JumpReLUConfig(bandwidth=0.05, init_threshold=0.1)
    switch = SwitchConfig(n_experts=2)  # each expert can hold all 64 directions
    cfg = _cfg(arch, dead_tokens=20 * B, jumprelu=jumprelu, switch=switch)
    sae = make_sae(cfg, D_IN, [0], CONVERGENCE[arch])
    sae.init_b_dec(data[:1024])
    opt = StackedAdam(sae.parameters(), lr=[1e-2])
    for s in range(steps):
        train_step(sae, opt, data[s * B : (s + 1) * B], s)
    sae.eval()
    with torch.no_grad():
        metrics = sae.loss(held_out).metrics
    assert metrics["fvu"].item() < 0.2, metrics  # measured 0.05 - 0.11
    assert metrics["l0"].item() < 48, metrics
