"""The verdict of an audit under a tenant's policy: pass, fail or inconclusive (torch-free).

:func:`decide` checks every attack of an :class:`~core.report.AuditReport` against each
threshold of a :class:`catalog.policy.Policy` with one-sided Wilson score bounds at the
policy's confidence:

- ``max_asr``: the ASR's lower bound above the threshold fails the check, its upper bound at
  or below the threshold passes it, anything else is inconclusive.
- ``max_asr_above_baseline``: the same on ASR minus the clean baseline rate. The poisoned and
  the baseline re-training run on the same instances, so the difference is read from the
  pairs: with p10 the rate of instances the poisons won and the baseline did not, and p01 the
  reverse, ASR - baseline = p10 - p01 <= p10. The upper bound is p10's Wilson upper bound at
  the policy's confidence (one bound: exact level); the lower bound is that of Newcombe's
  hybrid score interval for a difference of paired rates (:func:`paired_difference_lower`),
  at the policy's confidence. (It replaced p10's lower bound minus p01's upper bound, each at
  half the error: a union bound that, with no baseline-only win seen, charged the full upper
  bound of a zero rate and kept a 40-instance look from deciding a 27-point excess.) A report
  without the pairs (before /3) falls back to the ASR's and the baseline's own bounds, each
  at half the error.
- ``max_asr_relative_to_reference``: the model's ASR over the reference's (the undefended
  model audited on the same instances: independent re-trainings), bounded below by the
  model's lower bound over the reference's upper bound and above by the model's upper bound
  over the reference's lower bound, each at half the error (union bound), the upper infinite
  when the reference's lower bound is 0: a reference the attack may not beat at all cannot
  show that the model resists better. Not checked without a reference. Where the reference
  itself resists the attack (its own ASR above baseline, or its ASR where the policy sets no
  baseline threshold, bounded at or below the policy's absolute threshold), the check passes
  with that note unless its bounds fail it: there is nothing for the model to halve, and the
  absolute thresholds judge the model (a near-zero rate over a near-zero rate is undecidable
  at any audit size).

Every rate is the report's headline: ASR among the targets the clean model classifies
correctly (``AttackResult.headline``), where the report has it.

An audit of two or more attacks is also checked on their union (an instance lost to any
attack), under the policy's default thresholds: the worst case a hub should plan for.

The audit fails if any check fails, else is inconclusive if any check is, else passes. A report
with no check to make (the policy's thresholds name none of its attacks) is inconclusive.
Attacks named in the policy that the audit did not run are not checked.

Also the one Wilson score interval of the code base (:func:`wilson_interval`), which
``core.audit`` uses for the report's 95% intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import TYPE_CHECKING, Literal, TypeVar

from catalog.policy import DEFAULT_POLICY, Policy
from catalog.stored import StoredModel

if TYPE_CHECKING:
    from core.report import AttackResult, AuditReport, Rate, UnionResult

# The name the union of the attacks' successes goes by in checks, comparisons and tables; it
# is checked like an attack under the policy's default thresholds.
UNION = "union"

Outcome = Literal["pass", "fail", "inconclusive"]
ResultT = TypeVar("ResultT", "AttackResult", "UnionResult")
ThresholdName = Literal["max_asr", "max_asr_above_baseline", "max_asr_relative_to_reference"]


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


def difference_interval(
    first: tuple[int, int], second: tuple[int, int], z: float = 1.959963984540054
) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p1 - p2 for two independent binomial rates, each
    given as (successes, trials): built from the two Wilson intervals (Newcombe 1998, method
    10), 95% for the default z."""
    (s1, n1), (s2, n2) = first, second
    p1 = s1 / n1 if n1 else 0.0
    p2 = s2 / n2 if n2 else 0.0
    low1, high1 = wilson_interval(s1, n1, z)
    low2, high2 = wilson_interval(s2, n2, z)
    difference = p1 - p2
    lower = difference - math.sqrt((p1 - low1) ** 2 + (high2 - p2) ** 2)
    upper = difference + math.sqrt((high1 - p1) ** 2 + (p2 - low2) ** 2)
    return (max(-1.0, lower), min(1.0, upper))


