"""Process locks: a second holder is refused; a waiter goes on once the holder has died."""

from __future__ import annotations

import subprocess
import sys

import pytest

from saesweep.errors import UserError
from saesweep.locks import check_unlocked, wait_released

HOLD = """
import sys, time
from saesweep.locks import held_lock
with held_lock(__import__("pathlib").Path(sys.argv[1]), "busy"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_waiter_goes_on_once_the_holder_has_ended(tmp_path):
    lock = tmp_path / "running.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline() == b"held\n"
    with pytest.raises(UserError, match="busy"):
        check_unlocked(lock, "busy")
    wait_released(lock, within_s=0.2)
    assert holder.poll() is None, "the wait ends at its limit while the holder lives"
    holder.stdin.close()
    wait_released(lock, within_s=60)
    check_unlocked(lock, "busy")
    assert holder.wait() == 0
