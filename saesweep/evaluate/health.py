"""Health verdicts: every run passes, warns or fails against documented thresholds.

The defaults are saetrain's health metrics (loss recovered >= 60-70 %, L0 within 20-200, dead
latents <= 10-20 %, absorption <= 0.25). docs/evaluation.md defines each check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from saesweep.configtools import at_least, fraction
from saesweep.errors import UserError

Verdict = Literal["pass", "warn", "fail"]
LEVELS: tuple[Verdict, ...] = ("pass", "warn", "fail")


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds of the health verdict (a run's worst check is its verdict)."""

    recovered_pass: float = field(default=0.70, metadata=at_least(0))
    """Downstream fidelity (loss_recovered, or final_recovered for encoder models) at or above
    this passes; between recovered_fail and this warns."""
    recovered_fail: float = field(default=0.60, metadata=at_least(0))
    """Downstream fidelity below this fails."""
    l0_min: float = field(default=20.0, metadata=at_least(0))
    """Where L0 is learned (ReLU, JumpReLU): L0 below this warns (a deliberately very sparse
    sweep is not broken, so it never fails)."""
    l0_max: float = field(default=200.0, metadata=at_least(0))
    """Where L0 is learned: L0 above this warns."""
    l0_k_factor: float = field(default=2.0, metadata=at_least(1))
    """Where the run sets k (TopK, BatchTopK, Matryoshka, Switch), L0 follows k by design: it
    warns only outside [k / l0_k_factor, k * l0_k_factor] (a CLT's budget is L x k: k per
    layer)."""
    dead_pass_pct: float = field(default=10.0, metadata=at_least(0))
    """Dead latents (% of d_sae) at or below this pass; up to dead_fail_pct they warn."""
    dead_fail_pct: float = field(default=20.0, metadata=at_least(0))
    """Dead latents (% of d_sae) above this fail."""
    absorption_max: float = field(default=0.25, metadata=fraction())
    """Mean absorption fraction above this warns..."""
    absorption_min_letters: int = field(default=20, metadata=at_least(1))
    """... when it rests on at least this many letters (absorption_letters; SAEBench's
    minimum): over fewer the value is shown as indicative and never warns."""

    def __post_init__(self) -> None:
        for low, high in (("recovered_fail", "recovered_pass"), ("l0_min", "l0_max")):
            if getattr(self, low) > getattr(self, high):
                raise UserError(f"health thresholds: {low} must not exceed {high}")
        if self.dead_pass_pct > self.dead_fail_pct:
            raise UserError("health thresholds: dead_pass_pct must not exceed dead_fail_pct")


@dataclass(frozen=True)
class Health:
    """A run's verdict, the reasons for anything short of pass, the metrics not measured (with
    why, where the run recorded it), and notes on metrics measured but not judged (too little
    evidence)."""

    verdict: Verdict
    reasons: tuple[str, ...]
    not_measured: tuple[str, ...]
    notes: tuple[str, ...] = ()
    why_not_measured: tuple[str, ...] = ()
    """Per metric of not_measured, why ("" when the run does not say)."""

    def summary(self) -> str:
        """Reasons, "<metric> not measured (why)" for each missing one, then the notes, joined
        by "; "."""
        return "; ".join([*self.reasons, *self.missing(), *self.notes])

    def missing(self) -> list[str]:
        """ "<metric> not measured", with "(why)" where known, per metric not measured."""
        why = self.why_not_measured or ("",) * len(self.not_measured)
        return [
            f"{m} not measured" + (f" ({w})" if w else "")
            for m, w in zip(self.not_measured, why, strict=True)
        ]


def assess(metrics: dict, cfg: HealthConfig | None = None) -> Health:
    """The health of one run from its metrics.json contents."""
    cfg = cfg or HealthConfig()
    if metrics.get("failed"):
        return Health("fail", ("training failed (a non-finite loss or gradient)",), ())
    checks = [_fidelity(metrics, cfg), _l0(metrics, cfg), _dead(metrics, cfg)]
    checks.append(_absorption(metrics, cfg))
    found = [c for c in checks if isinstance(c, tuple) and c[0] in LEVELS]
    verdict = max((level for level, _ in found), key=LEVELS.index, default="pass")
    missing = tuple(c for c in checks if isinstance(c, str))
    return Health(
        verdict,
        tuple(reason for _, reason in found),
        missing,
        tuple(text for c in checks if isinstance(c, tuple) and c[0] == "note" for text in c[1:]),
        tuple(_why(metrics, m) for m in missing),
    )


