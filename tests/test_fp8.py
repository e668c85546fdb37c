"""Scaled 8-bit float collections (act_dtype float8_e4m3fn): the codec against its reference,
real MiniLM activations within the documented bound, the same tokens and statistics as the
bfloat16 collection of the same config, the Reader, the shell, training and the live cache."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from groups import group_trainer
from test_cache_to import PATHS, SHARD_TOKENS, cached_group, manifest, write_toml
from test_live_source import config  # noqa: F401 (the fixture)
from test_train import cfg as train_cfg

from saesweep import Reader
from saesweep.collect.config import CollectConfig
from saesweep.collect.run import collect
from saesweep.errors import UserError
from saesweep.evaluate.downstream import read_collection
from saesweep.evaluate.features import inspect_features
from saesweep.format.quant import SAMPLE_ROWS, dequantize, dequantize_on_cpu, quantize
from saesweep.format.rundir import load_sae
from saesweep.format.shards import decode_shard
from saesweep.sae import SAEConfig
from saesweep.sae.export import exported_acts
from saesweep.shell import main as shell
from saesweep.store import open_store
from saesweep.train.config import DataConfig

FP8 = torch.float8_e4m3fn
HOOKS = ("resid.1", "resid.3")
HOOK_PATHS = ("encoder.layer.1", "encoder.layer.3")


def element_bound(reference: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The documented bound on |decoded - original| of each element: 2^-4 of its magnitude,
    or 2^-10 of its token's scale among the subnormals (float32 rounding aside)."""
    return torch.maximum(2.0**-4 * reference.abs(), 2.0**-10 * scales[:, None]) * (1 + 1e-6)


def test_cpu_decode_is_the_reference_bit_for_bit():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F].view(FP8)  # every code but the two NaNs
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([codes.repeat(3)[:640], (torch.randn(4096, generator=gen) * 50).to(FP8)])
    values = values.view(-1, 64)
    for scales in (
        torch.rand(len(values), generator=gen) * 2.0**-20,
        torch.rand(len(values), generator=gen) * 100,
        torch.rand(len(values), generator=gen) * 2.0**100,  # past the fused factor's range
    ):
        out = torch.empty(values.shape)
        got = dequantize_on_cpu(values, scales, out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got, dequantize(values, scales)), "bit for bit, signed zeros too"
        assert torch.equal(got.view(torch.int32), dequantize(values, scales).view(torch.int32))


def test_one_outlier_token_leaves_the_others_exact_to_the_bound():
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(64, 32, generator=gen)
    acts[7] *= 1e4
    values, scales = quantize(acts, FP8)
    err = (dequantize(values, scales) - acts).abs()
    assert bool((err <= element_bound(acts, scales)).all())
    assert float(err[:7].norm() / acts[:7].norm()) < 0.04
    zero = quantize(torch.zeros(2, 8), FP8)
    assert torch.equal(zero[1], torch.ones(2)) and not dequantize(*zero).any()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, str]:
    """The demo model's layers 1 and 3 collected twice from one config: in bfloat16 and in
    float8_e4m3fn."""
    root = tmp_path_factory.mktemp("fp8")
    base = CollectConfig(
        hooks=HOOKS, max_tokens=24000, shard_tokens=6000, batch_size=16, ctx_len=64,
        progress=False, device="cpu",
    )  # fmt: skip
    out = {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        out[dtype] = str(root / dtype)
        collect(dataclasses.replace(base, act_dtype=dtype, out=out[dtype]))
    return out


def raw_shards(uri: str, hook: str) -> list[dict[str, torch.Tensor]]:
    store = open_store(uri)
    meta = store.get_json(f"{hook}/metadata.json")
    return [decode_shard(store.get(f"{hook}/{s['name']}"), raw=True) for s in meta["shards"]]


def test_same_tokens_statistics_and_values_as_bfloat16(pair):
    for hook in HOOK_PATHS:
        bf16, fp8 = raw_shards(pair["bfloat16"], hook), raw_shards(pair["float8_e4m3fn"], hook)
        assert len(bf16) == len(fp8) >= 4
        for want, got in zip(bf16, fp8, strict=True):
            for name in ("token_ids", "seq_ids", "positions"):
                assert torch.equal(got[name], want[name]), name
            assert got["acts"].dtype == FP8 and "scales" not in want
            values, scales = quantize(want["acts"], FP8)
            assert torch.equal(got["acts"].view(torch.uint8), values.view(torch.uint8))
            assert torch.equal(got["scales"], scales)
        stats = [open_store(pair[d]).get_json(f"{hook}/statistics.json") for d in pair]
        assert stats[0] == stats[1], "statistics come from the values before quantization"


def test_round_trip_within_the_documented_bound_and_reported(pair):
    for hook in HOOK_PATHS:
        bf16, fp8 = raw_shards(pair["bfloat16"], hook), raw_shards(pair["float8_e4m3fn"], hook)
        sq_err = sq = 0.0
        for want, got in zip(bf16, fp8, strict=True):
            x = want["acts"].float()
            decoded = dequantize(got["acts"], got["scales"])
            assert bool(((decoded - x).abs() <= element_bound(x, got["scales"])).all())
            sample = slice(0, SAMPLE_ROWS)
            sq_err += float(((decoded[sample] - x[sample]).double() ** 2).sum())
            sq += float((x[sample].double() ** 2).sum())
        meta = open_store(pair["float8_e4m3fn"]).get_json(f"{hook}/metadata.json")
        report = meta["quantization"]
        assert math.isclose(report["rel_rms_error"], math.sqrt(sq_err / sq), rel_tol=1e-6)
        assert 0.01 < report["rel_rms_error"] < 0.04
        assert meta["schema_version"] == 2 and meta["dtype"] == "float8_e4m3fn"


def test_reader_serves_the_decoded_values_in_lockstep_and_resumes(pair):
    """The same tokens in the same order as the bfloat16 collection, each hook's rows decoded
    exactly from the quantized bfloat16 values; a resumed reader continues exactly."""
    uri = pair["float8_e4m3fn"]
    kw = {"hook": "resid.1", "extra_hooks": ["resid.3"], "batch_size": 1000, "seed": 5,
          "shuffle_tokens": 8000, "with_token_ids": True}  # fmt: skip
    batches, bf16 = list(Reader(uri, **kw)), list(Reader(pair["bfloat16"], **kw))
    assert len(batches) == len(bf16) >= 24
    for (got, ids), (want, want_ids) in zip(batches, bf16, strict=True):
        assert torch.equal(ids, want_ids)
        for hook in HOOK_PATHS:
            assert got[hook].dtype == torch.float32
            assert torch.equal(got[hook], dequantize(*quantize(want[hook], FP8)))
    reader = Reader(uri, **kw)
    head = [b for _, b in zip(range(3), reader, strict=False)]
    resumed = Reader(uri, **kw)
    resumed.load_state_dict(reader.state_dict())
    for (got, ids), (want, want_ids) in zip(head + list(resumed), batches, strict=True):
        assert torch.equal(ids, want_ids)
        assert all(torch.equal(got[h], want[h]) for h in HOOK_PATHS)


def test_shell_shows_the_report_and_half_the_bytes(pair, capsys):
    uri = pair["float8_e4m3fn"]
    assert shell([uri, "cd encoder.layer.3; inspect 0; sizecheck; verify"]) == 0
    out = capsys.readouterr().out
    assert "acts: shape [" in out and "dtype float8_e4m3fn" in out and "scales: shape [" in out
    assert "quantization (float8_e4m3fn, " in out and "relative RMS error 0.0" in out
    assert "bytes/token (tensor data alone: 404)" in out and "all ok" in out
    shell([pair["bfloat16"], "sizecheck"])
    assert "(tensor data alone: 784)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change,message",
    [
        ({"schema_version": 3}, "has schema_version 3, which this saesweep does not read"),
        ({"dtype": "float4_e2m1"}, "stores acts as dtype 'float4_e2m1', which this saesweep"),
    ],
)
def test_a_newer_schema_or_unknown_dtype_is_one_sentence(pair, tmp_path, change, message):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(pair["float8_e4m3fn"], root)
    path = root / HOOK_PATHS[0] / "metadata.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(UserError, match=message):
        Reader(str(root), hook="resid.1")


