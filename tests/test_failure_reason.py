"""Why a group's job failed, from its traceback: the last exception, unless a stop signal
was being unwound, which then is the reason (an interrupted run, not a failed one)."""

from __future__ import annotations

import os
import signal
import traceback

import pytest

from saesweep.interrupt import Interrupted, raising
from saesweep.outcomes import GroupOutcome
from saesweep.train.run import failure_reason, interrupt_status


def failed_with(make_error) -> GroupOutcome:
    try:
        make_error()
    except BaseException:
        return GroupOutcome(0, "failed", error=traceback.format_exc(), job_id="debug")
    raise AssertionError("no error")


def cleanup_fails_while_stopping():
    try:
        raise Interrupted()
    finally:
        raise BufferError("cannot close exported pointers exist")


def test_an_error_raised_while_a_stop_unwinds_is_the_stop():
    reason = failure_reason(failed_with(cleanup_fails_while_stopping))
    assert reason == "saesweep.interrupt.Interrupted: SIGINT"
    assert interrupt_status(reason) == 130


def test_an_ordinary_failure_is_its_last_exception():
    def fails():
        try:
            raise KeyError("x")
        except KeyError:
            raise ValueError("the shard is short") from None

    reason = failure_reason(failed_with(fails))
    assert reason == "ValueError: the shard is short" and interrupt_status(reason) is None


def signal_converted_by_a_c_call(signum: int) -> None:
    """Send `signum` to this process inside a call that turns the stop into another error,
    as torch's C code does when the signal lands inside it (seen in CI: it turned
    Ctrl-C into "ValueError: could not determine the shape of object type
    'torch.storage.UntypedStorage'"), which leaves no stop in the traceback."""
    try:
        os.kill(os.getpid(), signum)
    except KeyboardInterrupt:
        raise ValueError("could not determine the shape of object type") from None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_error_ending_a_block_a_signal_interrupted_is_the_stop(signum):
    def stopped():
        with raising():
            signal_converted_by_a_c_call(signum)

    reason = failure_reason(failed_with(stopped))
    assert reason == f"saesweep.interrupt.Interrupted: {signal.Signals(signum).name}"
    assert interrupt_status(reason) == 128 + signum


def test_an_error_in_a_block_no_signal_reached_is_itself():
    def fails():
        with raising():
            raise ValueError("the shard is short")

    assert failure_reason(failed_with(fails)) == "ValueError: the shard is short"
