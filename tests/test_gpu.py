"""On a CUDA device (skipped without one): the Reader's pinned batches, the SAE fast paths and
a group trained on the GPU, CLTs and crosscoders, and the live source agree with the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import test_clt
import test_crosscoder
import torch
import torch.nn.functional as F
from synthetic import make_collection, sparse_mixture
from test_train import cfg, train

from saesweep import Reader
from saesweep.collect.config import CollectConfig
from saesweep.collect.source import ModelSource
from saesweep.sae import SAEConfig, SwitchConfig, make_sae
from saesweep.sae.registry import single_hook_names

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

D_IN, D_SAE, B = 64, 512, 256
SWITCH = SwitchConfig(n_experts=4)


@pytest.fixture(scope="module")
def coll(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("coll"))
    make_collection(uri, [3000, 2500, 4100, 1700], d=D_IN)
    return uri


def test_cuda_batches_equal_cpu_batches(coll):
    # each pinned host batch is released as soon as its copy is queued; slow matmuls after
    # each batch keep the stream busy, so a host buffer reused before its copy ran would show
    kw = dict(batch_size=256, shuffle_tokens=5000, seed=3, epochs=2)
    want = list(Reader(coll, **kw))
    busy = torch.randn(4096, 4096, device="cuda")
    got = []
    for batch in Reader(coll, device="cuda", **kw):
        assert batch.is_cuda
        for _ in range(4):
            busy = busy @ busy / busy.norm()
        got.append(batch)
    assert len(got) == len(want)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want, strict=True))


def test_fp8_decoded_on_cuda_equals_the_cpu_decode(tmp_path):
    """Scaled 8-bit batches travel to the GPU as bytes and scales and are decoded there, bit
    for bit as the CPU's numpy decode, with the pinned 8-bit buffers reused safely."""
    uri = str(tmp_path / "fp8")
    make_collection(uri, [3000, 2500, 4100, 1700], d=D_IN, dtype=torch.float8_e4m3fn)
    kw = dict(batch_size=256, shuffle_tokens=5000, seed=3, epochs=2)
    want = list(Reader(uri, **kw))
    busy = torch.randn(4096, 4096, device="cuda")
    got = []
    for batch in Reader(uri, device="cuda", **kw):
        assert batch.is_cuda and batch.dtype == torch.float32
        for _ in range(4):
            busy = busy @ busy / busy.norm()
        got.append(batch)
    assert len(got) == len(want)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want, strict=True))


def _loss_and_grads(sae, x):
    loss = sae.loss(x).loss
    loss.sum().backward()
    return loss.detach().cpu(), {n: p.grad.cpu() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("arch", single_hook_names())
def test_sae_loss_and_grads_on_cuda_equal_cpu(arch):
    cfg_ = SAEConfig(arch=arch, d_sae=D_SAE, k=8, switch=SWITCH, dead_tokens=1, aux_k=32)
    x = sparse_mixture(B, D_IN, seed=1, dtype=torch.float64)
    saes = [make_sae(cfg_, D_IN, [0, 1], dtype=torch.float64, device=d) for d in ("cpu", "cuda")]
    for sae in saes:
        sae.init_b_dec(x.to(sae.b_dec.device))
        sae.tokens_since_fired[:, : D_SAE // 2] = 10  # half the latents dead: AuxK on
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = (
        _loss_and_grads(sae, x.to(sae.b_dec.device)) for sae in saes
    )
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-9, atol=1e-12)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], grad, rtol=1e-7, atol=1e-10, msg=name)


LAYERED = [
    *((test_clt, a, {}) for a in test_clt.ACTIVATIONS),
    (test_clt, "topk", test_clt.SPARSE),
    *((test_crosscoder, a, {}) for a in test_clt.ACTIVATIONS),
]


