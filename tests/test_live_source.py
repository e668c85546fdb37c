"""The model as a data source (collect/source.py) against a collection of the same config."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from groups import group_trainer
from safetensors.torch import load_file
from test_collect import by_token, read_hook, small
from test_train import CPU_PARTITION, last_commit, run_train, weights
from test_train import cfg as train_cfg
from tiny_models import build

from saesweep.collect.config import CollectConfig
from saesweep.collect.run import collect
from saesweep.collect.sequences import VAL_EVERY
from saesweep.collect.source import ModelSource
from saesweep.collect.text import demo_corpus
from saesweep.data.hooksets import gather, parts
from saesweep.errors import UserError
from saesweep.evaluate.absorption import AbsorptionConfig, absorption_metrics
from saesweep.evaluate.downstream import load_run, measure, text_from_collection
from saesweep.format.shards import SEQ_CHUNK_BITS
from saesweep.sae import CLTConfig, CrosscoderConfig, SAEConfig
from saesweep.train.config import DataConfig, TrainConfig
from saesweep.train.sources import LiveSource
from saesweep.train.sweep import split_groups

HOOKS = {"resid.1": "encoder.layer.1", "resid.3": "encoder.layer.3"}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> CollectConfig:
    """110 documents of varied length: documents 49 and 99 are held out."""
    root = tmp_path_factory.mktemp("text")
    docs = [d[: 80 + 13 * i] for i, d in zip(range(110), demo_corpus(), strict=False)]
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return CollectConfig(
        dataset=str(path),
        hooks=tuple(HOOKS),
        ctx_len=32,
        batch_size=8,
        act_dtype="float32",
        out=str(root / "coll"),
        shard_tokens=1000,
        progress=False,
        device="cpu",
    )


@pytest.fixture(scope="module")
def collection(config) -> dict[str, dict[str, torch.Tensor]]:
    collect(config)
    return {path: by_token(read_hook(config.out, path)) for path in HOOKS.values()}


def one_epoch(source: ModelSource) -> dict[str, torch.Tensor]:
    """Every batch of the first epoch, concatenated."""
    batches = []
    for batch, pos in source.batches():
        if pos.epoch > 0:
            break
        batches.append(batch)
    out = {f"acts/{spec}": torch.cat([b.acts[spec] for b in batches]) for spec in HOOKS}
    for name in ("token_ids", "seq_ids", "positions"):
        out[name] = torch.cat([getattr(b, name) for b in batches])
    return out


def keys(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return tensors["seq_ids"] * 4096 + tensors["positions"].long()


def test_live_tokens_are_the_collections_in_lockstep(config, collection):
    stored = collection["encoder.layer.3"]
    for split in ("train", "val"):
        source = ModelSource(
            config, list(HOOKS), batch_size=64, shuffle_tokens=700, seed=3, split=split
        )
        live = one_epoch(source)
        docs = live["seq_ids"] >> SEQ_CHUNK_BITS
        held_out = docs % VAL_EVERY == VAL_EVERY - 1
        assert bool(held_out.all()) if split == "val" else not bool(held_out.any())
        in_split = ((stored["seq_ids"] >> SEQ_CHUNK_BITS) % VAL_EVERY == VAL_EVERY - 1) == (
            split == "val"
        )
        n_windows = -(-int(in_split.sum()) // 700)
        assert int(in_split.sum()) - len(live["token_ids"]) in range(0, 64 * n_windows)
        assert len(set(keys(live).tolist())) == len(live["token_ids"]), "no token twice"
        index = torch.searchsorted(keys(stored), keys(live))
        assert torch.equal(keys(stored)[index], keys(live)), "every live token is stored"
        assert torch.equal(stored["token_ids"][index], live["token_ids"])
        for spec, path in HOOKS.items():
            want = collection[path]["acts"][index]
            torch.testing.assert_close(live[f"acts/{spec}"], want, rtol=1e-2, atol=1e-2)


def test_batches_are_shuffled_across_sequences(config):
    source = ModelSource(config, ["resid.3"], batch_size=64, shuffle_tokens=2000, seed=0)
    batch, _ = next(source.batches())
    assert len(set(batch.seq_ids.tolist())) > 20, "a batch mixes many sequences"


def test_resume_from_a_position_continues_exactly(config, tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text(
        "".join(json.dumps({"text": d[:600]}) + "\n" for d in itertools.islice(demo_corpus(), 8))
    )
    few = dataclasses.replace(config, dataset=str(path))
    source = ModelSource(few, list(HOOKS), batch_size=64, shuffle_tokens=300, seed=5)
    run = list(itertools.islice(source.batches(), 40))
    assert {pos.window for _, pos in run} != {0} and {0, 1} <= {pos.epoch for _, pos in run}
    for cut in (3, 17, 33):
        resumed = ModelSource(few, list(HOOKS), batch_size=64, shuffle_tokens=300, seed=5)
        again = itertools.islice(resumed.batches(run[cut][1]), len(run) - cut - 1)
        for (want, want_pos), (got, got_pos) in zip(run[cut + 1 :], again, strict=True):
            assert got_pos == want_pos
            assert torch.equal(got.seq_ids, want.seq_ids)
            for spec in HOOKS:
                assert torch.equal(got.acts[spec], want.acts[spec])


def test_a_limited_source_computes_only_the_batches_it_serves(config, monkeypatch):
    """Two whole windows of 700 tokens, then 3 batches of 64: the last window is computed
    about 3 batches large, not 700 tokens."""
    unlimited = ModelSource(config, list(HOOKS), batch_size=64, shuffle_tokens=700, seed=3)
    want = list(itertools.islice(unlimited.batches(), 40))
    limit = sum(pos.window < 2 for _, pos in want) + 3
    source = ModelSource(config, list(HOOKS), batch_size=64, shuffle_tokens=700, seed=3)
    computed, forward = [], source._forward

    def counted(seqs):
        computed.append(forward(seqs))
        return computed[-1]

    monkeypatch.setattr(source, "_forward", counted)
    run = list(source.batches(limit=limit))
    assert len(run) == limit and [pos for _, pos in run[:-3]] == [
        pos for _, pos in want[: limit - 3]
    ]
    assert {pos.window for _, pos in run[-3:]} == {2}
    for (got, _), (same, _) in zip(run[:-3], want, strict=False):
        assert torch.equal(got.seq_ids, same.seq_ids)
    one_forward = config.batch_size * config.ctx_len
    # served tokens, two windows' dropped tails and at most one forward pass too many: the
    # last window holds under 3 * 64 + 64 + one_forward = 512 tokens, not 700
    assert sum(w.n_tokens for w in computed) < (limit + 2) * 64 + one_forward
    cut = limit - 2
    resumed = ModelSource(config, list(HOOKS), batch_size=64, shuffle_tokens=700, seed=3)
    again = list(resumed.batches(run[cut][1], limit=limit - cut - 1))
    assert [pos for _, pos in again] == [pos for _, pos in run[cut + 1 :]]
    assert torch.equal(again[-1][0].acts["resid.3"], run[-1][0].acts["resid.3"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_live_tokens_of_other_model_families_are_the_collections(tmp_path, family):
    """GPT-2 and Llama (MiniLM above): a first live batch is stored tokens of a collection of
    the same config, every hook's activations equal to bf16 precision."""
    model = str(build(family, tmp_path))
    cfg = small(tmp_path / "out", model=model, hooks=("resid.1", "mlp.2"), max_tokens=1200)
    collect(cfg)
    source = ModelSource(cfg, list(cfg.hooks), batch_size=128, shuffle_tokens=256, seed=1)
    batch, _ = next(source.batches())
    for spec, path in source.hooks.items():
        stored = by_token(read_hook(cfg.out, path))
        index = torch.searchsorted(keys(stored), keys(vars(batch)))
        assert torch.equal(keys(stored)[index], keys(vars(batch))), "every live token is stored"
        assert torch.equal(stored["token_ids"][index], batch.token_ids)
        want = stored["acts"][index].float()
        torch.testing.assert_close(batch.acts[spec].float(), want, rtol=2e-2, atol=2e-2)


