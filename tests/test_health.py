"""Health verdicts against the documented thresholds."""

from __future__ import annotations

import pytest

from saesweep.errors import UserError
from saesweep.evaluate.health import HealthConfig, assess

HEALTHY = {"fvu": 0.1, "l0": 64.0, "dead_pct": 2.0, "loss_recovered": 0.9, "failed": False}


def test_healthy_run_passes_and_names_what_was_not_measured():
    health = assess(HEALTHY)
    assert health.verdict == "pass"
    assert health.reasons == ()
    assert health.not_measured == ("absorption",)
    assert health.summary() == "absorption not measured"


@pytest.mark.parametrize(
    ("change", "verdict", "reason"),
    [
        ({"dead_pct": 34.0}, "fail", "dead 34 % > 20 %"),
        ({"dead_pct": 15.0}, "warn", "dead 15 % > 10 %"),
        ({"dead_pct": 20.04}, "fail", "dead 20.04 % > 20 %"),
        ({"dead_pct": 20.0}, "warn", "dead 20 % > 10 %"),
        ({"loss_recovered": 0.55}, "fail", "loss recovered 55 % < 60 %"),
        ({"loss_recovered": 0.65}, "warn", "loss recovered 65 % < 70 %"),
        ({"l0": 8.0}, "warn", "L0 8 < 20"),
        ({"l0": 200.4}, "warn", "L0 200.4 > 200"),
        ({"absorption": 0.31, "absorption_letters": 20}, "warn", "absorption 0.31 > 0.25"),
    ],
)
def test_each_threshold(change, verdict, reason):
    health = assess(HEALTHY | change)
    assert (health.verdict, health.reasons) == (verdict, (reason,))


def test_worst_check_wins_and_every_reason_is_kept():
    health = assess(
        HEALTHY | {"l0": 300.0, "dead_pct": 34.0, "absorption": 0.1, "absorption_letters": 26}
    )
    assert health.verdict == "fail"
    assert health.reasons == ("L0 300 > 200", "dead 34 % > 20 %")
    assert health.not_measured == ()


@pytest.mark.parametrize("letters", [None, 0, 3, 19])
def test_absorption_over_fewer_than_20_letters_is_indicative(letters):
    """SAEBench judges absorption only over at least 20 letters: over fewer (the demo has 3)
    the value is shown as a note, and never warns."""
    measured = {"absorption": 0.5} | ({} if letters is None else {"absorption_letters": letters})
    health = assess(HEALTHY | measured)
    assert (health.verdict, health.reasons, health.not_measured) == ("pass", (), ())
    note = f"absorption 0.5 indicative ({letters or 0} letters < 20)"
    assert health.notes == (note,) and health.summary() == note
    fewer = assess(HEALTHY | measured, HealthConfig(absorption_min_letters=max(letters or 0, 1)))
    assert fewer.verdict == ("warn" if letters else "pass")


@pytest.mark.parametrize(
    ("l0", "reason"),
    [
        (16.0, None),
        (8.0, None),
        (31.9, None),
        (7.5, "L0 7.5 < 8 (k 16)"),
        (33.0, "L0 33 > 32 (k 16)"),
    ],
)
def test_l0_of_a_run_with_k_is_judged_against_k(l0, reason):
    """TopK-like runs set L0 by k: the demo's k 16 passes, where 20-200 would warn."""
    health = assess(HEALTHY | {"l0": l0, "k": 16})
    assert health.reasons == ((reason,) if reason else ())
    assert assess(HEALTHY | {"l0": 16.0, "k": None}).reasons == ("L0 16 < 20",)


@pytest.mark.parametrize(
    ("l0", "reason"),
    [
        (20.0, None),
        (12.5, None),
        (11.5, "L0 11.5 < 12 (k 8 x 3 layers)"),
        (49.0, "L0 49 > 48 (k 8 x 3 layers)"),
    ],
)
def test_l0_of_a_clt_is_judged_against_k_per_layer_times_its_layers(l0, reason):
    """A TopK CLT keeps k latents per layer: L0 20 of k 8 over 3 layers passes, where k
    alone (4 to 16) would warn."""
    health = assess(HEALTHY | {"l0": l0, "k": 8, "k_layers": 3})
    assert health.reasons == ((reason,) if reason else ())
    assert assess(HEALTHY | {"l0": 20.0, "k": 8, "k_layers": 1}).reasons == ("L0 20 > 16 (k 8)",)


def test_encoder_score_stands_in_for_loss_recovered():
    encoder = {k: v for k, v in HEALTHY.items() if k != "loss_recovered"}
    health = assess(encoder | {"final_recovered": 0.5})
    assert health.reasons == ("final recovered 50 % < 60 %",)


def test_missing_or_undefined_metric_is_not_measured_not_a_failure():
    no_downstream = {k: v for k, v in HEALTHY.items() if k != "loss_recovered"}
    assert assess(no_downstream).verdict == "pass"
    assert assess(no_downstream).not_measured == ("loss recovered", "absorption")
    undefined = assess(HEALTHY | {"loss_recovered": float("nan")})
    assert (undefined.verdict, undefined.not_measured[0]) == ("pass", "loss recovered")


def test_failed_training_fails():
    health = assess(HEALTHY | {"failed": True})
    assert health.verdict == "fail"
    assert health.reasons == ("training failed (a non-finite loss or gradient)",)


def test_thresholds_are_configurable_and_checked():
    strict = HealthConfig(dead_pass_pct=1.0, dead_fail_pct=1.5, l0_max=50.0)
    health = assess(HEALTHY, strict)
    assert (health.verdict, health.reasons) == ("fail", ("L0 64 > 50", "dead 2 % > 1.5 %"))
    with pytest.raises(UserError, match="dead_pass_pct must not exceed dead_fail_pct"):
        HealthConfig(dead_pass_pct=30.0)


def test_absorption_not_measured_says_why_when_the_run_does():
    health = assess(HEALTHY | {"absorption_reason": "turned off: absorption.n_tokens is 0"})
    assert health.not_measured == ("absorption",)
    assert health.summary() == "absorption not measured (turned off: absorption.n_tokens is 0)"


@pytest.mark.parametrize(
    ("arch", "l0"), [("topk", 16.0), ("batchtopk", 14.7), ("matryoshka", 16.4), ("switch", 16.0)]
)
def test_the_demo_sweeps_k_runs_pass(arch, l0):
    """The demo's held-out L0 at k 16 (docs/training.md): no "L0 16 < 20" warning."""
    demo = {"fvu": 0.25, "l0": l0, "k": 16, "dead_pct": 3.5, "final_recovered": 0.93}
    health = assess(demo | {"arch": arch, "absorption": 0.4, "absorption_letters": 3})
    assert (health.verdict, health.reasons) == ("pass", ())
