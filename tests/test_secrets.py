"""AWS secrets never reach a message, a log or a file: error paths (unreachable endpoint, wrong
secret key, a session token the server refuses) and every output of a train.py run on S3
(sweep.json, cfg.json, metrics, run and submitit logs, wandb files), on a real SeaweedFS."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from s3_ranges import get_range
from s3server import free_ports
from synthetic import make_collection

from saesweep.errors import UserError
from saesweep.store import open_store

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "FwoGZXIvYXdzEXAMPLEsessiontoken0123456789abcdef"
"""A session token as STS hands out: SeaweedFS (no STS here) refuses requests that carry one."""
WRONG_SECRET = "wrongSecretKey0123456789abcdefABCDEFGHIJ"


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def files_holding(root: Path, secrets: list[str]) -> list[str]:
    """Every file under `root` (binary ones too: pickles, wandb records) holding a secret."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s[:6]}..." for s in secrets if s.encode() in data]
    return found


@pytest.mark.parametrize("fault", ["unreachable", "wrong-secret", "session-token"])
def test_error_paths_print_no_secret(s3_env, s3_server, tmp_path, fault):
    make_collection(s3_env, [200] * 3)
    env = {**os.environ, "AWS_SESSION_TOKEN": TOKEN}
    secrets = [TOKEN, s3_server.secret_key]
    if fault == "unreachable":
        env["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_ports(1)[0]}"
        expected = "cannot reach the S3 endpoint"
    elif fault == "wrong-secret":
        env["AWS_SECRET_ACCESS_KEY"] = WRONG_SECRET
        secrets.append(WRONG_SECRET)
        expected = "rejected the credentials"
    else:
        expected = "rejected the credentials"
    runs = tmp_path / "runs"
    commands = [
        ["train.py", "--train-data.uri", s3_env, "--runs-root", str(runs), "--executor", "debug"],
        ["collect.py", "--out", f"{s3_env}-new", "--max-tokens", "100", "--device", "cpu"],
        ["-m", "saesweep.shell", s3_env, "verify"],
    ]
    for command in commands:
        proc = run(command, env)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert expected in proc.stderr, (command, proc.stderr)
        shown = proc.stdout + proc.stderr
        assert not [s for s in secrets if s in shown], (command, shown)
    assert not runs.exists() or not files_holding(runs, secrets)


def test_range_reader_errors_print_no_secret(s3_env, s3_server, monkeypatch):
    """The async path (signed by hand, not by boto3's client) refuses with the same sentence."""
    open_store(s3_env).put("obj", b"0123456789")
    for name, value in (("AWS_SESSION_TOKEN", TOKEN), ("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)):
        monkeypatch.setenv(name, value)
        store = open_store(s3_env)
        with store.range_reader() as reader, pytest.raises(UserError) as err:
            get_range(reader, "obj", 0, 4)
        text = f"{err.value} {err.value!r} {err.value.__cause__!r}"
        assert "rejected the credentials" in text
        assert TOKEN not in text and WRONG_SECRET not in text and s3_server.secret_key not in text


def test_a_training_run_on_s3_writes_and_prints_no_secret(s3_env, s3_server, tmp_path):
    """A local-executor run (submitit's pickles and logs in the sweep directory) with wandb
    offline, reading S3 with the secret key in its environment: no file, no output holds it."""
    make_collection(s3_env, [512] * 3, d=16, sparse=True)
    env = {**os.environ, "WANDB_SILENT": "true"}
    runs = tmp_path / "runs"
    args = [
        "train.py",
        "--train-data.uri",
        s3_env,
        "--train-data.collect",
        "",
        "--runs-root",
        str(runs),
        "--executor",
        "local",
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
        "--downstream-sequences",
        "0",
        "--wandb-mode",
        "offline",
    ]
    proc = run(args, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep,) = runs.iterdir()
    outputs = {p.relative_to(sweep).parts[0] for p in sweep.rglob("*") if p.is_file()}
    assert {"sweep.json", "logs", "runs"} <= outputs
    assert list(sweep.glob("runs/*/wandb/offline-run-*"))
    assert list(sweep.glob("runs/*/cfg.json")) and list(sweep.glob("runs/*/metrics.json"))
    secrets = [s3_server.secret_key]
    assert not files_holding(sweep, secrets)
    assert s3_server.secret_key not in proc.stdout + proc.stderr


def test_credentials_in_a_store_uri_are_refused_and_never_printed(s3_server, tmp_path):
    """s3://KEY:SECRET@bucket/... (or any URL with a password) is refused, shown redacted,
    before any request or any file; every UserError is shown redacted (str, tracebacks)."""
    env = {**os.environ, **s3_server.env()}
    runs = tmp_path / "runs"
    for uri in ("s3://AKIAEXAMPLE:pw-s3cret@bucket/x", "https://me:pw-s3cret@host/x"):
        for command in (
            ["train.py", "--train-data.uri", uri, "--runs-root", str(runs)],
            ["collect.py", "--out", uri, "--max-tokens", "100", "--device", "cpu"],
            ["-m", "saesweep.shell", uri, "verify"],
        ):
            proc = run(command, env)
            assert proc.returncode == 2, (command, proc.stderr)
            assert "://***@" in proc.stderr, (command, proc.stderr)
            assert "pw-s3cret" not in proc.stdout + proc.stderr
    assert not runs.exists()
    err = UserError("cannot read http://user:pw-s3cret@host/x")
    assert str(err) == "cannot read http://***@host/***"
    assert "pw-s3cret" not in "".join(traceback.format_exception(err))


def test_a_secret_in_an_endpoints_path_or_query_is_never_printed(tmp_path):
    """S3_ENDPOINT_URL with a token in its path or query (a signing proxy's, say): every error
    shows the endpoint's host only."""
    (port,) = free_ports(1)
    collect = ["collect.py", "--out", "s3://bucket/x", "--max-tokens", "100", "--device", "cpu"]
    shell = ["-m", "saesweep.shell", "s3://bucket/x", "verify"]
    for endpoint, command in (
        (f"http://127.0.0.1:{port}/pw-s3cret/", collect),  # unreachable: named without its path
        (f"http://127.0.0.1:{port}?token=pw-s3cret", shell),  # refused: not an S3 endpoint
        (f"http://127.0.0.1:{port}/x#pw-s3cret", collect),
    ):
        env = {**os.environ, "S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k",
               "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        proc = run(command, env)
        assert proc.returncode == 2, (command, proc.stderr)
        assert f"127.0.0.1:{port}" in proc.stderr, proc.stderr
        assert "pw-s3cret" not in proc.stdout + proc.stderr, (endpoint, proc.stderr)
    assert (
        str(UserError("S3 at http://h:1/a?b=pw-s3cret; fix it")) == "S3 at http://h:1/***; fix it"
    )
    assert str(UserError("at HTTPS://h/pw-s3cret")) == "at HTTPS://h/***"