NOT_MEASURED_WHY = {"absorption": "absorption_reason"}
"""metrics.json keys that say why a metric was not measured."""


def _why(metrics: dict, metric: str) -> str:
    return str(metrics.get(NOT_MEASURED_WHY[metric], "")) if metric in NOT_MEASURED_WHY else ""


Check = tuple[Verdict | Literal["note"], str] | str | None
"""(warn|fail, reason); ("note", text) for a value shown but not judged; the name of a metric
that is not measured; or None for a pass."""


def fidelity_key(metrics: dict) -> str:
    """loss_recovered (causal LMs) when present, else the encoder score final_recovered."""
    return "loss_recovered" if _measured(metrics.get("loss_recovered")) else "final_recovered"


def _fidelity(metrics: dict, cfg: HealthConfig) -> Check:
    key = fidelity_key(metrics)
    value, name = metrics.get(key), key.replace("_", " ")
    if not _measured(value):
        return "loss recovered"
    shown = _pair(100 * value, 100 * cfg.recovered_fail, 100 * cfg.recovered_pass)
    if value < cfg.recovered_fail:
        return "fail", f"{name} {shown[0]} % < {shown[1]} %"
    if value < cfg.recovered_pass:
        return "warn", f"{name} {shown[0]} % < {shown[2]} %"
    return None


def _l0(metrics: dict, cfg: HealthConfig) -> Check:
    value, k = metrics.get("l0"), metrics.get("k")
    if not _measured(value):
        return "L0"
    if _measured(k) and k > 0:
        budget, of_k = _l0_budget(k, metrics.get("k_layers"))
        low, high = budget / cfg.l0_k_factor, budget * cfg.l0_k_factor
    else:
        low, high, of_k = cfg.l0_min, cfg.l0_max, ""
    shown = _pair(value, low, high)
    if value < low:
        return "warn", f"L0 {shown[0]} < {shown[1]}{of_k}"
    if value > high:
        return "warn", f"L0 {shown[0]} > {shown[2]}{of_k}"
    return None


def _l0_budget(k: float, k_layers: int | None) -> tuple[float, str]:
    """(the L0 a run's k sets, how the reason names it): k, or L x k for a run that keeps k
    latents in each of L layers (a TopK CLT; a crosscoder's k is over all its layers)."""
    if not _measured(k_layers) or k_layers <= 1:
        return k, f" (k {_trim(f'{k:g}')})"
    return k * k_layers, f" (k {_trim(f'{k:g}')} x {k_layers} layers)"


def _dead(metrics: dict, cfg: HealthConfig) -> Check:
    value = metrics.get("dead_pct")
    if not _measured(value):
        return "dead latents"
    shown = _pair(value, cfg.dead_fail_pct, cfg.dead_pass_pct)
    if value > cfg.dead_fail_pct:
        return "fail", f"dead {shown[0]} % > {shown[1]} %"
    if value > cfg.dead_pass_pct:
        return "warn", f"dead {shown[0]} % > {shown[2]} %"
    return None


def _absorption(metrics: dict, cfg: HealthConfig) -> Check:
    value, letters = metrics.get("absorption"), metrics.get("absorption_letters", 0)
    if not _measured(value):
        return "absorption"
    if letters < cfg.absorption_min_letters:
        shown = _pair(value, cfg.absorption_max)[0]
        return "note", (
            f"absorption {shown} indicative ({letters} letters < {cfg.absorption_min_letters})"
        )
    if value > cfg.absorption_max:
        shown = _pair(value, cfg.absorption_max)
        return "warn", f"absorption {shown[0]} > {shown[1]}"
    return None


def _measured(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _pair(value: float, *thresholds: float) -> tuple[str, ...]:
    """The value and thresholds as short numbers: each threshold exactly (to 4 decimals), the
    value with as many decimals as the most precise threshold, and more where it would read
    equal to a threshold it differs from (20.04 against 20 shows as 20.04)."""
    limits = [_trim(f"{t:.4f}") for t in thresholds]
    digits = max(len(t.partition(".")[2]) for t in limits)
    shown = _trim(f"{value:.{digits}f}")
    pairs = list(zip(thresholds, limits, strict=True))
    while digits < 4 and any(shown == s and value != t for t, s in pairs):
        digits += 1
        shown = _trim(f"{value:.{digits}f}")
    return (shown, *limits)


def _trim(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text
