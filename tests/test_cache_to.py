"""--train-data.cache-to: a live group writes the training text's activations as a collection."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from groups import group_trainer
from safetensors.torch import load_file
from test_collect import read_hook
from test_live_source import config  # noqa: F401 (the fixture)
from test_train import cfg as train_cfg
from test_train import last_commit, run_train

from saesweep.collect.config import CollectConfig
from saesweep.collect.run import collect
from saesweep.collect.sequences import VAL_EVERY
from saesweep.collect.source import ModelSource
from saesweep.collect.text import demo_corpus
from saesweep.data.reader import Reader
from saesweep.format.shards import SEQ_CHUNK_BITS
from saesweep.sae import SAEConfig
from saesweep.store import open_store
from saesweep.train.config import DataConfig, TrainConfig

HOOKS = ("resid.1", "resid.3")
PATHS = ("encoder.layer.1", "encoder.layer.3")
SHARD_TOKENS = 300


def write_toml(text: CollectConfig, path: Path, act_dtype: str = "float32") -> Path:
    path.write_text(
        f'dataset = "{text.dataset}"\nctx_len = 32\nbatch_size = 8\nact_dtype = "{act_dtype}"\n'
        f"shard_tokens = {SHARD_TOKENS}\n"
    )
    return path


def manifest(uri: str, hook: str) -> dict:
    return open_store(uri).get_json(f"{hook}/metadata.json")


def layers_sweep(path: Path, toml: Path, shuffle_tokens: int) -> Path:
    """A sweep file of two live SAEs on layers 1 and 3 (tagged l1, l3) of `toml`'s model."""
    live = {"source": "model", "collect": str(toml), "shuffle_tokens": shuffle_tokens}
    path.write_text(
        "def make_cfgs():\n"
        f"    return [{{'train_data': {{**{live!r}, 'layer': layer}}, "
        f"'val_data': {{**{live!r}, 'layer': layer}}, 'tag': f'l{{layer}}'}} for layer in (1, 3)]\n"
    )
    return path


def cached_group(toml: Path, cache_to: str) -> list[TrainConfig]:
    """A live group on layers 1 and 3 that caches to `cache_to`."""
    cfgs = []
    for layer in (1, 3):
        live = {"source": "model", "collect": str(toml), "layer": layer}
        data = DataConfig(**live, shuffle_tokens=1024, cache_to=cache_to)
        cfgs.append(
            train_cfg(
                "",
                seed=layer,
                train_data=data,
                val_data=DataConfig(uri="", **live),
                n_train=2048,
                n_val=256,
                ckpt_every=1000,
                device="cpu",
                sae=SAEConfig(arch="topk", d_sae=64, k=4),
            )
        )
    return cfgs


def assert_same_cache(got: str, want: str) -> None:
    """Both caches complete, with the same shard files and statistics for every hook."""
    for path in PATHS:
        got_meta, want_meta = manifest(got, path), manifest(want, path)
        assert got_meta["complete"] and got_meta["shards"] == want_meta["shards"], path
        stats = f"{path}/statistics.json"
        assert open_store(got).get_json(stats) == open_store(want).get_json(stats), path


@pytest.fixture(scope="module")
def cached(config, tmp_path_factory) -> tuple[Path, Path]:  # noqa: F811
    """A live group on layers 1 and 3 trained with a cache: (its collection config, cache)."""
    root = tmp_path_factory.mktemp("cached")
    toml, cache = write_toml(config, root / "live.toml"), root / "cache"
    cfgs = cached_group(toml, str(cache))
    results = group_trainer(cfgs, [root / "r1", root / "r3"], root / "state").train()
    assert [r["tokens_seen"] for r in results] == [2048, 2048]
    return toml, cache


