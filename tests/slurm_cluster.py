"""A real one-node Slurm cluster on this machine, for tests.

Needs root and the Debian packages `slurm-wlm` and `munge` (.ci/run installs them). The cluster
keeps its spool, state and logs under `ROOT` with its own ClusterName, writes
`/etc/slurm/slurm.conf`, and is left running after the tests so the next session reuses it.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path("/tmp/saesweep-slurm")
CLUSTER_NAME = "saesweeptest"
PARTITION = "debug"
CONF_PATH = Path("/etc/slurm/slurm.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_DIRS = ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge")
REQUIRED_BINARIES = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "scontrol", "sinfo")
# Daemons live in /usr/sbin, which some shells leave off PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
HEALTHY_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


class SlurmClusterError(RuntimeError):
    """The test Slurm cluster could not be started."""


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    node: str
    cpus: int
    partition: str
    root: Path


def ensure_slurm_cluster(timeout_s: float = 60.0) -> SlurmCluster:
    """Reuse a healthy Slurm cluster, or start the one-node test cluster and wait until idle."""
    _require_binaries()
    cluster = SlurmCluster(
        node=_short_hostname(), cpus=len(os.sched_getaffinity(0)), partition=PARTITION, root=ROOT
    )
    conf = _conf_text(cluster)
    if _munge_works() and _cluster_healthy() and _reusable_conf(conf):
        return cluster
    if os.geteuid() != 0:
        raise SlurmClusterError("No healthy Slurm cluster here, and starting one needs root.")
    _start_munge()
    _stop_own_daemons()
    for sub in ("state", "spool", "log"):
        (ROOT / sub).mkdir(parents=True, exist_ok=True)
    CONF_PATH.parent.mkdir(parents=True, exist_ok=True)
    CONF_PATH.write_text(conf)
    _start_slurm_daemons()
    _wait_until_healthy(cluster, timeout_s)
    return cluster


def _require_binaries() -> None:
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name, path=SEARCH_PATH) is None]
    if missing:
        raise SlurmClusterError(
            f"Slurm tests need {', '.join(missing)} on PATH: "
            "install them with `apt-get install -y slurm-wlm munge` (as .ci/run does)."
        )


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _run(program: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [shutil.which(program, path=SEARCH_PATH) or program, *args]
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )


def _munge_works() -> bool:
    cred = _run("munge", "-n")
    if cred.returncode != 0:
        return False
    decoded = _run("unmunge", stdin=cred.stdout)
    return decoded.returncode == 0


def _node_states() -> set[str]:
    out = _run("sinfo", "-h", "-o", "%T")
    return {line.strip().rstrip("*~#$@").lower() for line in out.stdout.split()} - {""}


def _cluster_healthy() -> bool:
    if _run("scontrol", "ping").returncode != 0:
        return False
    states = _node_states()
    return bool(states) and states <= HEALTHY_NODE_STATES


def _start_munge() -> None:
    if _munge_works():
        return
    for path in MUNGE_DIRS:
        Path(path).mkdir(parents=True, exist_ok=True)
    if not MUNGE_KEY.exists():
        MUNGE_KEY.write_bytes(os.urandom(1024))
        MUNGE_KEY.chmod(0o400)
    uid, gid = pwd.getpwnam("munge").pw_uid, grp.getgrnam("munge").gr_gid
    for path in MUNGE_DIRS:
        for dirpath, _, filenames in os.walk(path):
            for name in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
                os.chown(name, uid, gid)
    started = _run("munged", "--force")
    if started.returncode != 0 or not _retry(_munge_works, timeout_s=10):
        raise SlurmClusterError(f"munged did not start: {started.stderr.strip()}")


def _pid_file(daemon: str) -> Path:
    return ROOT / f"{daemon}.pid"


def _log_file(daemon: str) -> Path:
    return ROOT / "log" / f"{daemon}.log"


def _stop_own_daemons() -> None:
    """Stop slurmctld/slurmd started earlier from ROOT's pid files (found unhealthy)."""
    for daemon in ("slurmd", "slurmctld"):
        pid = _live_pid(daemon)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not _retry(lambda d=daemon: _live_pid(d) is None, timeout_s=15):
                os.kill(pid, signal.SIGKILL)


