"""The collection shell (saesweep.shell) on a real demo collection and on SeaweedFS S3."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic import HOOK, make_collection

from saesweep.collect.config import CollectConfig
from saesweep.collect.run import collect
from saesweep.collect.text import demo_corpus
from saesweep.format.shards import decode_shard
from saesweep.shell import main
from saesweep.store import open_store

ROOT = Path(__file__).resolve().parents[1]
DEMO_HOOK = "encoder.layer.3"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "demo"
    cfg = CollectConfig(
        out=str(out), max_tokens=3000, shard_tokens=1000, ctx_len=64, batch_size=8, progress=False
    )
    collect(cfg)
    return out


@pytest.fixture
def demo_copy(demo, tmp_path) -> Path:
    """A private copy of the demo collection, for tests that damage it."""
    return Path(shutil.copytree(demo, tmp_path / "demo"))


def run(capsys, uri, *command: str) -> tuple[int, str, str]:
    """One-shot mode in this process: (exit status, stdout, stderr)."""
    status = main([str(uri), *command])
    out, err = capsys.readouterr()
    return status, out, err


def run_cli(uri, *command: str, stdin: str | None = None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "saesweep.shell", str(uri), *command],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def local_sizes(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def squash(text: str) -> str:
    """Lowercase without whitespace: the BERT tokenizer lowercases and respaces punctuation."""
    return re.sub(r"\s+", "", text.lower())


def line_after(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(prefix))[len(prefix) :]


def flip_bytes(path: Path, offset_from_end: int = 100) -> None:
    """Flip a few bytes inside the tensor data (the header stays valid)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def acts_line(acts: torch.Tensor) -> str:
    x = acts.to(torch.float64)
    return f"min {float(x.min()):.4g}, max {float(x.max()):.4g}"


# ------------------------------------------------------------------ local demo collection


def test_filecount_ls_pwd(demo, capsys):
    sizes = local_sizes(demo)
    status, out, _ = run(capsys, demo, "filecount")
    assert status == 0 and out.startswith(f"{len(sizes)} objects under file://{demo}")
    in_hook = sum(k.startswith(f"{DEMO_HOOK}/") for k in sizes)
    _, out, _ = run(capsys, demo, f"cd {DEMO_HOOK}; filecount; pwd")
    assert out.splitlines() == [f"{in_hook} objects under file://{demo}/{DEMO_HOOK}"] + [
        f"file://{demo}/{DEMO_HOOK}"
    ]
    _, out, _ = run(capsys, demo, "ls")
    hook_bytes = sum(v for k, v in sizes.items() if k.startswith(f"{DEMO_HOOK}/"))
    rows = {line.split()[1]: line.split() for line in out.splitlines()}
    assert rows["cfg.json"][0] == f"{sizes['cfg.json']:,}"
    assert rows[f"{DEMO_HOOK}/"][0] == f"{hook_bytes:,}"
    assert rows[f"{DEMO_HOOK}/"][2] == f"({in_hook:,}"
    assert set(rows) == {"cfg.json", f"{DEMO_HOOK}/", "parts/"}


def test_sizecheck(demo, capsys):
    sizes = local_sizes(demo)
    meta = open_store(str(demo)).get_json(f"{DEMO_HOOK}/metadata.json")
    status, out, _ = run(capsys, demo, "sizecheck")
    total = sum(sizes.values())
    assert status == 0
    assert out.startswith(f"total {total:,} bytes")
    assert f"in {len(sizes)} objects" in out.splitlines()[0]
    shard_bytes = sum(sizes[f"{DEMO_HOOK}/{s['name']}"] for s in meta["shards"])
    per_token = shard_bytes / meta["n_tokens"]
    assert (
        f"{DEMO_HOOK}: {len(meta['shards'])} shards, {meta['n_tokens']:,} tokens, "
        f"{shard_bytes:,} bytes, {per_token:,.1f} bytes/token" in out
    )
    assert "shard sizes all match the manifest" in out


def test_inspect_shard(demo, capsys):
    store = open_store(str(demo))
    meta = store.get_json(f"{DEMO_HOOK}/metadata.json")
    first = meta["shards"][0]
    n = first["n_tokens"]
    status, out, err = run(capsys, demo, f"cd {DEMO_HOOK}; inspect 0")
    assert status == 0, err
    assert f"acts: shape [{n}, 384] dtype bfloat16" in out
    assert f"token_ids: shape [{n}] dtype int32" in out
    assert f"seq_ids: shape [{n}] dtype int64" in out
    assert f"positions: shape [{n}] dtype int32" in out
    assert f"checksum ok ({first['checksum']})" in out
    tensors = decode_shard((demo / DEMO_HOOK / first["name"]).read_bytes())
    assert f"acts: NaN 0, Inf 0, {acts_line(tensors['acts'])}" in out
    assert "first sequence: seq_id 0 (document 0, chunk 0)" in out
    text = line_after(out, "text: ")
    assert len(squash(text)) > 100
    assert squash(text) in squash(next(demo_corpus()))
    # the same shard by path, from the root
    _, by_path, _ = run(capsys, demo, f"inspect {DEMO_HOOK}/{first['name']}")
    assert by_path == out


