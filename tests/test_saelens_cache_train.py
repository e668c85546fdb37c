"""train.py --train-data.uri on a SAELens activation cache: SAELens's own CacheActivationsRunner
caches a tiny random GPT-2's activations; train.py converts the cache once into a collection
holding exactly its rows, in order, and trains a TopK SAE on it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from datasets import Array2D, Dataset, Features, load_from_disk
from sae_lens.cache_activations_runner import CacheActivationsRunner
from sae_lens.config import CacheActivationsRunnerConfig
from tiny_models import build

from saesweep.data.saelens_cache import CONVERTED, collection_uri
from saesweep.errors import UserError
from saesweep.format.collection import read_collection
from saesweep.store import open_store
from saesweep.train.cli import main as train_main

REPO = Path(__file__).resolve().parent.parent
HOOK, D_IN, CONTEXT, SEQS_PER_BUFFER, BUFFERS = "transformer.h.1", 32, 16, 8, 3


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """SAELens's cache of HOOK on 24 windows of 16 tokens, in 3 Arrow files."""
    root = tmp_path_factory.mktemp("saelens-cache")
    model = build("gpt2", root)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1000, 2000, (SEQS_PER_BUFFER * BUFFERS, CONTEXT), generator=gen)
    tokens_per_buffer = SEQS_PER_BUFFER * CONTEXT
    cfg = CacheActivationsRunnerConfig(
        dataset_path="local",
        model_name=str(model),
        model_class_name="AutoModelForCausalLM",
        model_batch_size=4,
        hook_name=HOOK,
        d_in=D_IN,
        training_tokens=tokens_per_buffer * BUFFERS,
        context_size=CONTEXT,
        new_cached_activations_path=str(root / "cache"),
        buffer_size_gb=tokens_per_buffer * D_IN * 4 / 1e9,
        prepend_bos=False,
        streaming=False,
        shuffle=False,
        device="cpu",
    )
    CacheActivationsRunner(cfg, Dataset.from_dict({"input_ids": tokens.tolist()})).run()
    return root / "cache"


def test_the_converted_collection_holds_the_caches_rows_in_order(cache, tmp_path):
    rows = load_from_disk(str(cache)).with_format("torch")[:]
    assert len(rows["token_ids"]) == SEQS_PER_BUFFER * BUFFERS
    sweep = tmp_path / "sweep.py"
    sweep.write_text(
        "def make_cfgs():\n    return [{'sae': {'arch': 'topk', 'd_sae': 64, 'k': 4}}]\n"
    )
    flags = [
        "--sweep", str(sweep), "--train-data.uri", str(cache), "--runs-root", str(tmp_path),
        "--executor", "debug", "--device", "cpu", "--batch-size", "32", "--n-train", "1024",
        "--n-val", "64", "--log-every", "4", "--downstream-sequences", "0",
        "--wandb-mode", "disabled",
    ]  # fmt: skip
    assert train_main(flags) == 0
    stored = read_collection(str(cache / CONVERTED), HOOK, names=("acts",)).tensors
    assert torch.equal(stored["acts"], rows[HOOK].reshape(-1, D_IN))
    assert torch.equal(stored["token_ids"], rows["token_ids"].reshape(-1))
    assert stored["positions"].tolist() == list(range(CONTEXT)) * SEQS_PER_BUFFER * BUFFERS
    (run,) = tmp_path.glob("*/runs/*/metrics.jsonl")
    logged = [json.loads(line) for line in run.read_text().splitlines()]
    fvus = [entry["fvu"] for entry in logged if "fvu" in entry]
    assert len(fvus) >= 4
    assert all(math.isfinite(f) for f in fvus) and fvus[-1] < fvus[0]


def test_a_converted_cache_is_not_converted_again(cache, capsys):
    converted = collection_uri(str(cache))
    written = (Path(converted) / HOOK / "metadata.json").stat().st_mtime_ns
    capsys.readouterr()
    assert collection_uri(f"file://{cache}") == converted
    assert capsys.readouterr().out == ""
    assert (Path(converted) / HOOK / "metadata.json").stat().st_mtime_ns == written


def test_a_saved_dataset_without_activations_is_refused(tmp_path):
    Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(UserError, match="no Array2D column"):
        collection_uri(str(tmp_path / "text"))
    assert not list((tmp_path / "text").glob(f"*{CONVERTED}*"))


def tiny_cache(path: Path) -> None:
    """A one-row saved dataset of SAELens's cache layout at `path`."""
    features = Features({HOOK: Array2D(shape=(2, 3), dtype="float32")})
    Dataset.from_dict({HOOK: [[[0.0] * 3] * 2]}, features=features).save_to_disk(str(path))


@contextlib.contextmanager
def unwritable(cache: Path) -> Iterator[None]:
    """Inside: nothing can be created in `cache`, whoever runs train.py: read-only modes, and
    for root (who ignores them) the immutable attribute; pytest.skip where the filesystem has
    none (chattr)."""
    paths = [cache, *cache.rglob("*")]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    immutable = os.geteuid() == 0
    if immutable:
        done = subprocess.run(["chattr", "+i", str(cache)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"root may write anywhere and chattr +i failed: {done.stderr.strip()}")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(cache)], check=True)
        for path in paths:
            path.chmod(0o755)


def test_train_py_refuses_a_cache_its_user_cannot_write(tmp_path):
    cache = tmp_path / "cache"
    tiny_cache(cache)
    command = [
        sys.executable, str(REPO / "train.py"), "--train-data.uri", str(cache),
        "--runs-root", str(tmp_path / "runs"), "--executor", "debug",
        "--device", "cpu", "--wandb-mode", "disabled",
    ]  # fmt: skip
    with unwritable(cache):
        done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "is a SAELens activation cache" in line and "read-only" in line
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    )


def uploaded(cache: Path, uri: str) -> None:
    """The files SAELens wrote (not the converted collection) put under `uri`."""
    store = open_store(uri)
    for path in cache.iterdir():
        if path.is_file():
            store.put_file(path.name, path)


def test_a_cache_on_s3_is_converted_under_its_prefix(cache, s3_env, capsys):
    uploaded(cache, s3_env)
    converted = collection_uri(s3_env)
    assert converted == f"{s3_env}/{CONVERTED}"
    assert "converting the SAELens activation cache" in capsys.readouterr().out
    rows = load_from_disk(str(cache)).with_format("torch")[:]
    stored = read_collection(converted, HOOK, names=("acts",)).tensors
    assert torch.equal(stored["acts"], rows[HOOK].reshape(-1, D_IN))
    assert torch.equal(stored["token_ids"], rows["token_ids"].reshape(-1))
    assert collection_uri(s3_env) == converted
    assert capsys.readouterr().out == ""


def test_a_cache_on_s3_read_without_credentials_is_refused(cache, public_s3):
    uploaded(cache, public_s3)
    with pytest.raises(UserError, match="needs S3 credentials"):
        collection_uri(public_s3, anonymous=True)
    assert not [k for k in open_store(public_s3).list() if CONVERTED in k]
