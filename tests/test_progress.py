"""A group's progress line: written from the first step on, the FVU range of the last log
step kept between log steps, the final evaluation's stage named."""

from __future__ import annotations

import json

from saesweep.train.progress import PROGRESS, WRITE_EVERY_S, ProgressWriter, describe


def line(tmp_path) -> str:
    return describe(0, json.loads((tmp_path / PROGRESS).read_text()), finished=False)


def test_progress_shows_from_the_first_step_and_keeps_the_last_fvu_range(tmp_path):
    writer = ProgressWriter(tmp_path, total_steps=10)
    writer.training(1, 100.0, batch=10)
    assert line(tmp_path) == "group 0: step 1 of 10, 100 tokens/s, ETA 0:00:01"
    writer.last -= WRITE_EVERY_S
    writer.training(4, 50.0, batch=10, fvus=[0.4, float("nan"), 0.2])
    assert line(tmp_path) == "group 0: step 4 of 10, 50 tokens/s, ETA 0:00:01, FVU 0.200-0.400"
    writer.training(5, 50.0, batch=10)
    assert json.loads((tmp_path / PROGRESS).read_text())["step"] == 4, "at most every 2 s"
    writer.last -= WRITE_EVERY_S
    writer.training(6, 20.0, batch=10)
    assert line(tmp_path) == "group 0: step 6 of 10, 20 tokens/s, ETA 0:00:02, FVU 0.200-0.400"
    writer.evaluating(10, "loss recovered")
    assert line(tmp_path).endswith(", FVU 0.200-0.400, evaluating: loss recovered")
