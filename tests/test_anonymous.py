"""Anonymous (unsigned) reads of a public bucket on a real SeaweedFS server whose anonymous
identity may read and list one bucket: the Reader, the range reader, train.py, the collection
shell; writes without credentials are refused with one sentence (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from s3_ranges import get_range
from s3server import drop_credentials, without_credentials
from safetensors.torch import load_file
from synthetic import HOOK, make_collection

from saesweep import Reader
from saesweep.errors import UserError
from saesweep.format.shards import shard_name
from saesweep.store import open_store
from saesweep.store.s3_async import AsyncRangeReader

ROOT = Path(__file__).resolve().parents[1]
SIZES = [300, 250, 310, 90]
SMALL = {"batch_size": 64, "shuffle_tokens": 500, "prefetch_shards": 2, "prefetch_batches": 2}
WRITE_REFUSED = r"writing to s3://\S+ needs S3 credentials, but "


def batches(uri: str, **kw) -> list[torch.Tensor]:
    return list(Reader(uri, seed=5, with_token_ids=True, **{**SMALL, **kw}))


def test_an_anonymous_reader_reads_a_public_collection_bit_identically(
    public_s3, monkeypatch, tmp_path
):
    make_collection(public_s3, SIZES)
    signed = batches(public_s3)
    assert open_store(public_s3).access.signed
    drop_credentials(monkeypatch, tmp_path)
    store = open_store(public_s3)
    assert not store.access.signed and not store.access.forced
    unsigned = batches(public_s3)
    assert len(unsigned) == len(signed) > 0
    for a, b in zip(signed, unsigned, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_anonymous_overrides_credentials_the_public_bucket_would_reject(public_s3, monkeypatch):
    """With --anonymous no signature is sent: credentials that are wrong for this server
    (another account's) do not matter, in the boto3 client or in the async range reader."""
    make_collection(public_s3, SIZES)
    key = f"{HOOK}/{shard_name(0, 1)}"
    expected = open_store(public_s3).get(key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-accounts-secret")
    with pytest.raises(UserError, match="rejected the credentials"):
        open_store(public_s3).get(key)
    store = open_store(public_s3, anonymous=True)
    assert store.access.forced and not store.access.signed
    assert store.get(key) == expected and store.size(key) == len(expected)
    assert store.get_range(key, 10, 20) == expected[10:20]
    assert store.exists(key) and key in store.list()
    with store.range_reader(max_connections=4) as reader:
        assert get_range(reader, key, 0, len(expected)) == expected
    signed = AsyncRangeReader("b", "http://127.0.0.1:1")
    assert "Authorization" in signed._headers("http://127.0.0.1:1/b/k", 0, 4)
    unsigned = AsyncRangeReader("b", "http://127.0.0.1:1", anonymous=True)
    assert unsigned._headers("http://127.0.0.1:1/b/k", 0, 4) == {"Range": "bytes=0-3"}


def test_writes_without_credentials_are_refused_with_one_sentence(
    public_s3, s3_env, monkeypatch, tmp_path
):
    store = open_store(public_s3, anonymous=True)
    for write in (lambda: store.put("k", b"x"), lambda: store.delete("k"), store.check_writable):
        with pytest.raises(UserError, match=WRITE_REFUSED + "anonymous access was asked") as err:
            write()
        assert "AWS_ACCESS_KEY_ID" in str(err.value)
        assert "drop the anonymous option" in str(err.value)
    drop_credentials(monkeypatch, tmp_path)
    for uri in (public_s3, s3_env):
        with pytest.raises(UserError, match=WRITE_REFUSED + "no S3 credentials are configured"):
            open_store(uri).put("k", b"x")
    assert open_store(public_s3).list() == []


def test_an_anonymous_read_of_a_private_bucket_says_it_is_not_public(s3_env, monkeypatch, tmp_path):
    open_store(s3_env).put("obj", b"0123456789")
    drop_credentials(monkeypatch, tmp_path)
    store = open_store(s3_env)
    message = r"refused an anonymous \(unsigned\) request .* the bucket is not public"
    for call in (lambda: store.get("obj"), lambda: store.exists("obj"), store.list):
        with pytest.raises(UserError, match=message + ".*AWS_ACCESS_KEY_ID"):
            call()
    with store.range_reader() as reader, pytest.raises(UserError, match=message):
        get_range(reader, "obj", 0, 4)


def test_collect_without_credentials_exits_2_before_loading_anything(public_s3, tmp_path):
    env = without_credentials(dict(os.environ), tmp_path)
    proc = subprocess.run(
        [sys.executable, "collect.py", "--out", public_s3, "--max-tokens", "100"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "needs S3 credentials, but no S3 credentials are configured" in line


def test_inspect_reads_a_public_collection_anonymously(public_s3, tmp_path):
    make_collection(public_s3, SIZES)
    for flags, env in (
        ([], without_credentials(dict(os.environ), tmp_path)),
        (["--anonymous"], {**os.environ, "AWS_SECRET_ACCESS_KEY": "another-accounts-secret"}),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "saesweep.shell", *flags, public_s3, "verify"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout == f"verified {len(SIZES)} shards in 1 hook(s): all ok\n"


def test_train_on_an_anonymous_public_collection_end_to_end(public_s3, monkeypatch, tmp_path):
    make_collection(public_s3, [512] * 5, d=16, sparse=True)
    args = [
        "--runs-root",
        str(tmp_path / "runs"),
        "--executor",
        "debug",
        "--train-data.uri",
        public_s3,
        "--train-data.collect",
        "",
        "--n-train",
        "1024",
        "--batch-size",
        "128",
        "--n-val",
        "256",
        "--sae.d-sae",
        "32",
        "--sae.k",
        "4",
        "--wandb-mode",
        "disabled",
        "--downstream-sequences",
        "0",
    ]
    results = {}
    for name, env, flags in (
        ("signed", dict(os.environ), []),
        ("unsigned", without_credentials(dict(os.environ), tmp_path), []),
        ("forced", {**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong"}, ["--train-data.anonymous"]),
    ):
        root = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "train.py", *args[2:], "--runs-root", str(root), *flags],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (run,) = root.glob("*/runs/run-000*")
        results[name] = load_file(run / "sae_weights.safetensors")
        assert json.loads((run / "metrics.json").read_text())["fvu"] < 1
    for name in ("unsigned", "forced"):
        assert all(torch.equal(results["signed"][k], results[name][k]) for k in results[name])
