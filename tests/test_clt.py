"""The cross-layer transcoder as a module: its loss and gradients against a plain float64
reference written out here, stacked == alone, resume, export in circuit-tracer's layout."""

from __future__ import annotations

import pytest
import torch
from members import assert_member_alone, assert_members_match_reference, member_schedule
from safetensors.torch import load, save

from saesweep.sae import CLTConfig, ObjectiveConfig, SAEConfig, make_sae
from saesweep.sae.clt import DenseCLTCodes, SparseCLTCodes
from saesweep.sae.jumprelu import JumpReLUConfig
from saesweep.sae.optim import LRSchedule, StackedAdam
from saesweep.sae.sparse import to_dense
from saesweep.sae.step import train_step

LAYERS, D, D_OUT, D_TC, B = (1, 2, 3), 8, 6, 16, 32
L = len(LAYERS)
ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu")
SEEDS, LRS = [3, 5, 7], [1e-3, 3e-3, 1e-2]
OBJECTIVES = [ObjectiveConfig(sparsity_coeff=c, sparsity_warmup_steps=w) for c, w in
              [(1e-3, 5), (3e-3, 0), (1e-2, 3)]]  # fmt: skip


def _cfg(activation: str, **kw) -> SAEConfig:
    jumprelu = JumpReLUConfig(bandwidth=0.5, init_threshold=0.2)
    clt = CLTConfig(layers=LAYERS, activation=activation)
    return SAEConfig(**(dict(arch="clt", d_sae=D_TC, k=3, clt=clt, jumprelu=jumprelu) | kw))


def _data(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, L * D], and a target [tokens, L * D_OUT] that depends on x nonlinearly."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, L * D, generator=gen, dtype=torch.float64)
    mix = torch.randn(L * D, L * D_OUT, generator=gen, dtype=torch.float64) / D
    return x, (x @ mix).relu() + 0.1 * torch.randn(tokens, L * D_OUT, generator=gen).double()


def _reference_loss(p: dict, x, y, activation, k, coeff, bandwidth):
    """One CLT in float64, loops over layers: FVU over all layers plus the sparsity penalty."""
    xs, ys, d_tc = x.view(-1, L, D), y.view(-1, L, D_OUT), p["W_enc"].shape[-1]
    recon = [p["b_dec"].view(L, D_OUT)[j].expand(len(x), -1) for j in range(L)]
    penalty = 0
    for i in range(L):
        pre = xs[:, i] @ p["W_enc"][i] + p["b_enc"].view(L, d_tc)[i]
        if activation == "topk":
            top = pre.relu().topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        elif activation == "batchtopk":  # this layer's k * B largest over the batch
            top = pre.relu().flatten().topk(k * len(x))
            f = torch.zeros_like(pre).flatten().scatter(0, top.indices, top.values).view_as(pre)
        elif activation == "relu":
            f = pre.relu()
            norms = p[f"W_dec_{i}"].flatten(1).norm(dim=1)
            penalty = penalty + (f * norms).sum(-1).mean()
        else:
            thr = p["threshold"].view(L, d_tc)[i]
            window = ((pre - thr).abs() < bandwidth / 2).double()
            active = (pre > thr).double()
            moved = (thr - thr.detach()) * window / bandwidth  # the straight-through estimator
            f = pre * active - moved * thr.detach()
            penalty = penalty + (active - moved).sum(-1).mean()
        for j in range(i, L):
            recon[j] = recon[j] + f @ p[f"W_dec_{i}"][:, j - i]
    sse = sum((recon[j] - ys[:, j]).pow(2).sum() for j in range(L))
    variance = sum((ys[:, j] - ys[:, j].mean(0)).pow(2).sum() for j in range(L))
    return sse / variance + coeff * penalty


SPARSE = dict(d_sae=64, k=2)
"""A TopK CLT whose codes are sparse (k / d_tc = 1/32 <= sparse.DENSE_ABOVE)."""


@pytest.mark.parametrize(
    ("activation", "shape"), [*((a, {}) for a in ACTIVATIONS), ("topk", SPARSE)]
)
def test_loss_and_gradients_equal_a_plain_reference(activation, shape):
    x, y = _data(B)
    cfg = _cfg(activation, **shape)
    sae = make_sae(cfg, D, SEEDS, OBJECTIVES, d_out=D_OUT, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)  # some pre-activations near the thresholds
    sparse = isinstance(sae.encode(x), SparseCLTCodes)
    assert sparse == (shape == SPARSE), "sparse codes exactly where k is a small part of d_tc"
    result = sae.loss(x, step=2, target=y)
    result.loss.sum().backward()
    assert result.metrics["l0"].min() > 0
    assert all(p.grad.abs().sum() > 0 for p in sae.parameters())  # thresholds' too

    def reference(p, coeff):
        return _reference_loss(p, x, y, activation, cfg.k, coeff, 0.5)

    assert_members_match_reference(sae, result, 2, reference)