def test_stats(demo, capsys):
    stats = open_store(str(demo)).get_json(f"{DEMO_HOOK}/statistics.json")
    status, out, _ = run(capsys, demo, "stats resid.3")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == (
        f"{DEMO_HOOK}: n {stats['n']:,} tokens (= metadata n_tokens), "
        f"mean norm {stats['mean_norm']:.6g}"
    )
    means = ", ".join(f"{v:.4g}" for v in stats["mean"][:4])
    stds = ", ".join(f"{v:.4g}" for v in stats["std"][:4])
    assert f"mean[:4] [{means}]  std[:4] [{stds}]  (384 dims)" in lines[1]
    _, same, _ = run(capsys, demo, f"cd {DEMO_HOOK}; stats")
    assert same == out


def test_verify_clean(demo, capsys):
    status, out, _ = run(capsys, demo, "verify")
    n = len(open_store(str(demo)).get_json(f"{DEMO_HOOK}/metadata.json")["shards"])
    assert status == 0 and out == f"verified {n} shards in 1 hook(s): all ok\n"


def test_corrupted_and_truncated_shards(demo_copy, capsys):
    meta = open_store(str(demo_copy)).get_json(f"{DEMO_HOOK}/metadata.json")
    flipped, cut = (demo_copy / DEMO_HOOK / s["name"] for s in meta["shards"][1:3])
    flip_bytes(flipped)
    cut.write_bytes(cut.read_bytes()[:-10])

    status, out, _ = run(capsys, demo_copy, f"inspect {DEMO_HOOK}/{flipped.name}")
    assert status == 0
    assert f"checksum MISMATCH: manifest {meta['shards'][1]['checksum']}, file xxh3_128:" in out

    status, out, _ = run(capsys, demo_copy, "verify")
    assert status == 1
    bad = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert bad[0].startswith(f"BAD {DEMO_HOOK}/{flipped.name}: checksum mismatch")
    assert bad[1].startswith(f"BAD {DEMO_HOOK}/{cut.name}: size {cut.stat().st_size:,} bytes")
    assert len(bad) == 2 and out.endswith(f"{len(meta['shards'])} shards in 1 hook(s): 2 BAD\n")

    status, out, _ = run(capsys, demo_copy, "sizecheck")
    assert status == 1
    assert f"SIZE MISMATCH {DEMO_HOOK}/{cut.name}: {cut.stat().st_size:,} bytes" in out
    assert f"SIZE MISMATCH {DEMO_HOOK}/{flipped.name}" not in out
    assert "DO NOT match" in out


def test_bad_paths_are_one_line_errors(demo, capsys):
    for command, message in [
        ("cd nowhere", f"error: no directory file://{demo}/nowhere"),
        ("ls nowhere", f"error: nothing at file://{demo}/nowhere"),
        ("inspect nope.safetensors", f"error: {demo}/nope.safetensors does not exist"),
        ("inspect cfg.json", f"error: file://{demo}/cfg.json is not a safetensors file"),
        (f"inspect {DEMO_HOOK}", f"error: {demo}/{DEMO_HOOK} is a directory, not a file"),
        ("inspect 99", f"error: hook {DEMO_HOOK} has 3 shards; index 99 is out of range"),
        ("stats nohook", f"error: no hook 'nohook'; hooks: {DEMO_HOOK}"),
        ("frobnicate", "error: unknown command 'frobnicate'; type help for the commands"),
    ]:
        status, out, err = run(capsys, demo, command)
        assert (status, out, err) == (1, "", message + "\n"), command
    # an error does not stop the commands after it, and cd stays where it was
    status, out, err = run(capsys, demo, "cd nowhere; pwd")
    assert status == 1 and out == f"file://{demo}\n" and err.count("\n") == 1


def test_cd_dotdot_and_absolute(demo, capsys):
    _, out, _ = run(capsys, demo, f"cd {DEMO_HOOK}; cd ..; pwd; cd /parts; pwd; cd ../..; pwd")
    assert out.splitlines() == [f"file://{demo}", f"file://{demo}/parts", f"file://{demo}"]


def test_interactive_shell_through_stdin(demo):
    result = run_cli(demo, stdin=f"cd {DEMO_HOOK}\nls\ncd nowhere\npwd\nhelp\nexit\n")
    assert result.returncode == 0
    meta = open_store(str(demo)).get_json(f"{DEMO_HOOK}/metadata.json")
    for shard in meta["shards"]:
        assert f"{shard['n_bytes']:,}  {shard['name']}" in result.stdout
    assert f"file://{demo}/{DEMO_HOOK}> " in result.stdout  # the prompt follows cd
    assert f"file://{demo}/{DEMO_HOOK}\n" in result.stdout  # pwd
    assert "sizecheck" in result.stdout and "verify" in result.stdout  # help
    assert result.stderr == f"error: no directory file://{demo}/{DEMO_HOOK}/nowhere\n"


