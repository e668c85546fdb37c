"""Collection into a real SeaweedFS S3 server: contract, Reader over it, resume after
SIGKILL, and the one-sentence errors for an unreachable endpoint or wrong credentials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from s3server import free_ports

from saesweep import Reader
from saesweep.collect.config import CollectConfig
from saesweep.collect.run import collect
from saesweep.format.manifest import part_key
from saesweep.format.shards import checksum, decode_shard
from saesweep.store import open_store

ROOT = Path(__file__).resolve().parents[1]
HOOK = "encoder.layer.3"


def read_hook(uri: str) -> dict[str, torch.Tensor]:
    """Every stored tensor of HOOK in manifest order, checksums and sizes verified."""
    store = open_store(uri)
    meta = store.get_json(f"{HOOK}/metadata.json")
    parts = []
    for shard in meta["shards"]:
        data = store.get(f"{HOOK}/{shard['name']}")
        assert checksum(data) == shard["checksum"] and len(data) == shard["n_bytes"]
        parts.append(decode_shard(data))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def token_keys(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """(sequence id, position) of each token as one integer: its order-free identity."""
    return tensors["seq_ids"] * 4096 + tensors["positions"].long()


def sorted_rows(acts: torch.Tensor) -> list[bytes]:
    return sorted(row.tobytes() for row in acts.numpy())


def test_collect_to_s3_and_read_back(s3_env, capsys):
    cfg = CollectConfig(
        out=s3_env,
        max_tokens=3000,
        shard_tokens=800,
        ctx_len=64,
        batch_size=8,
        act_dtype="float32",
        progress=False,
    )
    collect(cfg)
    store = open_store(s3_env)
    meta = store.get_json(f"{HOOK}/metadata.json")
    assert meta["complete"] and meta["d_model"] == 384 and len(meta["shards"]) >= 3
    tensors = read_hook(s3_env)
    acts = tensors["acts"]
    assert meta["n_tokens"] == len(acts) >= 3000
    stats = store.get_json(f"{HOOK}/statistics.json")
    assert stats["n"] == len(acts)
    np.testing.assert_allclose(stats["mean"], acts.double().mean(0).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["std"], acts.double().std(0, correction=0).numpy(), rtol=1e-9)
    in_order = torch.cat(list(Reader(s3_env, batch_size=256, shuffle=False)))
    assert torch.equal(in_order, acts)
    shuffled = torch.cat(list(Reader(s3_env, batch_size=256, shuffle_tokens=1000, seed=1)))
    assert not torch.equal(shuffled, acts)
    assert sorted_rows(shuffled) == sorted_rows(acts)
    secret, key_id = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    printed = capsys.readouterr()
    written = b"".join(store.get(k) for k in store.list() if k.endswith(".json"))
    for credential in (secret, key_id):
        assert credential not in printed.out + printed.err
        assert credential.encode() not in written


SMALL = {"max_tokens": 5000, "shard_tokens": 400, "batch_size": 2, "ctx_len": 64}


def cli_args(settings: dict) -> list[str]:
    flags = [[f"--{k.replace('_', '-')}", str(v)] for k, v in settings.items()]
    return [arg for pair in flags for arg in pair] + ["--act-dtype", "float32", "--no-progress"]


def run_collect(out: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "collect.py"), *cli_args(SMALL), "--out", out],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def committed_shards(store) -> int:
    if not store.exists(part_key(0, 1)):
        return 0
    return len(store.get_json(part_key(0, 1))["hooks"].get(HOOK, {}).get("shards", []))


def test_resume_on_s3_after_kill_9(s3_env, s3_server, tmp_path):
    env = s3_server.env()
    collect(CollectConfig(out=str(tmp_path / "ref"), act_dtype="float32", progress=False, **SMALL))
    store = open_store(s3_env)
    proc = run_collect(s3_env, env)
    while committed_shards(store) < 1 and proc.poll() is None:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.get_json(part_key(0, 1))["complete"], "the run finished before the kill"
    resumed = run_collect(s3_env, env)
    assert resumed.wait() == 0, resumed.stderr.read()
    ref, run = read_hook(str(tmp_path / "ref")), read_hook(s3_env)
    keys = token_keys(run)
    assert len(torch.unique(keys)) == len(keys), "a token was stored twice"
    assert torch.equal(torch.sort(keys).values, torch.sort(token_keys(ref)).values)
    assert torch.equal(run["token_ids"], ref["token_ids"])
    torch.testing.assert_close(run["acts"], ref["acts"])


def expect_exit_2(out: str, env: dict[str, str], message: str) -> None:
    proc = run_collect(out, env)
    assert proc.wait(timeout=300) == 2
    err = proc.stderr.read().strip()
    assert "Traceback" not in err
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err, err


def test_unreachable_endpoint_exits_2(s3_server):
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    env = {**s3_server.env(), "S3_ENDPOINT_URL": endpoint}
    expect_exit_2("s3://bucket/run", env, f"cannot reach the S3 endpoint {endpoint}")


def test_wrong_credentials_exit_2(s3_env, s3_server):
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-value"}
    expect_exit_2(s3_env, env, "rejected the credentials")