def test_a_split_without_one_batch_is_one_sentence(config, tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text(json.dumps({"text": "one short document"}) + "\n")
    tiny = dataclasses.replace(config, dataset=str(path))
    source = ModelSource(tiny, ["resid.3"], batch_size=64, shuffle_tokens=100, seed=0)
    with pytest.raises(UserError, match="holds no whole batch of 64 tokens"):
        next(source.batches())


def live_cfg(toml: Path, layer: int, seed: int) -> TrainConfig:
    live = {"source": "model", "collect": str(toml), "layer": layer}
    return train_cfg(
        "",
        seed=seed,
        train_data=DataConfig(**live, shuffle_tokens=1024),
        val_data=DataConfig(uri="", **live),
        n_train=2048,
        n_val=256,
        device="cpu",
        sae=SAEConfig(arch="topk", d_sae=256, k=8),
    )


def test_one_forward_pass_feeds_saes_on_three_layers(config, tmp_path):
    toml = tmp_path / "live.toml"
    toml.write_text(
        f'dataset = "{config.dataset}"\nctx_len = 32\nbatch_size = 8\nact_dtype = "float32"\n'
    )
    cfgs = [live_cfg(toml, layer, 10 + layer) for layer in (1, 2, 3)]
    (group,) = split_groups(cfgs)
    assert len(group.runs) == 3, "hook and layer do not split a live group"
    together = group_trainer(cfgs, [tmp_path / f"g{i}" for i in range(3)], tmp_path / "gs").train()
    assert [m["tokens_seen"] for m in together] == [2048] * 3
    for i, cfg in enumerate(cfgs):
        (alone,) = group_trainer([cfg], [tmp_path / f"a{i}"], tmp_path / f"as{i}").train()
        assert alone["fvu"] == together[i]["fvu"]
        want = load_file(str(tmp_path / f"g{i}" / "sae_weights.safetensors"))
        got = load_file(str(tmp_path / f"a{i}" / "sae_weights.safetensors"))
        assert all(torch.equal(want[k], got[k]) for k in want)
        saved = json.loads((tmp_path / f"a{i}" / "cfg.json").read_text())
        assert saved["hook_name"] == f"encoder.layer.{cfg.train_data.layer}"
    assert together[0]["fvu"] != together[2]["fvu"], "each stack read its own layer"


def test_a_live_groups_downstream_and_absorption_run_on_its_held_out_documents(config, tmp_path):
    """Loss recovered and absorption of a live group come from the held-out documents: the
    same numbers as downstream fidelity and absorption on a collection of just those documents
    (collect.py --doc-split val)."""
    toml = tmp_path / "live.toml"
    toml.write_text(
        f'dataset = "{config.dataset}"\nctx_len = 32\nbatch_size = 8\nact_dtype = "float32"\n'
    )
    lenient = AbsorptionConfig(n_tokens=128, min_probe_f1=0.0, min_true_positives=1, max_k=3)
    cfg = dataclasses.replace(live_cfg(toml, 3, 0), downstream_sequences=6, absorption=lenient)
    (metrics,) = group_trainer([cfg], [tmp_path / "run"], tmp_path / "state").train()
    assert metrics["downstream_split"] == "val"
    assert metrics["downstream_sequences"] == 6
    assert 0 < metrics["final_recovered"] < 1
    val = dataclasses.replace(config, out=str(tmp_path / "val"), doc_split="val")
    collect(val)
    stored = text_from_collection(val.out, ["encoder.layer.3"], 6, shards=":")
    (want,) = measure(stored, [load_run(tmp_path / "run")], 6)
    assert metrics["final_recovered"] == pytest.approx(want["final_recovered"], rel=1e-6)
    (absorbed,) = absorption_metrics([tmp_path / "run"], val.out, ":", lenient)
    assert metrics["absorption_split"] == "val" and metrics["absorption_tokens"] == 128
    assert metrics["absorption_letters"] >= 1
    for key in ("absorption", "absorption_full", "absorption_letters", "absorption_tokens"):
        assert metrics[key] == pytest.approx(absorbed[key], rel=1e-6), key


def test_slurm_preemption_requeues_a_live_group_and_resumes_it_exactly(
    config, tmp_path, slurm_cluster
):
    """USR2 (Slurm's warning before preemption) makes the job save its state and requeue; the
    requeued job continues the text and the shuffle buffer: the same SAE as a debug run."""
    toml = tmp_path / "live.toml"
    toml.write_text(f'dataset = "{config.dataset}"\nctx_len = 32\nbatch_size = 8\n')
    live = {"source": "model", "collect": str(toml), "layer": 3, "shuffle_tokens": 1024}
    sweep = tmp_path / "live.py"
    sweep.write_text(
        f"def make_cfgs():\n    return [{{'train_data': {live!r}, 'val_data': {live!r}}}]\n"
    )
    args = [
        "--sweep", str(sweep), "--n-train", "12800", "--batch-size", "128", "--n-val", "256",
        "--ckpt-every", "5", "--downstream-sequences", "0", "--absorption.n-tokens", "0",
        "--wandb-mode", "disabled", "--sae.d-sae", "64", "--sae.k", "4", "--device", "cpu",
    ]  # fmt: skip
    ref = run_train(*args, "--executor", "debug", "--runs-root", str(tmp_path / "ref"))
    assert ref.wait() == 0, ref.stderr.read()
    slurm = ["--slurm-acct", "test", "--mem-gb", "1", *CPU_PARTITION]
    proc = run_train(*args, *slurm, "--runs-root", str(tmp_path / "slurm"))
    state = None
    while proc.poll() is None:
        if last_commit(tmp_path / "slurm").get("step", 0) >= 30:
            (state,) = (tmp_path / "slurm").glob("*/groups/group-000/state.json")
            break
        time.sleep(0.05)
    assert state is not None, "the Slurm job never saved its state"
    (log,) = state.parents[2].glob("logs/*_log.out")
    job_id = log.name.removesuffix("_log.out").removesuffix("_0")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    logs = "".join(p.read_text() for p in state.parents[2].glob("logs/*_log.*"))
    assert "Requeued job" in logs, logs
    (ref_run,) = (tmp_path / "ref").glob("*/runs/run-000")
    (slurm_run,) = (tmp_path / "slurm").glob("*/runs/run-000")
    expected, got = weights(ref_run), weights(slurm_run)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    metrics = json.loads((slurm_run / "metrics.json").read_text())
    assert metrics["tokens_seen"] == 12800 and metrics["slurm_job_id"]


CLT_LAYERS = (1, 2, 3)


def live_clt_cfg(toml: Path) -> TrainConfig:
    """A TopK CLT over layers 1-3 (resid -> mlp) trained from the model of `toml`."""
    clt = CLTConfig(layers=CLT_LAYERS, input_site="resid", target_site="mlp")
    live = {"source": "model", "collect": str(toml)}
    return train_cfg(
        "",
        train_data=DataConfig(**live, shuffle_tokens=1024),
        val_data=DataConfig(uri="", **live),
        n_train=4096,
        n_val=256,
        batch_size=256,
        lr=1e-2,
        log_every=2,
        device="cpu",
        sae=SAEConfig(arch="clt", d_sae=96, k=8, clt=clt),
    )


def test_a_live_clt_reads_the_collections_rows_of_its_hooks(config, tmp_path):
    """A CLT's input and target keys, served live, are the collection's rows of its six
    hooks for the same tokens, side by side in layer order."""
    toml = tmp_path / "live.toml"
    toml.write_text(
        f'dataset = "{config.dataset}"\nctx_len = 32\nbatch_size = 8\nact_dtype = "float32"\n'
    )
    (group,) = split_groups([live_clt_cfg(toml)])
    live = LiveSource(group.config, list(group.runs))
    specs = [f"{site}.{layer}" for site in ("resid", "mlp") for layer in CLT_LAYERS]
    assert sorted(live.hooks) == sorted(specs), "one forward pass serves every hook"
    stored_cfg = dataclasses.replace(
        config, hooks=tuple(specs), out=str(tmp_path / "coll"), max_tokens=4096
    )
    collect(stored_cfg)
    batch, _ = next(live.source.batches(limit=1))
    acts = {path: batch.acts[spec] for spec, path in live.hooks.items()}
    for key in (live.hook_of(group.runs[0]), live.target_of(group.runs[0])):
        stored = [by_token(read_hook(stored_cfg.out, path)) for path in parts(key)]
        index = torch.searchsorted(keys(stored[0]), keys(vars(batch)))
        assert torch.equal(keys(stored[0])[index], keys(vars(batch))), "every live token is stored"
        want = torch.cat([s["acts"][index] for s in stored], dim=-1)
        assert want.shape == (256, 3 * 384)
        torch.testing.assert_close(gather(acts, key), want, rtol=1e-2, atol=1e-2)
    assert parts(live.hook_of(group.runs[0]))[0] == live.hooks["resid.1"]
    assert parts(live.target_of(group.runs[0]))[2] == live.hooks["mlp.3"]


def test_a_live_clt_and_crosscoder_train_beside_an_sae_from_one_forward_pass(config, tmp_path):
    toml = tmp_path / "live.toml"
    toml.write_text(
        f'dataset = "{config.dataset}"\nctx_len = 32\nbatch_size = 8\nact_dtype = "float32"\n'
    )
    clt = live_clt_cfg(toml)
    clt = dataclasses.replace(clt, absorption=AbsorptionConfig(n_tokens=0))
    sae = dataclasses.replace(
        clt,
        train_data=dataclasses.replace(clt.train_data, layer=2),
        sae=SAEConfig(arch="topk", d_sae=96, k=8),
        seed=1,
    )
    crosscoder = dataclasses.replace(
        clt,
        sae=SAEConfig(
            arch="crosscoder", d_sae=96, k=8, crosscoder=CrosscoderConfig(layers=CLT_LAYERS)
        ),
        seed=2,
    )
    cfgs = [clt, sae, crosscoder]
    (group,) = split_groups(cfgs)
    assert len(group.runs) == 3, "a live CLT, an SAE and a crosscoder share one group"
    dirs = [tmp_path / "clt", tmp_path / "sae", tmp_path / "crosscoder"]
    clt_result, sae_result, xc_result = group_trainer(cfgs, dirs, tmp_path / "state").train()
    assert 0 < xc_result["fvu"] < 0.95 and len(xc_result["fvu_by_hook"]) == 3, xc_result
    lines = [json.loads(x) for x in (dirs[0] / "metrics.jsonl").open()]
    fvus = [x["fvu"] for x in lines if "fvu" in x]
    assert fvus[-1] < 0.9 * fvus[0], fvus
    assert clt_result["tokens_seen"] == 4096 and 0 < clt_result["fvu"] < 0.9, clt_result
    assert len(clt_result["fvu_by_hook"]) == 3 and sae_result["fvu"] < 0.9
    saved = json.loads((dirs[0] / "cfg.json").read_text())
    assert saved["hook_names"] == [f"encoder.layer.{layer}" for layer in CLT_LAYERS]