def test_missing_collection_exits_2(tmp_path):
    result = run_cli(tmp_path / "nothing", "ls")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "holds no saesweep collection" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_s3_exits_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    env = {
        **os.environ,
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
    }
    result = run_cli("s3://bucket/run", "ls", env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in result.stderr


# ------------------------------------------------------------------ synthetic collection on S3


@pytest.fixture
def s3_collection(s3_env, s3_server) -> tuple[str, torch.Tensor, dict[str, int]]:
    """(uri, all acts, object key -> size as the S3 server lists them)."""
    acts = make_collection(s3_env, [300, 500, 200], d=16)
    bucket, prefix = s3_env.removeprefix("s3://").split("/", 1)
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    sizes = {o["Key"][len(prefix) + 1 :]: o["Size"] for o in listing["Contents"]}
    return s3_env, acts, sizes


def test_s3_filecount_sizecheck_stats(s3_collection, capsys):
    uri, acts, sizes = s3_collection
    status, out, _ = run(capsys, uri, "filecount")
    assert status == 0 and out == f"{len(sizes)} objects under {uri}\n"
    _, out, _ = run(capsys, uri, f"cd {HOOK}; filecount")
    assert out == f"{sum(k.startswith(HOOK + '/') for k in sizes)} objects under {uri}/{HOOK}\n"
    status, out, _ = run(capsys, uri, "sizecheck")
    shard_bytes = sum(v for k, v in sizes.items() if k.endswith(".safetensors"))
    assert status == 0
    assert out.startswith(f"total {sum(sizes.values()):,} bytes")
    assert f"{HOOK}: 3 shards, 1,000 tokens, {shard_bytes:,} bytes" in out
    assert f"{shard_bytes / 1000:,.1f} bytes/token (tensor data alone: {16 * 4 + 16})" in out
    assert "shard sizes all match the manifest" in out
    _, out, _ = run(capsys, uri, "stats resid.1")
    norm = acts.to(torch.float64).norm(dim=1).mean()
    assert out.startswith(f"{HOOK}: n 1,000 tokens (= metadata n_tokens), mean norm {norm:.6g}")


def test_s3_ls(s3_collection, capsys):
    uri, _, sizes = s3_collection
    _, out, _ = run(capsys, uri, f"ls {HOOK}")
    listed = {line.split()[1]: int(line.split()[0].replace(",", "")) for line in out.splitlines()}
    assert listed == {k.split("/")[1]: v for k, v in sizes.items() if k.startswith(HOOK + "/")}


def test_s3_inspect_verify_and_corruption(s3_collection, s3_server, capsys):
    uri, acts, _ = s3_collection
    store = open_store(uri)
    meta = store.get_json(f"{HOOK}/metadata.json")
    status, out, _ = run(capsys, uri, f"cd {HOOK}; inspect 1")
    assert status == 0
    assert "acts: shape [500, 16] dtype float32" in out
    assert "token_ids: shape [500] dtype int32" in out
    assert f"checksum ok ({meta['shards'][1]['checksum']})" in out
    assert f"acts: NaN 0, Inf 0, {acts_line(acts[300:800])}" in out
    assert "first sequence: seq_id 300 (document 0, chunk 300), 1 tokens" in out
    assert "text: (not decoded: cannot load the tokenizer of model 'synthetic')" in out

    status, out, _ = run(capsys, uri, "verify")
    assert status == 0 and out == "verified 3 shards in 1 hook(s): all ok\n"

    key = f"{HOOK}/{meta['shards'][2]['name']}"
    data = bytearray(store.get(key))
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    store.put(key, bytes(data))
    status, out, _ = run(capsys, uri, "verify")
    assert status == 1
    assert out.splitlines()[0].startswith(f"BAD {key}: checksum mismatch (manifest ")
    assert out.endswith("verified 3 shards in 1 hook(s): 1 BAD\n")
    _, out, _ = run(capsys, uri, f"inspect {key}")
    assert f"checksum MISMATCH: manifest {meta['shards'][2]['checksum']}" in out


def test_s3_interactive_and_missing_prefix(s3_collection):
    uri, _, sizes = s3_collection
    result = run_cli(uri, stdin=f"cd {HOOK}\nls\ncd ..\nfilecount\nexit\n", env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert f"{uri}/{HOOK}> " in result.stdout
    assert "shard-m0000-000002.safetensors" in result.stdout
    assert f"{len(sizes)} objects under {uri}\n" in result.stdout
    missing = run_cli(uri + "-nothing-here", "ls", env=dict(os.environ))
    assert missing.returncode == 2 and "holds no saesweep collection" in missing.stderr
    bucket = uri.removeprefix("s3://").split("/")[0]
    no_bucket = run_cli(f"s3://{bucket}-absent/run", "ls", env=dict(os.environ))
    assert no_bucket.returncode == 2 and "does not exist" in no_bucket.stderr