def paired_difference_lower(
    both: int, first_only: int, second_only: int, neither: int, z: float
) -> float:
    """The lower end of Newcombe's hybrid score interval for p1 - p2 of two rates measured on
    the same trials (Newcombe 1998, "Improving the confidence interval for the difference
    between two paired proportions", method 10): the 2x2 table's cells are the trials both
    succeeded on, only the first, only the second, neither. Each rate's Wilson bound at ``z``
    (a one-sided bound at ``NormalDist().cdf(z)``), combined through the rates' correlation
    phi, whose positive part is continuity-corrected (ad - bc less n/2, at least 0), as
    Newcombe's method does: the correction only widens the interval. phi is 0 where a margin
    is empty. Approximate, like the Wilson bounds it is made of."""
    trials = both + first_only + second_only + neither
    if trials == 0:
        return -1.0
    first, second = both + first_only, both + second_only
    p1, p2 = first / trials, second / trials
    low1 = wilson_interval(first, trials, z)[0]
    high2 = wilson_interval(second, trials, z)[1]
    margins = first * (second_only + neither) * second * (first_only + neither)
    association = float(both * neither - first_only * second_only)
    if association > 0:
        association = max(0.0, association - trials / 2)
    phi = association / math.sqrt(margins) if margins else 0.0
    below, above = p1 - low1, high2 - p2
    spread = below * below - 2 * phi * below * above + above * above
    return max(-1.0, (p1 - p2) - math.sqrt(max(0.0, spread)))


def one_sided_z(confidence: float) -> float:
    """The z of a one-sided bound at ``confidence`` (1.645 at 0.95)."""
    return NormalDist().inv_cdf(confidence)


class Check(StoredModel):
    """One attack against one threshold: the observed value, its bounds and the outcome.

    ``None`` is unbounded: a reference ratio over a reference rate that may be 0.
    """

    attack: str
    name: ThresholdName
    threshold: float
    observed: float | None
    lower: float | None
    upper: float | None
    outcome: Outcome
    # Why a check passed without its bounds deciding it: a reference ratio where the
    # reference itself resisted the attack (there was nothing for the model to reduce).
    note: str | None = None


class Verdict(StoredModel):
    """The audit's outcome under a policy, the sentence that explains it and every check."""

    outcome: Outcome
    reason: str
    checks: list[Check]
    confidence: float
    # The policy that decided, so that a report is self-contained, and its stored version
    # (None: Bulwark's default policy or a local file). Optional: older verdicts have neither.
    policy: Policy | None = None
    policy_version: int | None = None


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def _bound(value: float | None) -> float:
    return math.inf if value is None else value


def _outcome(lower: float, upper: float, threshold: float) -> Outcome:
    if lower > threshold:
        return "fail"
    if upper <= threshold:
        return "pass"
    return "inconclusive"


def _checks(
    attack: str,
    result: AttackResult | UnionResult,
    reference: AttackResult | UnionResult | None,
    policy: Policy,
    z: float,
) -> list[Check]:
    asr, baseline = result.headline, result.headline_baseline
    n = asr.trials
    # Two bounds combined (a difference, a ratio) each take half the error: the union bound
    # keeps the pair at the policy's confidence.
    z_half = one_sided_z(1 - (1 - NormalDist().cdf(z)) / 2)
    checks = []
    for name, threshold in policy.thresholds_for(attack).items():
        check_name: ThresholdName
        note: str | None = None  # set where a resisting reference leaves the ratio moot
        if name == "max_asr":
            check_name = "max_asr"
            observed = asr.rate
            lower, upper = wilson_interval(asr.successes, n, z)
        elif name == "max_asr_above_baseline":
            check_name = "max_asr_above_baseline"
            observed = asr.rate - baseline.rate
            discordant = result.discordant
            if discordant is not None:
                poisons_only, baseline_only = discordant
                upper = wilson_interval(poisons_only, n, z)[1]
                both = max(0, asr.successes - poisons_only)
                neither = max(0, n - both - poisons_only - baseline_only)
                lower = paired_difference_lower(both, poisons_only, baseline_only, neither, z)
            else:
                asr_low, asr_high = wilson_interval(asr.successes, n, z_half)
                base_low, base_high = wilson_interval(baseline.successes, baseline.trials, z_half)
                lower, upper = asr_low - base_high, asr_high - base_low
        else:
            if reference is None:
                continue
            check_name = "max_asr_relative_to_reference"
            ref = reference.headline
            asr_low, asr_high = wilson_interval(asr.successes, n, z_half)
            ref_low, ref_high = wilson_interval(ref.successes, ref.trials, z_half)
            observed = asr.rate / ref.rate if ref.rate > 0 else math.inf
            lower = asr_low / ref_high if ref_high > 0 else math.inf
            upper = asr_high / ref_low if ref_low > 0 else math.inf
            note = _reference_resisted(attack, reference, policy, z)
        outcome = _outcome(lower, upper, threshold)
        if note is not None and outcome != "fail":
            outcome = "pass"  # nothing to reduce: the absolute thresholds judge the model
        checks.append(
            Check(
                attack=attack,
                name=check_name,
                threshold=threshold,
                observed=_finite(observed),
                lower=_finite(lower),
                upper=_finite(upper),
                outcome=outcome,
                note=note if outcome == "pass" else None,
            )
        )
    return checks


