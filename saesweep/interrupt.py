"""SIGINT and SIGTERM as an exception, raised at once or deferred to a point where stopping
leaves nothing half-done.

Handlers are only installed in the main thread (Python delivers signals there); elsewhere the
context managers change nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A signal asked this process to stop; the message is the signal's name. A
    KeyboardInterrupt, so that `except Exception` lets it through as it does Ctrl-C's."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended: 130 for
        SIGINT (Ctrl-C), 143 for SIGTERM."""
        return 128 + self.signum


def exit_status(stop: KeyboardInterrupt) -> int:
    """The exit status of a process stopped by `stop` (a plain KeyboardInterrupt is Ctrl-C)."""
    return stop.exit_status if isinstance(stop, Interrupted) else Interrupted().exit_status


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop this process cleanly: SIGINT, and SIGTERM except in a Slurm job,
    where submitit owns SIGTERM (it keeps the job alive for its preemption and requeue)."""
    on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
    return (signal.SIGINT,) if on_slurm else STOP_SIGNALS


class Deferred:
    """The first stop signal received inside `deferred` (for the code to act on when it can)
    or `raising`."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def record(self, signum: int, frame) -> None:
        self.signum = self.signum or signum


@contextlib.contextmanager
def raising(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Inside, each of `signals` raises Interrupted where the code is. An error that ends the
    block after one arrived leaves it as that stop (Interrupted, caused by the error): a C
    call the signal interrupted (torch's, for one) may turn Interrupted into
    another error, and a cleanup may raise while the stop unwinds."""
    received = Deferred()

    def record_and_raise(signum: int, frame) -> None:
        received.record(signum, frame)
        raise Interrupted(signum)

    with _handling(signals, record_and_raise):
        try:
            yield
        except Exception as error:
            if received.signum is None:
                raise
            raise Interrupted(received.signum) from error


@contextlib.contextmanager
def deferred(signals: tuple[signal.Signals, ...]) -> Iterator[Deferred]:
    """Inside, each of `signals` is only recorded (Deferred.signum); the code polls it."""
    pending = Deferred()
    with _handling(signals, pending.record):
        yield pending


@contextlib.contextmanager
def _handling(signals: tuple[signal.Signals, ...], handler) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
