"""Why a group's job failed, from its traceback: the last exception, unless a stop signal
was being unwound, which then is the reason (an interrupted run, not a failed one)."""

from __future__ import annotations

import traceback

from saesweep.interrupt import Interrupted
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