def _reference_resisted(
    attack: str, reference: AttackResult | UnionResult, policy: Policy, z: float
) -> str | None:
    """Why the reference ratio has nothing to judge, or None when it has.

    The ratio asks whether the model resists the attack better than the undefended reference;
    where the reference itself is shown to resist it (its own ASR above baseline, or ASR,
    bounded at or below the policy's absolute threshold for the attack), there is nothing to
    reduce, and the model is judged by the absolute thresholds alone: a near-zero rate over a
    near-zero rate is undecidable at any audit size and would keep every verdict open.
    A policy without an absolute threshold keeps the ratio as it is.
    """
    thresholds = policy.thresholds_for(attack)
    ref, baseline = reference.headline, reference.headline_baseline
    if "max_asr_above_baseline" in thresholds:
        limit = thresholds["max_asr_above_baseline"]
        discordant = reference.discordant
        upper = (
            wilson_interval(discordant[0], ref.trials, z)[1]
            if discordant is not None
            else wilson_interval(ref.successes, ref.trials, z)[1] - baseline.rate
        )
        what = "ASR above baseline"
    elif "max_asr" in thresholds:
        limit, upper = thresholds["max_asr"], wilson_interval(ref.successes, ref.trials, z)[1]
        what = "ASR"
    else:
        return None
    if ref.trials == 0 or upper > limit:
        return None
    return f"the reference resists it too: its {what} is at most {_pct(upper)}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


_VERBS = {"pass": "passes", "fail": "fails", "inconclusive": "is inconclusive on"}


def _value(check_name: str, value: float | None) -> str:
    """A rate in percent; the reference ratio as a multiple (None: unbounded)."""
    if value is None:
        return "unbounded"
    if check_name == "max_asr_relative_to_reference":
        return f"{value:.2f}x"
    return _pct(value)


_WHAT = {
    "max_asr": "ASR",
    "max_asr_above_baseline": "ASR above baseline",
    "max_asr_relative_to_reference": "ASR relative to the undefended reference",
}


def _reason(check: Check, confidence: float) -> str:
    what = _WHAT[check.name]
    level = f"{100 * confidence:g}%"

    def show(value: float | None) -> str:
        return _value(check.name, value)

    head = (
        f"{check.attack.upper()} {_VERBS[check.outcome]} {check.name} {show(check.threshold)}: "
        f"{what} {show(check.observed)}"
    )
    if check.outcome == "fail":
        return f"{head}, its {level} lower bound {show(check.lower)} is above the threshold."
    if check.outcome == "pass" and check.note is not None:
        return f"{head}: not judged by the ratio, as {check.note}."
    if check.outcome == "pass":
        return (
            f"{head}, its {level} upper bound {show(check.upper)} is at or below the "
            "threshold (the closest of the passing checks)."
        )
    return (
        f"{check.attack.upper()} is inconclusive on {check.name} {show(check.threshold)}: "
        f"{what} {show(check.observed)}, its {level} bounds [{show(check.lower)}, "
        f"{show(check.upper)}] straddle the threshold (more instances would decide it)."
    )


def decide(report: AuditReport, policy: Policy, *, version: int | None = None) -> Verdict:
    """The verdict of ``report`` under ``policy`` (see the module docstring); the verdict
    records the policy and ``version``, its stored version (None: not a stored policy).

    A sequential audit's report is decided at its per-look confidence, the last look like
    the others: that is what keeps the chance that any of its looks decides wrongly within
    the policy's (Bonferroni), whether it stopped early or ran every round."""
    reference = report.reference
    sequential = report.sequential
    return decide_results(
        report.attacks,
        reference.attacks if reference is not None else {},
        policy,
        version=version,
        union=report.union,
        reference_union=reference.union if reference is not None else None,
        confidence=sequential.look_confidence if sequential is not None else None,
    )


