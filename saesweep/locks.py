"""Process locks on local files: held while a process works, released when it dies."""

from __future__ import annotations

import contextlib
import fcntl
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
