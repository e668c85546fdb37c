"""A group's progress line: written from the first step on, the FVU range of the last log
step kept between log steps, the final evaluation's stage named."""

from __future__ import annotations

import json

from saesweep.train.progress import PROGRESS, WRITE_EVERY_S, ProgressWriter, describe


def line(tmp_path) -> str:
    return describe(0, json.loads((tmp_path / PROGRESS).read_text()), finished=False)


class Clock:
    """Seconds that the test moves on."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_shows_from_the_first_step_and_keeps_the_last_fvu_range(tmp_path):
    clock = Clock()
    writer = ProgressWriter(tmp_path, total_steps=10, clock=clock)
    writer.training(1, 5.0, batch=10)  # a slow start-up held the trainer's rate down
    assert line(tmp_path) == "group 0: step 1 of 10, 5 tokens/s, ETA 0:00:18"
    clock.now += 3
    writer.training(4, 2.0, batch=10, fvus=[0.4, float("nan"), 0.2])
    assert line(tmp_path) == "group 0: step 4 of 10, 10 tokens/s, ETA 0:00:06, FVU 0.200-0.400"
    clock.now += 1
    writer.training(5, 2.0, batch=10)
    assert json.loads((tmp_path / PROGRESS).read_text())["step"] == 4, "at most every 2 s"
    clock.now += WRITE_EVERY_S
    writer.training(6, 2.0, batch=10)
    assert line(tmp_path) == "group 0: step 6 of 10, 8 tokens/s, ETA 0:00:05, FVU 0.200-0.400"
    writer.evaluating(10, "loss recovered")
    assert line(tmp_path).endswith(", FVU 0.200-0.400, evaluating: loss recovered")
