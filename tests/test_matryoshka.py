"""Matryoshka BatchTopK: the loss is the sum of its prefixes' FVUs (against a dense reference),
and its first prefix alone reconstructs the demo model's activations far better than as many
latents of a plain BatchTopK SAE."""

from __future__ import annotations

import json

import pytest
import torch
from groups import group_trainer
from synthetic import sparse_mixture
from test_collect import read_hook, small
from test_train import cfg as train_cfg

from saesweep.collect.run import collect
from saesweep.sae import MatryoshkaConfig, SAEConfig, make_sae
from saesweep.sae.base import total_variance
from saesweep.sae.optim import StackedAdam
from saesweep.sae.step import train_step


def test_loss_is_the_sum_of_the_prefixes_fvu():
    cfg = SAEConfig(
        arch="matryoshka", d_sae=64, k=4, matryoshka=MatryoshkaConfig((8, 24)), aux_coeff=0
    )
    sae = make_sae(cfg, 16, [0, 1])
    x = sparse_mixture(256, 16, seed=2)
    sae.init_b_dec(x)
    result = sae.loss(x)
    codes = sae.encode(x)
    acts = torch.zeros(2, 256, 64).scatter_add(2, codes.indices, codes.values)
    fvus = []
    for width in (8, 24, 64):
        recon = acts[..., :width] @ sae.W_dec[:, :width] + sae.b_dec.unsqueeze(1)
        fvus.append((recon - x).pow(2).sum((1, 2)) / total_variance(x))
    torch.testing.assert_close(result.loss, sum(fvus), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.metrics["prefix_fvu"], fvus[0] + fvus[1])
    torch.testing.assert_close(result.metrics["fvu"], fvus[2])


def test_widths_that_do_not_nest_are_refused():
    with pytest.raises(ValueError, match="must increase and stay below d_sae=64"):
        nested = MatryoshkaConfig(widths=(32, 16))
        make_sae(SAEConfig(arch="matryoshka", d_sae=64, k=4, matryoshka=nested), 16, [0])


@pytest.fixture(scope="module")
def demo_acts(tmp_path_factory) -> torch.Tensor:
    out = tmp_path_factory.mktemp("demo")
    collect(small(out, max_tokens=24000, act_dtype="float32", device="cpu"))
    acts = read_hook(str(out), "encoder.layer.3")["acts"]
    return acts * (acts.shape[1] ** 0.5 / acts.norm(dim=1).mean())


def prefix_fvu(sae, x: torch.Tensor, latents: torch.Tensor) -> float:
    """FVU of member 0 reconstructing x from `latents` only (the others zeroed)."""
    sae.eval()
    with torch.no_grad():
        acts = sae.encode(x).acts[0]
        recon = acts[:, latents] @ sae.W_dec[0, latents] + sae.b_dec[0]
    return float((recon - x).pow(2).sum() / total_variance(x))


def test_the_first_prefix_alone_beats_as_many_plain_latents(demo_acts):
    train_x, held_out = demo_acts[:-4096], demo_acts[-4096:]
    width, saes = 96, {}
    for arch in ("matryoshka", "batchtopk"):
        cfg = SAEConfig(arch=arch, d_sae=1536, k=16, matryoshka=MatryoshkaConfig((width, 384)))
        sae = make_sae(cfg, 384, [0])
        sae.init_b_dec(train_x[:4096])
        opt = StackedAdam(sae.parameters(), lr=[2e-3])
        for step in range(300):
            start = step * 512 % (len(train_x) - 512)
            train_step(sae, opt, train_x[start : start + 512], step)
        saes[arch] = sae
    first = prefix_fvu(saes["matryoshka"], held_out, torch.arange(width))
    plain = saes["batchtopk"].eval()
    with torch.no_grad():
        counts = (plain.encode(held_out).acts[0] > 0).sum(0)
    busiest = prefix_fvu(plain, held_out, counts.topk(width).indices)
    assert first < 0.8 * busiest, (first, busiest)


def test_checkpoint_records_the_widths(tmp_path):
    from synthetic import make_collection

    make_collection(str(tmp_path / "coll"), [512] * 4, d=16, sparse=True)
    cfg = train_cfg(
        str(tmp_path / "coll"),
        n_train=1024,
        n_val=256,
        device="cpu",
        sae=SAEConfig(arch="matryoshka", d_sae=64, k=4, matryoshka=MatryoshkaConfig((8, 16))),
    )
    group_trainer([cfg], [tmp_path / "run"], tmp_path / "state").train()
    saved = json.loads((tmp_path / "run" / "cfg.json").read_text())
    assert saved["matryoshka_widths"] == [8, 16, 64] and saved["architecture"] == "jumprelu"
