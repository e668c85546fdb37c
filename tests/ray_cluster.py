"""A real local Ray cluster for tests, kept on loopback.

Ray's servers listen on every interface and announce the machine's own address, even when
told 127.0.0.1 (Ray swaps a loopback address for the machine's). So the cluster runs in a
network namespace of its own that holds only a loopback interface: every Ray service there
listens and announces 127.0.0.1, and the commands that use it (train.py, collect.py) run in
the same namespace. Needs root (`ip netns`), as the test Slurm cluster does.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PORT = 6390


class RayClusterError(RuntimeError):
    """The test Ray cluster could not be started."""


@dataclasses.dataclass(frozen=True)
class RayCluster:
    namespace: str
    address: str
    cpus: int
    temp_dir: Path

    def command(self, *args: str) -> list[str]:
        """`args` as a command run inside the cluster's network namespace."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def listening(self) -> list[str]:
        """host:port of every listening TCP socket in the namespace."""
        out = subprocess.run(
            self.command("ss", "-ltnH"), capture_output=True, text=True, check=True
        ).stdout
        return [line.split()[3] for line in out.splitlines() if line.strip()]


def start_ray_cluster(temp_dir: Path) -> RayCluster:
    """`ray start --head` with this machine's CPUs in a fresh loopback-only namespace."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise RayClusterError("the test Ray cluster needs root and iproute2 (ip netns)")
    namespace = f"saesweep-ray-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    cluster = RayCluster(
        namespace, f"127.0.0.1:{PORT}", len(os.sched_getaffinity(0)), Path(temp_dir)
    )
    subprocess.run(cluster.command("ip", "link", "set", "lo", "up"), check=True)
    ray = str(Path(sys.executable).with_name("ray"))
    started = subprocess.run(
        cluster.command(
            ray,
            "start",
            "--head",
            "--port",
            str(PORT),
            "--num-cpus",
            str(cluster.cpus),
            "--temp-dir",
            str(temp_dir),
            "--disable-usage-stats",
            "--include-dashboard",
            "false",
        ),  # fmt: skip
        capture_output=True,
        text=True,
        env=os.environ | {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"},
    )
    if started.returncode != 0:
        stop_ray_cluster(cluster)
        raise RayClusterError(f"ray start failed: {started.stderr[-2000:]}")
    return cluster


def stop_ray_cluster(cluster: RayCluster) -> None:
    """Stop every Ray process of the cluster and remove its namespace."""
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run(cluster.command(ray, "stop", "--force"), capture_output=True)
    subprocess.run(["ip", "netns", "del", cluster.namespace], capture_output=True)


def announced_addresses(cluster: RayCluster) -> set[str]:
    """The IP addresses the cluster's services announced in their logs."""
    found = set()
    for log in (cluster.temp_dir / "session_latest" / "logs").glob("*"):
        if log.is_file():
            text = log.read_text(errors="replace")
            found |= set(re.findall(r"(?:node_address|node_ip_address)[=: ']+([\d.]+)", text))
    return found