def _reference_auxk(p: dict, x, y, recon, dead, aux_k) -> torch.Tensor:
    """AuxK in float64, loops over layers: each layer's aux_k largest ReLU pre-activations
    among its dead latents, decoded through the layer's blocks, against the residual."""
    xs, d_tc = x.view(-1, L, D), p["W_enc"].shape[-1]
    aux = torch.zeros(len(x), L, D_OUT, dtype=torch.float64)
    for i in range(L):
        pre = (xs[:, i] @ p["W_enc"][i] + p["b_enc"].view(L, d_tc)[i]).relu().where(dead[i], 0)
        top = pre.detach().topk(aux_k, dim=-1).indices  # live latents may fill in, at 0
        f = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top))
        for j in range(i, L):
            aux[:, j] = aux[:, j] + f @ p[f"W_dec_{i}"][:, j - i]
    residual = (y - recon).detach().view(-1, L, D_OUT)
    variance = sum((y.view(-1, L, D_OUT)[:, j] - y.view(-1, L, D_OUT)[:, j].mean(0)).pow(2).sum()
                   for j in range(L))  # fmt: skip
    scale = min(float(dead.sum()) / (L * aux_k), 1.0)
    return scale * (aux - residual).pow(2).sum() / variance


@pytest.mark.parametrize(
    ("activation", "shape"), [("topk", {}), ("topk", SPARSE), ("batchtopk", {})]
)
def test_auxk_equals_a_plain_reference(activation, shape):
    """A third of each layer's latents dead: AuxK's loss and every gradient against a float64
    loop (TopK with dense and with sparse codes, BatchTopK)."""
    x, y = _data(B)
    cfg = _cfg(activation, dead_tokens=1, aux_k=2, **shape)
    sae = make_sae(cfg, D, SEEDS, OBJECTIVES, d_out=D_OUT, dtype=torch.float64)
    d_tc = sae.d_tc
    dead = torch.zeros(L, d_tc, dtype=torch.bool)
    dead[:, ::3] = True
    sae.tokens_since_fired[:, dead.flatten()] = 10
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    result = sae.loss(x, step=2, target=y)
    result.loss.sum().backward()
    assert float(result.metrics["aux_loss"].min()) > 0

    def reference(p, coeff):
        recon = sae.decode(sae.encode(x)).detach()  # the members' reconstructions
        main = _reference_loss(p, x, y, activation, cfg.k, coeff, 0.5)
        return main + cfg.aux_coeff * _reference_auxk(p, x, y, recon[member[0]], dead, 2)

    member = [0]
    for i in range(sae.n):
        member[0] = i
        p = {name: t[i].detach().clone().requires_grad_() for name, t in sae.named_parameters()}
        want = reference(p, float(sae.sparsity_at(2)[i]))
        want.backward()
        torch.testing.assert_close(result.loss[i], want.detach(), rtol=1e-12, atol=0)
        for name, param in sae.named_parameters():
            torch.testing.assert_close(param.grad[i], p[name].grad, rtol=1e-10, atol=1e-12)


def test_sparse_decode_equals_the_dense_decode_of_the_same_codes():
    """float32: the sparse decode of a TopK CLT's codes, its output and the gradients it
    sends to the decoders and the encoder, equal the dense decode's to float tolerance."""
    x, y = (t.float() for t in _data(4 * B, seed=4))
    sae = make_sae(_cfg("topk", **SPARSE), D, SEEDS, d_out=D_OUT)
    sae.init_b_dec(y)
    grads, recons = [], []
    for dense in (False, True):
        sae.zero_grad()
        codes = sae.encode(x)
        if dense:
            acts = to_dense(codes.values, codes.indices, codes.d_sae)
            codes = DenseCLTCodes(acts, n_layers=L)
        recon = sae.decode(codes)
        (recon - y).pow(2).sum().backward()
        recons.append(recon.detach())
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
    torch.testing.assert_close(recons[0], recons[1], rtol=1e-5, atol=1e-5)
    for name, grad in grads[1].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-4)


def test_per_layer_fvu_and_l0_are_reported():
    x, y = _data(B)
    sae = make_sae(_cfg("topk"), D, [0], d_out=D_OUT, dtype=torch.float64)
    metrics = sae.loss(x, target=y).metrics
    recon, _ = sae(x)
    ys, rs = y.view(B, L, D_OUT), recon[0].view(B, L, D_OUT)
    for j, layer in enumerate(LAYERS):
        want = (rs[:, j] - ys[:, j]).pow(2).sum() / (ys[:, j] - ys[:, j].mean(0)).pow(2).sum()
        torch.testing.assert_close(metrics[f"fvu_layer_{layer}"][0], want)
    assert metrics["l0"].item() == 3 * L  # k per layer


