"""Verdicts: a policy's thresholds against an audit report, by one-sided Wilson bounds."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from catalog.policy import DEFAULT_POLICY, Policy, read_policy
from core.report import (
    AttackResult,
    AuditReport,
    BaselineResult,
    DatasetFacts,
    MeanStd,
    ModelFacts,
    read_report,
)
from core.verdict import (
    decide,
    one_sided_z,
    paired_difference_lower,
    render_verdict,
    wilson_interval,
)

ZERO = MeanStd(mean=0.0, std=0.0)


def _attack(name: str, successes: int, instances: int, baseline: int = 0) -> AttackResult:
    return AttackResult(
        attack=name,
        poisons_per_instance=1,
        instances=instances,
        successes=successes,
        asr=successes / instances,
        asr_wilson95=wilson_interval(successes, instances),
        baseline=BaselineResult(
            successes=baseline,
            rate=baseline / instances,
            wilson95=wilson_interval(baseline, instances),
            re_acc=ZERO,
        ),
        re_acc=ZERO,
        feature_distance=ZERO,
        relative_feature_distance=ZERO,
        max_linf=0.1,
        seconds={},
        rows=[],
    )


def _report(*attacks: AttackResult) -> AuditReport:
    return AuditReport(
        created_at="2026-01-01T00:00:00Z",
        model=ModelFacts(
            path="m",
            arch="convnet",
            feature_dim=8,
            num_classes=10,
            defense=None,
            trained_on=None,
            weights_sha256=None,
        ),
        dataset=DatasetFacts(
            name="digits",
            classes=[str(i) for i in range(10)],
            split={},
            retrain_images=0,
            pool_images=0,
            eval_images=0,
        ),
        pre_acc=None,
        pre_acc_source=None,
        head_init="pretrained",
        config={},
        seed=0,
        device="cpu",
        precision="float32",
        instances=[],
        attacks={a.attack: a for a in attacks},
        screen=None,
        timings={},
        versions={},
    )


def test_wilson_bounds_match_known_values():
    # Two-sided 95% (z 1.96): 5/10 -> [0.2366, 0.7634], the textbook Wilson score interval.
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 0/n: the upper bound is z^2 / (n + z^2); one-sided 95% has z 1.6449.
    z = one_sided_z(0.95)
    assert z == pytest.approx(1.644854, abs=1e-6)
    assert wilson_interval(0, 10, z) == (0.0, pytest.approx(z * z / (10 + z * z)))
    assert wilson_interval(0, 10, z)[1] == pytest.approx(0.21294, abs=1e-5)
    assert wilson_interval(10, 10, z) == (pytest.approx(10 / (10 + z * z)), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_a_clearly_vulnerable_model_fails():
    verdict = decide(_report(_attack("bp", 40, 50)), Policy(default={"max_asr": 0.2}))
    assert verdict.outcome == "fail" and verdict.confidence == 0.95
    (check,) = verdict.checks
    assert check.attack == "bp" and check.name == "max_asr" and check.outcome == "fail"
    assert check.observed == 0.8 and check.lower > 0.2
    assert (check.lower, check.upper) == wilson_interval(40, 50, one_sided_z(0.95))
    assert verdict.reason.startswith("BP fails max_asr 20.0%") and "80.0%" in verdict.reason


def test_a_clearly_robust_model_passes():
    report = _report(_attack("fc", 0, 100), _attack("bp", 1, 100))
    verdict = decide(report, Policy(default={"max_asr": 0.1, "max_asr_above_baseline": 0.1}))
    assert verdict.outcome == "pass" and len(verdict.checks) == 4
    assert all(c.outcome == "pass" and c.upper <= 0.1 for c in verdict.checks)
    # The reason names the check closest to failing: BP (1/100) above its baseline, whose
    # two unpaired bounds each take half the error (a wider upper bound than max_asr's).
    assert verdict.reason.startswith("BP passes max_asr_above_baseline 10.0%")


def test_asr_above_baseline_is_bounded_from_the_paired_instances():
    """Poisoned and baseline heads share their instances: the paired bounds use only the
    discordant pairs, so a baseline that wins on the same targets as the poisons costs
    nothing, where the unpaired bounds of two 15% rates could never show a 10% limit."""
    unpaired = _attack("bp", 18, 120, baseline=15)
    paired = unpaired.model_copy(update={"discordant": (3, 0)})
    policy = Policy(default={"max_asr_above_baseline": 0.1})
    z = one_sided_z(0.95)
    (check,) = decide(_report(paired), policy).checks
    assert check.upper == pytest.approx(wilson_interval(3, 120, z)[1])
    assert check.outcome == "pass" and check.observed == pytest.approx(3 / 120)
    # 18 ASR successes with 3 the baseline did not have: 15 both, 3 poisons only, 102 neither.
    assert check.lower == pytest.approx(paired_difference_lower(15, 3, 0, 102, z))
    z_half = one_sided_z(0.975)
    (loose,) = decide(_report(unpaired), policy).checks
    assert loose.outcome == "inconclusive" and loose.upper > check.upper
    assert loose.upper == pytest.approx(
        wilson_interval(18, 120, z_half)[1] - wilson_interval(15, 120, z_half)[0]
    )
    # Poisons that win where the baseline loses, many times over: a failure.
    (fails,) = decide(_report(paired.model_copy(update={"discordant": (40, 1)})), policy).checks
    assert fails.outcome == "fail"
    assert fails.lower == pytest.approx(paired_difference_lower(0, 40, 1, 79, z))


def test_the_paired_lower_bound_is_newcombes():
    """Newcombe's method 10, computed by hand: the Wilson bounds of the two rates combined in
    quadrature, through their correlation where the table has one."""
    z = one_sided_z(0.95)
    # No association (a margin with a zero cell): phi = 0, the plain square-and-add bound.
    p1, p2 = 16 / 60, 0.0
    expected = (p1 - p2) - math.sqrt(
        (p1 - wilson_interval(16, 60, z)[0]) ** 2 + (wilson_interval(0, 60, z)[1] - p2) ** 2
    )
    assert paired_difference_lower(0, 16, 0, 44, z) == pytest.approx(expected)
    # Positively associated rates (both won on the same 10 of 100): phi, less its continuity
    # correction, narrows the interval.
    a, b, c, d = 10, 12, 3, 75
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    below = p1 - wilson_interval(a + b, n, z)[0]
    above = wilson_interval(a + c, n, z)[1] - p2
    phi = (a * d - b * c - n / 2) / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    expected = (p1 - p2) - math.sqrt(below**2 - 2 * phi * below * above + above**2)
    assert paired_difference_lower(a, b, c, d, z) == pytest.approx(expected)
    assert expected > (p1 - p2) - math.sqrt(below**2 + above**2)
    # The union bound it replaced (each rate's bound at half the error, added) was looser:
    # this 40-instance look of 27% over a zero baseline could not fail a 10-point limit.
    z_half = one_sided_z(1 - 0.0125 / 2)
    union = wilson_interval(16, 60, z_half)[0] - wilson_interval(0, 60, z_half)[1]
    paired = paired_difference_lower(0, 16, 0, 44, one_sided_z(0.9875))
    assert union < 0.1 < paired
    # More confidence, a lower bound; no trials, no bound.
    assert paired_difference_lower(0, 16, 0, 44, one_sided_z(0.99)) < paired
    assert paired_difference_lower(0, 0, 0, 0, z) == -1.0


def test_a_small_sample_is_inconclusive():
    # 1/4: the bounds straddle 20% whatever the truth; 99% confidence widens them further.
    for confidence in (0.9, 0.95, 0.99):
        policy = Policy(confidence=confidence, default={"max_asr": 0.2})
        verdict = decide(_report(_attack("cp", 1, 4)), policy)
        assert verdict.outcome == "inconclusive" and verdict.confidence == confidence
        assert verdict.checks[0].lower < 0.2 < verdict.checks[0].upper
        assert verdict.reason.startswith("CP is inconclusive on max_asr 20.0%")
    # ... and the same rate over many instances decides it.
    assert decide(_report(_attack("cp", 250, 1000)), Policy(default={"max_asr": 0.2})).outcome == (
        "fail"
    )


def test_per_attack_thresholds_override_the_default():
    report = _report(_attack("fc", 10, 100), _attack("bp", 10, 100))
    assert decide(report, Policy(default={"max_asr": 0.3})).outcome == "pass"
    policy = read_policy(
        '{"default": {"max_asr": 0.3, "max_asr_above_baseline": 0.3},'
        ' "attacks": {"fc": {"max_asr": 0.02}, "bp": {"max_asr_above_baseline": null}}}'
    )
    verdict = decide(report, policy)
    assert verdict.outcome == "fail" and verdict.reason.startswith("FC fails max_asr 2.0%")
    by_check = {(c.attack, c.name): c for c in verdict.checks}
    # FC: its own max_asr, the default's baseline rule; BP: the default's max_asr only.
    assert set(by_check) == {("fc", "max_asr"), ("fc", "max_asr_above_baseline"), ("bp", "max_asr")}
    assert by_check["fc", "max_asr"].threshold == 0.02
    assert by_check["bp", "max_asr"].outcome == "pass"
    # An attack the audit did not run is not checked.
    assert decide(report, Policy(attacks={"cp": {"max_asr": 0.0}})).outcome == "inconclusive"


def test_the_baseline_relative_rule():
    # Without the discordant pairs (a report before /3) each rate takes half the error.
    z = one_sided_z(0.975)
    # A high ASR that the clean re-training mostly reaches too: only the difference counts.
    report = _report(_attack("bp", 50, 400, baseline=48))
    verdict = decide(report, Policy(default={"max_asr_above_baseline": 0.1}))
    (check,) = verdict.checks
    asr_low, asr_high = wilson_interval(50, 400, z)
    base_low, base_high = wilson_interval(48, 400, z)
    assert check.observed == pytest.approx(2 / 400)
    # Conservative: the ASR's lower bound minus the baseline's upper bound, and vice versa.
    assert check.lower == pytest.approx(asr_low - base_high)
    assert check.upper == pytest.approx(asr_high - base_low)
    assert verdict.outcome == "pass"
    assert decide(report, Policy(default={"max_asr": 0.1})).outcome == "fail"
    # Far above the baseline fails the rule while max_asr alone would pass.
    report = _report(_attack("fc", 90, 100, baseline=5))
    assert decide(report, Policy(default={"max_asr": 0.95})).outcome == "pass"
    verdict = decide(report, Policy(default={"max_asr": 0.95, "max_asr_above_baseline": 0.3}))
    assert verdict.outcome == "fail"
    assert verdict.reason.startswith("FC fails max_asr_above_baseline 30.0%")
    assert "ASR above baseline 85.0%" in verdict.reason


def test_fail_beats_inconclusive_beats_pass():
    robust, unsure, broken = _attack("fc", 0, 100), _attack("cp", 1, 4), _attack("bp", 40, 50)
    policy = Policy(default={"max_asr": 0.2})
    assert decide(_report(robust, unsure), policy).outcome == "inconclusive"
    verdict = decide(_report(robust, unsure, broken), policy)
    assert verdict.outcome == "fail" and verdict.reason.startswith("BP")
    lines = render_verdict(verdict).splitlines()
    assert lines[0].startswith("verdict: FAIL (95% one-sided bounds). BP fails")
    assert len(lines) == 1 + 1 + 3 and "inconclusive" in lines[3]


def test_the_verdict_travels_in_the_report():
    report = _report(_attack("fc", 0, 100))
    assert report.verdict is None and "verdict" not in json.loads(
        report.model_dump_json(exclude={"verdict"})
    )
    # A /2 report written before verdicts existed reads with none.
    assert read_report(report.model_dump_json(exclude={"verdict"})).verdict is None
    verdict = decide(report, Policy(default={"max_asr": 0.1}))
    with_verdict = report.model_copy(update={"verdict": verdict})
    document = json.loads(with_verdict.model_dump_json())
    assert document["verdict"]["outcome"] == "pass"
    assert read_report(document) == with_verdict


def test_policies_are_validated():
    example = '{"confidence": 0.95, "default": {"max_asr": 0.2, "max_asr_above_baseline": 0.1},'
    example += ' "attacks": {"fc": {"max_asr": 0.1}}}'
    policy = read_policy(example)
    assert policy.thresholds_for("fc") == {"max_asr": 0.1, "max_asr_above_baseline": 0.1}
    assert policy.thresholds_for("bp") == {"max_asr": 0.2, "max_asr_above_baseline": 0.1}
    with pytest.raises(ValidationError) as caught:
        read_policy(
            '{"confidence": 0.5, "default": {"max_asr": -1}, "attacks": {"xx": {}}, "extra": 1}'
        )
    where = {tuple(e["loc"]) for e in caught.value.errors()}
    assert where == {
        ("confidence",),
        ("default", "max_asr"),
        ("attacks", "xx", "[key]"),
        ("extra",),
    }
    for invalid in ("not json", "{}", '{"default": {"max_asr": null}}', '{"confidence": 1}'):
        with pytest.raises(ValidationError):
            read_policy(invalid)
    with pytest.raises(ValidationError):  # frozen
        policy.confidence = 0.9  # type: ignore[misc]


def test_the_verdict_records_the_policy_that_decided_and_its_version():
    report = _report(_attack("fc", 0, 100), _attack("bp", 40, 50))
    policy = read_policy('{"default": {"max_asr": 0.2}, "attacks": {"fc": {"max_asr": 0.05}}}')
    local = decide(report, policy)
    assert local.policy == policy and local.policy_version is None
    stored = decide(report, policy, version=3)
    assert stored.policy == policy and stored.policy_version == 3
    assert stored.outcome == local.outcome == "fail"
    # A report with no check to make records its policy too.
    unchecked = decide(report, Policy(attacks={"cp": {"max_asr": 0.1}}), version=1)
    assert unchecked.outcome == "inconclusive" and unchecked.policy_version == 1
    assert unchecked.policy is not None and set(unchecked.policy.attacks) == {"cp"}
    # The source in one phrase on the verdict line: a stored version, the default, a file.
    assert render_verdict(stored).startswith(
        "verdict: FAIL (95% one-sided bounds; tenant policy v3)."
    )
    by_default = render_verdict(decide(report, DEFAULT_POLICY))
    assert by_default.startswith("verdict: ") and "; default policy)." in by_default.splitlines()[0]
    assert render_verdict(local).startswith("verdict: FAIL (95% one-sided bounds). BP fails")


def test_a_recorded_policy_reads_back_with_the_same_meaning():
    # An attack's entry overrides only the fields it gives: written with its unset fields as
    # nulls, FC would read back with the default's baseline check turned off.
    policy = read_policy(
        '{"default": {"max_asr": 0.2, "max_asr_above_baseline": 0.1},'
        ' "attacks": {"fc": {"max_asr": 0.1}, "bp": {"max_asr_above_baseline": null}}}'
    )
    report = _report(_attack("fc", 0, 100))
    with_verdict = report.model_copy(update={"verdict": decide(report, policy, version=2)})
    document = json.loads(with_verdict.model_dump_json())
    assert document["verdict"]["policy_version"] == 2
    assert document["verdict"]["policy"]["attacks"] == {
        "fc": {"max_asr": 0.1},
        "bp": {"max_asr_above_baseline": None},
    }
    recorded = read_report(document).verdict
    assert recorded is not None and recorded.policy is not None
    for attack in ("fc", "bp", "cp"):
        assert recorded.policy.thresholds_for(attack) == policy.thresholds_for(attack)
    assert recorded.policy.thresholds_for("fc") == {"max_asr": 0.1, "max_asr_above_baseline": 0.1}
    # A verdict written before policies were recorded reads with neither.
    document["verdict"].pop("policy")
    document["verdict"].pop("policy_version")
    old = read_report(document).verdict
    assert old is not None and old.policy is None and old.policy_version is None


def _paired(name: str, successes: int, instances: int, discordant: tuple[int, int]):
    return _attack(name, successes, instances).model_copy(update={"discordant": discordant})


def test_a_reference_that_resists_the_attack_leaves_the_ratio_nothing_to_judge():
    """1 of 200 against 1 of 200: the ratio's bounds straddle 0.5 at any size. The reference
    itself resists (its ASR above baseline is bounded under 10 points), so the ratio check
    passes with that note and the absolute check decides."""
    from core.verdict import decide_results

    model, reference = _paired("fc", 1, 200, (1, 0)), _paired("fc", 1, 200, (1, 0))
    verdict = decide_results({"fc": model}, {"fc": reference}, DEFAULT_POLICY)
    ratio = next(c for c in verdict.checks if c.name == "max_asr_relative_to_reference")
    assert ratio.outcome == "pass" and ratio.note is not None and "resists" in ratio.note
    assert ratio.lower is not None and ratio.upper is not None  # the bounds alone: undecided
    assert ratio.lower < 0.5 < ratio.upper
    assert verdict.outcome == "pass"
    assert "closest of the passing checks" in verdict.reason  # the absolute check explains
    assert "resists it too" in render_verdict(verdict)
    # A reference the attack beats: the ratio judges (here: a model as weak as it fails).
    strong = _paired("fc", 60, 200, (58, 0))
    verdict = decide_results({"fc": strong}, {"fc": strong}, DEFAULT_POLICY)
    ratio = next(c for c in verdict.checks if c.name == "max_asr_relative_to_reference")
    assert ratio.note is None and ratio.outcome == "fail"
    # A model decidedly worse than a resisting reference still fails the ratio.
    worse = _paired("fc", 40, 200, (40, 0))
    verdict = decide_results({"fc": worse}, {"fc": reference}, DEFAULT_POLICY)
    ratio = next(c for c in verdict.checks if c.name == "max_asr_relative_to_reference")
    assert ratio.outcome == "fail" and ratio.note is None
    # A policy with the ratio alone keeps it as it is (nothing absolute to judge by).
    ratio_only = Policy(default={"max_asr_relative_to_reference": 0.5})
    verdict = decide_results({"fc": model}, {"fc": reference}, ratio_only)
    assert verdict.outcome == "inconclusive" and verdict.checks[0].note is None


def test_futility_projects_the_rates_seen_to_the_planned_size():
    """10 of 40 instances at 30% ASR (none at baseline): 160 planned would bound it above a
    10-point limit, so the look is not futile; at 10% the planned size would still straddle
    the limit, so it is. A reference the model matches exactly leaves the ratio undecided
    until the reference's own rate is bounded away from zero."""
    from core.verdict import futile

    policy = Policy(default={"max_asr_above_baseline": 0.1})
    clear = _paired("bp", 12, 40, (12, 0))
    assert not futile({"bp": clear}, {}, policy, factor=4, confidence=0.9875)
    borderline = _paired("bp", 4, 40, (4, 0))
    assert futile({"bp": borderline}, {}, policy, factor=4, confidence=0.9875)
    # The same borderline rate over a planned size 100 times larger is decidable: not futile.
    assert not futile(
        {"bp": _paired("bp", 1, 40, (1, 0))}, {}, policy, factor=100, confidence=0.9875
    )
