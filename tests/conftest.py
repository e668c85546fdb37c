"""Shared pytest fixtures."""

import contextlib
import os
import sys

import pytest
from slurm_cluster import SlurmCluster, SlurmClusterError, ensure_slurm_cluster

# The machines have no network: a model or dataset name that is not local must fail at once,
# not after the hub client's retries. Subprocesses inherit this.
os.environ["HF_HUB_OFFLINE"] = "1"
# Where the environment says not to write bytecode, every test's subprocess would compile
# torch's and transformers' sources again (about 11 CPU-seconds each): let them be cached.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """A real one-node Slurm cluster on this machine (started once, reused across sessions)."""
    try:
        return ensure_slurm_cluster()
    except SlurmClusterError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def consumers(tmp_path_factory):
    """consumers(name, requirements, excludes=()): the python of a consumer tool's own venv
    (built once per test run; see tests/consumers.py)."""
    from consumers import consumer_python

    root = tmp_path_factory.getbasetemp() / "consumers"
    return lambda name, requirements, excludes=(): consumer_python(
        root, name, requirements, excludes
    )


@pytest.fixture(scope="session")
def demo_sweep(tmp_path_factory):
    """(collection uri, sweep dir) of two tiny topk SAEs (k 8 and 4, runs/run-000 and
    run-001) trained as one group on a 3000-token demo collection, shared by the tests that
    read trained runs against their collection (feature pages, exports)."""
    from demo_runs import train_demo_runs

    root = tmp_path_factory.mktemp("demo_sweep")
    runs = [root / "sweep" / "runs" / f"run-00{i}" for i in range(2)]
    return train_demo_runs(root, runs, [8, 4]), root / "sweep"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server for the whole session, always SIGKILLed at the end."""
    from s3server import PUBLIC_BUCKET, SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"), public_buckets=(PUBLIC_BUCKET,))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch, s3_server) -> str:
    """Point the AWS env vars at `s3_server` and create a fresh bucket; returns s3://BUCKET/run."""
    import uuid

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.create_bucket(bucket)
    return f"s3://{bucket}/run"


@pytest.fixture
def public_s3(s3_env, s3_server) -> str:
    """A fresh prefix in the server's public bucket (anyone reads it, only credentials write);
    the AWS env vars point at the server with admin credentials. Returns s3://PUBLIC/PREFIX."""
    import uuid

    from s3server import PUBLIC_BUCKET

    client = s3_server.client()
    exists = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
    with contextlib.suppress(*exists):
        client.create_bucket(Bucket=PUBLIC_BUCKET)
    return f"s3://{PUBLIC_BUCKET}/{uuid.uuid4().hex[:16]}"