@pytest.fixture(scope="module")
def trained(pair, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """A TopK SAE trained on each collection of `pair` (same seed and order), evaluated on
    the same bfloat16 held-out shard: dtype -> (run dir, result)."""
    val = DataConfig(uri=pair["bfloat16"], hook="resid.3", shards="-1:", collect="")
    out = {}
    for dtype, uri in pair.items():
        run = train_cfg(
            uri,
            train_data=DataConfig(uri=uri, hook="resid.3", shards=":-1", collect=""),
            val_data=val,
            n_train=36000,
            n_val=4000,
            batch_size=256,
            device="cpu",
            sae=SAEConfig(arch="topk", d_sae=768, k=16),
        )
        root = tmp_path_factory.mktemp(dtype)
        result = group_trainer([run], [root / "run"], root / "state").train()[0]
        out[dtype] = (root / "run", result)
    return out


def test_topk_trained_on_fp8_matches_bfloat16_on_the_same_held_out_data(trained):
    fvu = {dtype: result["fvu"] for dtype, (_, result) in trained.items()}
    assert 0.05 < fvu["bfloat16"] < 0.6
    assert fvu["float8_e4m3fn"] != fvu["bfloat16"], "trained on other bytes"
    assert abs(fvu["float8_e4m3fn"] / fvu["bfloat16"] - 1) < 0.03, fvu


def test_feature_pages_read_fp8_collections(pair, trained):
    uri, (run_dir, _) = pair["float8_e4m3fn"], trained["float8_e4m3fn"]
    cfg, sd = load_sae(run_dir)
    coll = read_collection(uri, "resid.3", ":", names=("acts",))
    assert coll.tensors["acts"].dtype == torch.float32
    acts = exported_acts(cfg, sd, coll.tensors["acts"])
    latents = [int((acts > 0).sum(0).argmax()), 5]
    found, n_tokens = inspect_features(run_dir, uri, latents, top=6)
    assert n_tokens == len(acts)
    for report, latent in zip(found, latents, strict=True):
        want = acts[:, latent].topk(6).values
        got = torch.tensor([h.activation for h in report.hits])
        torch.testing.assert_close(got, want[want > 0])


def test_live_cache_in_fp8_equals_collect(config, tmp_path):  # noqa: F811
    toml = write_toml(config, tmp_path / "live.toml", act_dtype="float8_e4m3fn")
    cache = tmp_path / "cache"
    cfgs = cached_group(toml, str(cache))
    group_trainer(cfgs, [tmp_path / "r1", tmp_path / "r3"], tmp_path / "state").train()
    n_tokens = manifest(str(cache), PATHS[0])["n_tokens"]
    out = tmp_path / "collected"
    fields = dict(out=str(out), doc_split="train", max_tokens=n_tokens, shard_tokens=SHARD_TOKENS)
    collect(dataclasses.replace(config, hooks=HOOKS, act_dtype="float8_e4m3fn", **fields))
    for path in PATHS:
        got, want = manifest(str(cache), path), manifest(str(out), path)
        assert got["dtype"] == "float8_e4m3fn" and got["shards"] == want["shards"]
        assert got["quantization"] == want["quantization"]
    assert Path(cache / PATHS[0] / "statistics.json").exists()