def _live_pid(daemon: str) -> int | None:
    """The pid in the daemon's pid file if that process is still this daemon and not a zombie."""
    try:
        pid = int(_pid_file(daemon).read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    name, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return pid if name == daemon and state != "Z" else None


def _real_memory_mb() -> int:
    total_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return int(total_kb / 1024 * 0.9)


def _reusable_conf(conf: str) -> bool:
    """The running cluster's conf is current, or is not ours (a dev machine's own cluster)."""
    current = CONF_PATH.read_text() if CONF_PATH.exists() else ""
    return current == conf or f"ClusterName={CLUSTER_NAME}\n" not in current


def _conf_text(cluster: SlurmCluster) -> str:
    memory_mb = _real_memory_mb()
    lines = {
        "ClusterName": CLUSTER_NAME,
        "SlurmctldHost": f"{cluster.node}(127.0.0.1)",
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        # A requeued job waits cred_expire seconds before it may start again (default 120).
        "AuthInfo": "cred_expire=10",
        "StateSaveLocation": ROOT / "state",
        "SlurmdSpoolDir": ROOT / "spool",
        "SlurmctldPidFile": _pid_file("slurmctld"),
        "SlurmdPidFile": _pid_file("slurmd"),
        "SlurmctldLogFile": _log_file("slurmctld"),
        "SlurmdLogFile": _log_file("slurmd"),
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core_Memory",
        "DefMemPerCPU": memory_mb // cluster.cpus,
        "AccountingStorageType": "accounting_storage/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "JobCompType": "jobcomp/none",
        "MpiDefault": "none",
        "ReturnToService": 2,
        "SlurmdParameters": "config_overrides",
        "JobRequeue": 1,
        "KillWait": 5,
        "MinJobAge": 300,
        "SchedulerParameters": "sched_interval=2",
        "NodeName": f"{cluster.node} NodeAddr=127.0.0.1 CPUs={cluster.cpus} "
        f"RealMemory={memory_mb} State=UNKNOWN",
        "PartitionName": f"{cluster.partition} Nodes={cluster.node} Default=YES "
        "MaxTime=INFINITE State=UP",
    }
    return "".join(f"{key}={value}\n" for key, value in lines.items())


def _start_slurm_daemons() -> None:
    for command in (("slurmctld", "-c"), ("slurmd",)):
        started = _run(*command)
        if started.returncode != 0:
            raise SlurmClusterError(
                f"{command[0]} failed to start: {started.stderr.strip()}\n{_log_tails()}"
            )


def _wait_until_healthy(cluster: SlurmCluster, timeout_s: float) -> None:
    def healthy_or_resumed() -> bool:
        if _cluster_healthy():
            return True
        if _node_states() & {"down", "drained", "draining", "drain"}:
            _run("scontrol", "update", f"nodename={cluster.node}", "state=resume")
        return False

    if not _retry(healthy_or_resumed, timeout_s=timeout_s):
        raise SlurmClusterError(
            f"Slurm node {cluster.node} is not idle after {timeout_s:.0f}s "
            f"(sinfo states: {sorted(_node_states()) or 'none'}).\n{_log_tails()}"
        )


def _log_tails(n_lines: int = 20) -> str:
    tails = []
    for daemon in ("slurmctld", "slurmd"):
        path = _log_file(daemon)
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        tails.append(f"--- {path} ---\n" + "\n".join(text.splitlines()[-n_lines:]))
    return "\n".join(tails)


def _retry(check, timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()


if __name__ == "__main__":
    print(ensure_slurm_cluster())