@pytest.mark.parametrize(
    ("module", "activation", "shape"),
    LAYERED,
    ids=[f"{m.__name__.removeprefix('test_')}-{a}{'-sparse' if s else ''}" for m, a, s in LAYERED],
)
def test_clt_and_crosscoder_loss_and_grads_on_cuda_equal_cpu(module, activation, shape):
    """Cross-layer transcoders (dense and sparse codes) and crosscoders, every activation:
    the same members on the GPU as on the CPU, in float64."""
    cfg_ = module._cfg(activation, **shape)
    data = module._data(module.B)
    x, target = data if isinstance(data, tuple) else (data, None)
    kw = {"d_out": module.D_OUT} if target is not None else {}
    cpu = make_sae(cfg_, module.D, module.SEEDS, module.OBJECTIVES, dtype=torch.float64, **kw)
    with torch.no_grad():
        cpu.b_enc.normal_(0, 0.3)  # some pre-activations near the thresholds
    gpu = make_sae(
        cfg_, module.D, module.SEEDS, module.OBJECTIVES, dtype=torch.float64, device="cuda", **kw
    )
    gpu.load_state_dict(cpu.state_dict())
    results = []
    for sae in (cpu, gpu):
        device = sae.b_enc.device
        on = None if target is None else target.to(device)
        result = sae.loss(x.to(device), step=2, target=on)
        result.loss.sum().backward()
        grads = {n: p.grad.cpu() for n, p in sae.named_parameters()}
        results.append((result.loss.detach().cpu(), grads))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-9, atol=1e-12)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], grad, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "switch"])
def test_bf16_autocast_on_cuda_is_close_to_float32(arch):
    cfg_ = SAEConfig(arch=arch, d_sae=D_SAE, k=8, switch=SWITCH)
    sae = make_sae(cfg_, D_IN, [0, 1], device="cuda")
    x = sparse_mixture(B, D_IN, seed=2).cuda()
    ref_loss, ref_grads = _loss_and_grads(sae, x)
    sae.zero_grad()
    with torch.autocast("cuda", torch.bfloat16):
        loss, grads = _loss_and_grads(sae, x)
    torch.testing.assert_close(loss, ref_loss, rtol=0.02, atol=0)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        cos = F.cosine_similarity(grad.flatten(1), ref_grads[name].flatten(1), dim=1)
        assert cos.min() > 0.95, name


def test_group_trained_on_cuda_matches_cpu(tmp_path):
    uri = str(tmp_path / "coll")
    make_collection(uri, [512] * 5, d=16, sparse=True)
    base = cfg(uri, sae=SAEConfig(arch="topk", d_sae=64, k=4))
    ref = train([base], tmp_path / "cpu")[0]
    got = train([dataclasses.replace(base, device="cuda")], tmp_path / "cuda")[0]
    assert not got["failed"]
    assert got["fvu"] == pytest.approx(ref["fvu"], rel=0.05)
    assert got["l0"] == pytest.approx(ref["l0"], abs=0.1)


def test_live_source_on_cuda_runs_the_model_in_its_dtype_and_matches_cpu():
    """The demo model in bf16 on the GPU against float32 on the CPU: the same tokens in the
    same order, the window on the GPU, activations equal to bf16 precision."""
    base = CollectConfig(
        hooks=("resid.1", "resid.3"), ctx_len=64, batch_size=8, act_dtype="float32"
    )
    on_cpu = ModelSource(dataclasses.replace(base, device="cpu"), list(base.hooks), 256, 1024, 2)
    gpu_cfg = dataclasses.replace(base, device="cuda", model_dtype="bfloat16")
    on_gpu = ModelSource(gpu_cfg, list(base.hooks), 256, 1024, 2)
    assert next(on_gpu.hooked.model.parameters()).dtype == torch.bfloat16
    for (want, _), (got, _) in zip(on_cpu.batches(limit=6), on_gpu.batches(limit=6), strict=True):
        assert torch.equal(got.seq_ids, want.seq_ids) and torch.equal(got.positions, want.positions)
        for hook in base.hooks:
            assert got.acts[hook].is_cuda
            torch.testing.assert_close(got.acts[hook].cpu(), want.acts[hook], rtol=5e-2, atol=5e-2)
