"""How a group's job ended, whichever executor ran it (Slurm, Ray, local, in-process)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class GroupOutcome:
    """How one group's job ended."""

    index: int
    status: Literal["done", "failed"]
    result: Any = None
    error: str = ""
    job_id: str = ""
    stdout: Path | None = None
    stderr: Path | None = None


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "DistNetworkError")
"""How a collective fails when another rank of the group died (gloo, NCCL)."""


def peer_gone(error: str) -> bool:
    return any(phrase in error for phrase in PEER_GONE)