def decide_results(
    attacks: Mapping[str, AttackResult],
    references: Mapping[str, AttackResult],
    policy: Policy,
    *,
    version: int | None = None,
    union: UnionResult | None = None,
    reference_union: UnionResult | None = None,
    confidence: float | None = None,
) -> Verdict:
    """:func:`decide` on per-attack results and the reference's (empty: no reference), and
    the union over the attacks where there is one; a sequential audit decides on the rounds
    run so far with this, at its per-look ``confidence`` (None: the policy's)."""
    confidence = policy.confidence if confidence is None else confidence
    z = one_sided_z(confidence)
    checks = [
        check
        for attack, result in attacks.items()
        for check in _checks(attack, result, references.get(attack), policy, z)
    ]
    if union is not None:
        # The worst case: an instance lost to any attack, under the default thresholds.
        checks += _checks(UNION, union, reference_union, policy, z)
    if not checks:
        return Verdict(
            outcome="inconclusive",
            reason="No threshold of the policy applies to the attacks the audit ran "
            f"({', '.join(attacks) or 'none'}).",
            checks=[],
            confidence=confidence,
            policy=policy,
            policy_version=version,
        )
    outcome: Outcome
    failed = [c for c in checks if c.outcome == "fail"]
    if failed:
        # The most decisive failure: the lower bound furthest above its threshold.
        outcome, deciding = "fail", max(failed, key=lambda c: _bound(c.lower) - c.threshold)
    else:
        # Otherwise the check closest to failing: the upper bound furthest above its threshold
        # (an inconclusive one, if any is).
        outcome = "inconclusive" if any(c.outcome == "inconclusive" for c in checks) else "pass"
        # A check passed by its note (a resisting reference) explains nothing by its bounds.
        bounded = [c for c in checks if c.note is None] or checks
        deciding = max(bounded, key=lambda c: _bound(c.upper) - c.threshold)
    return Verdict(
        outcome=outcome,
        reason=_reason(deciding, confidence),
        checks=checks,
        confidence=confidence,
        policy=policy,
        policy_version=version,
    )


def _scaled_rate(rate: Rate, factor: float) -> Rate:
    successes, trials = round(rate.successes * factor), round(rate.trials * factor)
    return rate.model_copy(
        update={
            "successes": successes,
            "trials": trials,
            "rate": successes / trials if trials else 0.0,
            "wilson95": wilson_interval(successes, trials),
        }
    )


def _projected(result: ResultT, factor: float) -> ResultT:
    """``result`` with its counts multiplied by ``factor`` and its rates kept: what an audit
    ``factor`` times as large would see if its other instances went as these did."""
    from core.report import UnionResult  # core.report imports this module

    pairs = result.discordant
    discordant = None if pairs is None else (round(pairs[0] * factor), round(pairs[1] * factor))
    update: dict[str, object]
    if isinstance(result, UnionResult):
        update = {
            "asr": _scaled_rate(result.headline, factor),
            "baseline": _scaled_rate(result.headline_baseline, factor),
        }
    else:
        update = {
            "asr_correct_targets": _scaled_rate(result.headline, factor),
            "baseline_correct_targets": _scaled_rate(result.headline_baseline, factor),
        }
    return result.model_copy(update={**update, "discordant": discordant})


def futile(
    attacks: Mapping[str, AttackResult],
    references: Mapping[str, AttackResult],
    policy: Policy,
    *,
    factor: float,
    confidence: float,
    union: UnionResult | None = None,
    reference_union: UnionResult | None = None,
) -> bool:
    """Whether an undecided sequential audit should stop for futility: with ``factor`` times
    its instances so far (all it planned) at the rates it has seen, its verdict at
    ``confidence`` would still be inconclusive. Stopping then costs the verdict nothing it
    was going to have, unless the rates of the instances still to craft differ from these;
    the stopped audit's verdict stays inconclusive, as the full one's most likely would."""

    def scaled(results: Mapping[str, AttackResult]) -> dict[str, AttackResult]:
        return {name: _projected(result, factor) for name, result in results.items()}

    projected = decide_results(
        scaled(attacks),
        scaled(references),
        policy,
        union=_projected(union, factor) if union is not None else None,
        reference_union=_projected(reference_union, factor)
        if reference_union is not None
        else None,
        confidence=confidence,
    )
    return projected.outcome == "inconclusive"


CHECK_COLUMNS = ("attack", "threshold", "limit", "observed", "bounds", "outcome")
# What the checks' bounds are, for a reader of a verdict (the HTML page, the model card).
BOUNDS = "one-sided score bounds (Wilson; Newcombe's for ASR above baseline)"


def policy_source(verdict: Verdict) -> str | None:
    """Which policy decided, in a short phrase: "tenant policy v3" (a stored version) or
    "default policy" (Bulwark's); None for a local policy file, or a verdict that predates
    recording its policy."""
    if verdict.policy_version is not None:
        return f"tenant policy v{verdict.policy_version}"
    if verdict.policy is not None and verdict.policy == DEFAULT_POLICY:
        return "default policy"
    return None


def render_verdict(verdict: Verdict) -> str:
    """The verdict line and the checks table, aligned for a terminal."""
    level = f"{100 * verdict.confidence:g}%"
    source = policy_source(verdict)
    basis = f"{level} one-sided bounds" + (f"; {source}" if source else "")
    lines = [f"verdict: {verdict.outcome.upper()} ({basis}). {verdict.reason}"]
    rows = [
        (
            c.attack.upper(),
            c.name,
            _value(c.name, c.threshold),
            _value(c.name, c.observed),
            f"[{_value(c.name, c.lower)}, {_value(c.name, c.upper)}]",
            c.outcome + (f" ({c.note})" if c.note else ""),
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
