"""TopK and Switch training with the sparse encoder backward equal dense autograd references:
the loss and every parameter gradient, AuxK on dead latents included."""

import pytest
import torch
import torch.nn.functional as F

from saesweep.sae import ObjectiveConfig, SAEConfig, SwitchConfig, make_sae, sparse

D_IN, D_SAE, B, K = 32, 128, 96, 6


def _x(seed=0):
    return torch.randn(B, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _perturb(sae, seed=1):
    """Random biases: ReLU zeros inside the top k, a nonzero b_dec on the encoder input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        sae.b_enc[-1] -= 2.5


def _leaves(sae, i):
    return {name: p[i].detach().clone().requires_grad_() for name, p in sae.named_parameters()}


def _stack_grads(sae, x):
    loss = sae.loss(x).loss
    loss.sum().backward()
    return loss.detach(), {name: p.grad for name, p in sae.named_parameters()}


def _dense(values, indices, width):
    return values.new_zeros(values.shape[0], width).scatter(1, indices, values)


def _dense_topk_loss(sae, x, i, p):
    """Member i's TopK loss from dense autograd pre-activations (the textbook form)."""
    x_in = x - p["b_dec"]
    pre = (x_in @ p["W_enc"] + p["b_enc"]).relu()
    recon = _dense(*pre.topk(K), D_SAE) @ p["W_dec"] + p["b_dec"]
    total = (x - x.mean(0)).pow(2).sum()
    loss = (recon - x).pow(2).sum() / total
    dead = sae.dead_mask()[i]
    if dead.any():
        aux_recon = _dense(*pre.where(dead, 0).topk(sae.aux_k), D_SAE) @ p["W_dec"]
        scale = min(int(dead.sum()) / sae.aux_k, 1.0)
        aux = scale * (aux_recon - (x - recon).detach()).pow(2).sum() / total
        loss = loss + sae.aux_coeff[i] * aux
    return loss


def _assert_matches_reference(sae, x, reference):
    loss, grads = _stack_grads(sae, x)
    for i in range(sae.n):
        leaves = _leaves(sae, i)
        want = reference(sae, x, i, leaves)
        want.backward()
        torch.testing.assert_close(loss[i], want.detach(), rtol=1e-12, atol=1e-14)
        for name, leaf in leaves.items():
            torch.testing.assert_close(grads[name][i], leaf.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dense_above", [0.0, 1.0], ids=["dense-backward", "sparse-backward"])
def test_topk_loss_and_grads_match_dense_reference_with_dead_latents(dense_above, monkeypatch):
    monkeypatch.setattr(sparse, "DENSE_ABOVE", dense_above)
    cfgs = [SAEConfig(arch="topk", d_sae=D_SAE, k=K, aux_k=12, aux_coeff=c) for c in (0.5, 1, 2)]
    sae = make_sae(cfgs, D_IN, [0, 1, 2], dtype=torch.float64)
    _perturb(sae)
    with torch.no_grad():
        sae.tokens_since_fired[1, :5] = 10**9  # fewer dead latents than aux_k
        sae.tokens_since_fired[2, ::2] = 10**9  # more than aux_k; member 0: none
    pre = sae.detached_pre(sae.encoder_input(_x()))
    assert (pre.topk(K).values[-1] == 0).any(), "test should cover ReLU zeros in the top k"
    _assert_matches_reference(sae, _x(), _dense_topk_loss)


def test_topk_grads_match_dense_reference_without_dead_latents():
    sae = make_sae(SAEConfig(arch="topk", d_sae=D_SAE, k=K), D_IN, [3, 4], dtype=torch.float64)
    _perturb(sae, seed=2)
    _assert_matches_reference(sae, _x(5), _dense_topk_loss)


def _dense_switch_loss(sae, x, i, p):
    """Member i's Switch loss with every token kept: dense pre-activations, own expert's top k."""
    E, m = sae.n_experts, sae.expert_width
    x_in = x - p["b_dec"]
    probs = (x_in @ p["W_router"] + p["b_router"]).softmax(-1)
    prob, expert = probs.max(-1)
    pre = (x_in @ p["W_enc"] + p["b_enc"]).relu().view(B, E, m)
    rows = torch.arange(B)
    own = _dense(*pre[rows, expert].topk(K), m) * prob.unsqueeze(1)
    acts = pre.new_zeros(B, E, m).index_put((rows, expert), own)
    recon = acts.view(B, D_SAE) @ p["W_dec"] + p["b_dec"]
    load = E * (F.one_hot(expert, E).to(x.dtype).mean(0) * probs.mean(0)).sum()
    return (recon - x).pow(2).mean() + sae.load_balance_coeff[i] * load


def test_switch_loss_and_grads_match_dense_reference():
    cfg = SAEConfig(arch="switch", d_sae=D_SAE, k=K, switch=SwitchConfig(4, capacity_factor=4.0))
    objectives = [ObjectiveConfig(load_balance_coeff=c) for c in (0.01, 0.5)]
    sae = make_sae(cfg, D_IN, [0, 1], objectives, dtype=torch.float64)
    _perturb(sae)
    _assert_matches_reference(sae, _x(6), _dense_switch_loss)


def _dense_batchtopk_loss(sae, x, i, p):
    """Member i's BatchTopK loss: the top k * B dense autograd pre-activations of the batch."""
    pre = ((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu().flatten()
    values, flat = pre.topk(K * B)
    acts = pre.new_zeros(pre.shape).scatter(0, flat, values).view(B, D_SAE)
    recon = acts @ p["W_dec"] + p["b_dec"]
    return (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


@pytest.mark.parametrize("dense_above", [0.0, 1.0], ids=["dense-backward", "sparse-backward"])
def test_batchtopk_loss_and_grads_match_dense_reference(dense_above, monkeypatch):
    monkeypatch.setattr(sparse, "DENSE_ABOVE", dense_above)
    cfg = SAEConfig(arch="batchtopk", d_sae=D_SAE, k=K)
    sae = make_sae(cfg, D_IN, [0, 1], dtype=torch.float64)
    _perturb(sae)
    x = _x(7)
    _, codes = sae(x)
    per_token = (codes.values > 0).sum(-1)
    assert per_token.sum(-1).tolist() == [K * B, K * B] and per_token.min() < per_token.max()
    _assert_matches_reference(sae, x, _dense_batchtopk_loss)


def test_topk_under_bf16_autocast_keeps_float32_codes_and_grads():
    sae = make_sae(SAEConfig(arch="topk", d_sae=D_SAE, k=K), D_IN, [0, 1])
    x = _x().float()
    ref_loss, ref_grads = _stack_grads(sae, x)
    sae.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):
        _, codes = sae(x)
        loss, grads = _stack_grads(sae, x)
    assert codes.pre.dtype == torch.bfloat16 and codes.values.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=0.02, atol=0)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        cos = F.cosine_similarity(grad.flatten(1), ref_grads[name].flatten(1), dim=1)
        assert cos.min() > 0.95, name
