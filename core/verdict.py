"""The verdict of an audit under a tenant's policy: pass, fail or inconclusive (torch-free).

:func:`decide` checks every attack of an :class:`~core.report.AuditReport` against each
threshold of a :class:`catalog.policy.Policy` with one-sided Wilson score bounds at the
policy's confidence:

- ``max_asr``: the ASR's lower bound above the threshold fails the check, its upper bound at
  or below the threshold passes it, anything else is inconclusive.
- ``max_asr_above_baseline``: the same on ASR minus the clean baseline rate, bounded below by
  the ASR's lower bound minus the baseline's upper bound and above by the ASR's upper bound
  minus the baseline's lower bound. Each of the two bounds holds at the policy's confidence, so
  the difference's interval is conservative (wider than a joint bound at that confidence
  would be): it fails or passes less often, never more.

The audit fails if any check fails, else is inconclusive if any check is, else passes. A report
with no check to make (the policy's thresholds name none of its attacks) is inconclusive.
Attacks named in the policy that the audit did not run are not checked.

Also the one Wilson score interval of the code base (:func:`wilson_interval`), which
``core.audit`` uses for the report's 95% intervals.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from catalog.policy import Policy

if TYPE_CHECKING:
    from core.report import AttackResult, AuditReport

Outcome = Literal["pass", "fail", "inconclusive"]
ThresholdName = Literal["max_asr", "max_asr_above_baseline"]


def wilson_interval(
    successes: int, trials: int, z: float = 1.959963984540054
) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate (95% two-sided for the default z; each end
    is a one-sided bound at ``NormalDist().cdf(z)``)."""
    if trials == 0:
        return (0.0, 1.0)
    rate = successes / trials
    denominator = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / denominator
    # At 0 or all successes the bound is exact; say so rather than leave rounding residue.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return (low, high)


def one_sided_z(confidence: float) -> float:
    """The z of a one-sided bound at ``confidence`` (1.645 at 0.95)."""
    return NormalDist().inv_cdf(confidence)


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Check(_Part):
    """One attack against one threshold: the observed value, its bounds and the outcome."""

    attack: str
    name: ThresholdName
    threshold: float
    observed: float
    lower: float
    upper: float
    outcome: Outcome


class Verdict(_Part):
    """The audit's outcome under a policy, the sentence that explains it and every check."""

    outcome: Outcome
    reason: str
    checks: list[Check]
    confidence: float


def _outcome(lower: float, upper: float, threshold: float) -> Outcome:
    if lower > threshold:
        return "fail"
    if upper <= threshold:
        return "pass"
    return "inconclusive"


def _checks(attack: str, result: AttackResult, policy: Policy, z: float) -> list[Check]:
    asr_low, asr_high = wilson_interval(result.successes, result.instances, z)
    checks = []
    for name, threshold in policy.thresholds_for(attack).items():
        if name == "max_asr":
            observed, lower, upper = result.asr, asr_low, asr_high
        else:
            base_low, base_high = wilson_interval(result.baseline.successes, result.instances, z)
            observed = result.asr - result.baseline.rate
            lower, upper = asr_low - base_high, asr_high - base_low
        checks.append(
            Check(
                attack=attack,
                name="max_asr" if name == "max_asr" else "max_asr_above_baseline",
                threshold=threshold,
                observed=observed,
                lower=lower,
                upper=upper,
                outcome=_outcome(lower, upper, threshold),
            )
        )
    return checks


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


_VERBS = {"pass": "passes", "fail": "fails", "inconclusive": "is inconclusive on"}


def _reason(check: Check, confidence: float) -> str:
    what = "ASR" if check.name == "max_asr" else "ASR above baseline"
    level = f"{100 * confidence:g}%"
    head = (
        f"{check.attack.upper()} {_VERBS[check.outcome]} {check.name} {_pct(check.threshold)}: "
        f"{what} {_pct(check.observed)}"
    )
    if check.outcome == "fail":
        return f"{head}, its {level} lower bound {_pct(check.lower)} is above the threshold."
    if check.outcome == "pass":
        return (
            f"{head}, its {level} upper bound {_pct(check.upper)} is at or below the "
            "threshold (the closest of the passing checks)."
        )
    return (
        f"{check.attack.upper()} is inconclusive on {check.name} {_pct(check.threshold)}: "
        f"{what} {_pct(check.observed)}, its {level} bounds [{_pct(check.lower)}, "
        f"{_pct(check.upper)}] straddle the threshold (more instances would decide it)."
    )


def decide(report: AuditReport, policy: Policy) -> Verdict:
    """The verdict of ``report`` under ``policy`` (see the module docstring)."""
    z = one_sided_z(policy.confidence)
    checks = [
        check
        for attack, result in report.attacks.items()
        for check in _checks(attack, result, policy, z)
    ]
    if not checks:
        return Verdict(
            outcome="inconclusive",
            reason="No threshold of the policy applies to the attacks the audit ran "
            f"({', '.join(report.attacks) or 'none'}).",
            checks=[],
            confidence=policy.confidence,
        )
    outcome: Outcome
    failed = [c for c in checks if c.outcome == "fail"]
    if failed:
        # The most decisive failure: the lower bound furthest above its threshold.
        outcome, deciding = "fail", max(failed, key=lambda c: c.lower - c.threshold)
    else:
        # Otherwise the check closest to failing: the upper bound furthest above its threshold
        # (an inconclusive one, if any is).
        outcome = "inconclusive" if any(c.outcome == "inconclusive" for c in checks) else "pass"
        deciding = max(checks, key=lambda c: c.upper - c.threshold)
    return Verdict(
        outcome=outcome,
        reason=_reason(deciding, policy.confidence),
        checks=checks,
        confidence=policy.confidence,
    )


CHECK_COLUMNS = ("attack", "threshold", "limit", "observed", "bounds", "outcome")


def render_verdict(verdict: Verdict) -> str:
    """The verdict line and the checks table, aligned for a terminal."""
    level = f"{100 * verdict.confidence:g}%"
    lines = [f"verdict: {verdict.outcome.upper()} ({level} one-sided bounds). {verdict.reason}"]
    rows = [
        (
            c.attack.upper(),
            c.name,
            _pct(c.threshold),
            _pct(c.observed),
            f"[{_pct(c.lower)}, {_pct(c.upper)}]",
            c.outcome,
        )
        for c in verdict.checks
    ]
    if rows:
        widths = [
            max(len(cell) for cell in column) for column in zip(CHECK_COLUMNS, *rows, strict=False)
        ]
        for row in [CHECK_COLUMNS, *rows]:
            lines.append(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
    return "\n".join(lines)