def _train(sae, opt, x, y, steps, schedule=None, start=0):
    metrics = []
    for s in range(start, start + steps):
        if schedule is not None:
            opt.set_lr_factor(schedule.factor(s, sae.n))
        rows = slice(s * B, (s + 1) * B)
        metrics.append(train_step(sae, opt, x[rows], s, target=y[rows], normalize_grad=True))
    return metrics


@pytest.mark.parametrize(
    ("activation", "shape"), [*((a, {}) for a in ACTIVATIONS), ("topk", SPARSE)]
)
def test_stacked_clts_equal_separate_members(activation, shape):
    steps = 10
    x, y = _data(steps * B, seed=1)
    schedule = LRSchedule(total_steps=steps, warmup_steps=[0, 5, 3], decay=["linear"] * 3)
    cfgs = [_cfg(activation, dead_tokens=d, **shape) for d in (B, 2 * B, 3 * B)]
    stack = make_sae(cfgs, D, SEEDS, OBJECTIVES, d_out=D_OUT, dtype=torch.float64)
    stack.init_b_dec(y[:256])
    stacked = _train(stack, StackedAdam(stack.parameters(), lr=LRS), x, y, steps, schedule)
    for i in range(3):
        one = make_sae(cfgs[i], D, [SEEDS[i]], OBJECTIVES[i], d_out=D_OUT, dtype=torch.float64)
        one.init_b_dec(y[:256])
        opt = StackedAdam(one.parameters(), lr=[LRS[i]])
        alone = _train(one, opt, x, y, steps, member_schedule(schedule, i, 3))
        assert_member_alone(stack, i, one, stacked, alone, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_resume_from_safetensors_is_bit_identical(activation):
    x, y = _data(10 * B, seed=2)

    def fresh():
        sae = make_sae(_cfg(activation), D, SEEDS, OBJECTIVES, d_out=D_OUT, dtype=torch.float64)
        return sae, StackedAdam(sae.parameters(), lr=LRS)

    sae, opt = fresh()
    _train(sae, opt, x, y, 6)
    blobs = save(sae.state_dict()), save(opt.state_dict())
    _train(sae, opt, x, y, 4, start=6)
    resumed, resumed_opt = fresh()
    resumed.load_state_dict(load(blobs[0]))
    resumed_opt.load_state_dict(load(blobs[1]))
    _train(resumed, resumed_opt, x, y, 4, start=6)
    for name, t in sae.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name


def test_batchtopk_keeps_a_running_threshold_per_layer_for_inference():
    """Each layer's threshold: the smallest activation the batch top-k kept, then moved with
    the momentum; inference keeps what exceeds it, and the export writes it per feature."""
    x, y = _data(3 * B, seed=4)
    sae = make_sae(_cfg("batchtopk"), D, SEEDS, d_out=D_OUT, dtype=torch.float64)
    opt = StackedAdam(sae.parameters(), lr=LRS)
    want = torch.full((len(SEEDS), L), -1.0, dtype=torch.float64)
    for s in range(3):
        rows = slice(s * B, (s + 1) * B)
        with torch.no_grad():
            acts = sae.encode(x[rows]).acts.view(len(SEEDS), B, L, D_TC)
        kept = acts.where(acts > 0, torch.inf).amin(dim=(1, 3))
        want = torch.where(want < 0, kept, 0.99 * want + 0.01 * kept)
        train_step(sae, opt, x[rows], s, target=y[rows])
    torch.testing.assert_close(sae.threshold, want)
    sae.eval()
    with torch.no_grad():
        pre = sae.pre_activations(x[:B])
        got = sae.encode(x[:B]).acts.view_as(pre)
    thr = want.view(len(SEEDS), 1, L, 1)
    torch.testing.assert_close(got, pre * (pre > thr), rtol=0, atol=0)
    assert 0 < (got > 0).sum(-1).double().mean() < 2 * 3
    sd = sae.member_state_dict(1)
    for j in range(L):
        torch.testing.assert_close(sd[f"threshold_{j}"], thr[1, 0, j].expand(D_TC))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(clt=CLTConfig()), "must name the layers"),
        (dict(clt=CLTConfig(layers=(2, 1))), "ascend"),
        (dict(clt=CLTConfig(layers=(1,), target_site="resid")), "must differ"),
        (dict(decoder_norm="unit"), "unit is not supported"),
        (dict(k=D_TC + 1), "must be <="),
    ],
)
def test_configs_that_cannot_be_built_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        make_sae(_cfg("topk", **change), D, [0], d_out=D_OUT)