def test_cache_equals_collect_of_the_train_split(config, cached, tmp_path):  # noqa: F811
    toml, cache = cached
    n_tokens = manifest(str(cache), PATHS[0])["n_tokens"]
    assert 2048 <= n_tokens < 2048 + 2 * 1024, "the windows training computed, no more"
    out = tmp_path / "collected"
    collect(
        dataclasses.replace(
            config,
            hooks=HOOKS,
            out=str(out),
            doc_split="train",
            max_tokens=n_tokens,
            shard_tokens=SHARD_TOKENS,
        )
    )
    for path in PATHS:
        got, want = manifest(str(cache), path), manifest(str(out), path)
        assert got["complete"] and want["complete"]
        assert len(got["shards"]) > 3
        assert got["shards"] == want["shards"], "the same shard files (checksums)"
        assert {k: got[k] for k in got if k != "shards"} == {
            k: want[k] for k in want if k != "shards"
        }
        cached_tensors, collected = read_hook(str(cache), path), read_hook(str(out), path)
        for name in ("token_ids", "seq_ids", "positions", "acts"):
            assert torch.equal(cached_tensors[name], collected[name]), name
        documents = cached_tensors["seq_ids"] >> SEQ_CHUNK_BITS
        assert not bool((documents % VAL_EVERY == VAL_EVERY - 1).any()), "train split only"
        got_stats = open_store(str(cache)).get_json(f"{path}/statistics.json")
        want_stats = open_store(str(out)).get_json(f"{path}/statistics.json")
        assert got_stats["n"] == want_stats["n"] == n_tokens
        for key in ("mean", "std", "m2"):
            torch.testing.assert_close(
                torch.tensor(got_stats[key], dtype=torch.float64),
                torch.tensor(want_stats[key], dtype=torch.float64),
                rtol=1e-9,
                atol=1e-9,
            )
    stored, wanted = (json.loads((p / "cfg.json").read_text())["config"] for p in (cache, out))
    assert stored == wanted | {"max_tokens": None}
    reader = Reader(str(cache), hook="resid.3", batch_size=256, shuffle=False, drop_last=False)
    assert sum(len(b) for b in reader) == n_tokens, "a later sweep reads the cache"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["model", "2"], "holds a different collection (hooks: stored"),
        (["store", "1"], "--train-data.cache-to needs --train-data.source model"),
    ],
)
def test_a_cache_of_another_config_is_refused(cached, tmp_path, flags, message):
    toml, cache = cached
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    source, layer = flags
    proc = run_train(
        "--train-data.source", source, "--train-data.collect", str(toml),
        "--train-data.layer", layer, "--train-data.cache-to", str(cache),
        "--runs-root", str(tmp_path), "--executor", "debug", "--device", "cpu",
    )  # fmt: skip
    assert proc.wait() == 2
    err = proc.stderr.read().strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before, "nothing written"


def test_kill_9_and_resume_are_bit_identical_and_continue_the_cache(
    config,  # noqa: F811
    tmp_path,
):
    """A live group on two layers with a cache, killed with SIGKILL and resumed: the same SAEs
    as an uninterrupted run (the text position and the shuffle buffer are trainer state), and
    the same cache, with no sequence missing or twice."""
    toml = write_toml(config, tmp_path / "live.toml")
    sweep = layers_sweep(tmp_path / "live.py", toml, shuffle_tokens=512)
    args = [
        "--sweep", str(sweep), "--executor", "debug", "--n-train", "4096", "--batch-size", "128",
        "--n-val", "256", "--ckpt-every", "5", "--log-every", "5", "--downstream-sequences", "0",
        "--wandb-mode", "disabled", "--sae.d-sae", "64", "--sae.k", "4", "--device", "cpu",
    ]  # fmt: skip
    ref_cache, cache = str(tmp_path / "ref-cache"), str(tmp_path / "cache")
    ref = run_train(
        *args, "--runs-root", str(tmp_path / "ref"), "--train-data.cache-to", str(ref_cache)
    )
    assert ref.wait() == 0, ref.stderr.read()
    proc = run_train(
        *args, "--runs-root", str(tmp_path / "killed"), "--train-data.cache-to", str(cache)
    )
    while proc.poll() is None:
        if last_commit(tmp_path / "killed").get("step", 0) >= 10:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "still training when killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    part = open_store(cache).get_json("parts/machine-0000-of-0001.json")
    assert not part["complete"] and part["seq_done"] > 0, "killed with a partial cache"
    (killed_dir,) = (tmp_path / "killed").iterdir()
    assert not list(killed_dir.glob("runs/*/metrics.json")), "killed before the end"
    resumed = run_train("--resume", str(killed_dir), "--executor", "debug")
    assert resumed.wait() == 0, resumed.stderr.read()
    (ref_dir,) = (tmp_path / "ref").iterdir()
    for run in ("run-000-l1", "run-001-l3"):
        want = load_file(str(ref_dir / "runs" / run / "sae_weights.safetensors"))
        got = load_file(str(killed_dir / "runs" / run / "sae_weights.safetensors"))
        assert all(torch.equal(want[k], got[k]) for k in want), run
    assert_same_cache(cache, ref_cache)
    for path in PATHS:
        assert manifest(cache, path)["n_tokens"] >= 4096
        got_tensors, want_tensors = read_hook(cache, path), read_hook(ref_cache, path)
        assert torch.equal(got_tensors["token_ids"], want_tensors["token_ids"])
        seq_ids = got_tensors["seq_ids"].unique_consecutive()
        assert len(seq_ids) == len(seq_ids.unique()), "no sequence twice"


