"""Process locks on local files: held while a process works, released when it dies."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

from saesweep.errors import UserError


@contextlib.contextmanager
def held_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the block; when another
    process holds it, raise UserError(`busy`). The kernel releases it when the holder dies
    (kill -9 included), so a requeued or resumed job can take it again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy) from None
        yield


def check_unlocked(path: Path, busy: str) -> None:
    """Raise UserError(`busy`) when a process holds the lock on `path`; take nothing."""
    if path.exists():
        with held_lock(path, busy):
            pass


def wait_released(path: Path, within_s: float) -> None:
    """Wait until no process holds the lock on `path` (or it does not exist), at most
    `within_s` seconds; take nothing."""
    deadline = time.monotonic() + within_s
    while path.exists() and time.monotonic() < deadline:
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
        time.sleep(0.05)