def test_a_group_over_two_processes_writes_the_same_cache(cached, tmp_path):  # noqa: F811
    """--procs-per-group 2: rank 0 alone runs the model and writes the cache, which holds the
    same shards and statistics as the one-process group of `cached`."""
    toml, local = cached
    sweep = layers_sweep(tmp_path / "live.py", toml, shuffle_tokens=1024)
    cache = tmp_path / "cache"
    proc = run_train(
        "--sweep", str(sweep), "--executor", "local", "--procs-per-group", "2",
        "--n-train", "2048", "--batch-size", "128", "--n-val", "256", "--ckpt-every", "1000",
        "--downstream-sequences", "0", "--absorption.n-tokens", "0", "--wandb-mode", "disabled",
        "--sae.d-sae", "64", "--sae.k", "4", "--device", "cpu", "--runs-root",
        str(tmp_path / "runs"), "--train-data.cache-to", str(cache),
    )  # fmt: skip
    assert proc.wait() == 0, proc.stderr.read()
    assert_same_cache(str(cache), str(local))
    parts = [p.name for p in (cache / "parts").glob("*.json")]
    assert parts == ["machine-0000-of-0001.json"], "one writer"


def test_a_whole_epoch_completes_the_cache(config, tmp_path):  # noqa: F811
    path = tmp_path / "few.jsonl"
    path.write_text(
        "".join(json.dumps({"text": d[:600]}) + "\n" for d in itertools.islice(demo_corpus(), 60))
    )
    few = dataclasses.replace(config, dataset=str(path), hooks=("resid.3",))
    source = ModelSource(
        few, ["resid.3"], batch_size=64, shuffle_tokens=300, seed=0, cache_to=str(tmp_path / "c")
    )
    first_epoch = itertools.takewhile(lambda served: served[1].epoch == 0, source.batches())
    served = [batch for batch, _ in first_epoch]
    meta = manifest(str(tmp_path / "c"), PATHS[1])
    assert meta["complete"], "complete at the end of the first epoch, before the second"
    collect(dataclasses.replace(few, out=str(tmp_path / "all"), doc_split="train"))
    assert meta["shards"] == manifest(str(tmp_path / "all"), PATHS[1])["shards"]
    assert sum(len(b.token_ids) for b in served) <= meta["n_tokens"]


def test_a_cache_on_s3_holds_the_same_shards(config, cached, s3_env, tmp_path):  # noqa: F811
    """The group of `cached` again, caching to S3: the same shard files (names, sizes,
    checksums) and statistics as the local cache, and a Reader over S3 serves them."""
    toml, local = cached
    cfgs = cached_group(toml, s3_env)
    group_trainer(cfgs, [tmp_path / "r1", tmp_path / "r3"], tmp_path / "state").train()
    assert_same_cache(s3_env, str(local))
    reader = Reader(s3_env, hook="resid.1", batch_size=256, shuffle=False, drop_last=False)
    assert sum(len(b) for b in reader) == manifest(s3_env, PATHS[0])["n_tokens"]
