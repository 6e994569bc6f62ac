"""Audit reports built by hand for the renderers' tests (the table, the card, the charts, the
HTML page), so that none of them needs an audit to run.

:func:`full_report` is a realistic ``bulwark-audit/3`` report: an undefended ConvNet on
Fashion-MNIST, FC and BP, four pairs (two closest, two random) of ten targets each (40
instances, four of whose targets the clean model already misclassifies), three BP instances
whose poisons never reached their target, an auto reference that the attacks beat more often,
the comparison with Newcombe intervals, a budget curve of BP (four deltas, four poison counts)
and a verdict. Every aggregate is computed from the per-instance rows, as the audit does, so
the numbers agree with each other. :func:`legacy_report` is the same audit as a /2 report
would have stored it (none of the /3 fields).
"""

from __future__ import annotations

from typing import Any, Literal

from catalog.policy import Policy, Thresholds
from core.report import (
    AttackResult,
    AuditReport,
    BaselineResult,
    BudgetCurve,
    BudgetPoint,
    Comparison,
    DatasetFacts,
    InstanceDraw,
    InstanceResult,
    MeanStd,
    ModelFacts,
    PairChoice,
    PairResult,
    Rate,
    ReferenceFacts,
    ScreenFacts,
    read_report,
)
from core.verdict import decide, difference_interval, wilson_interval

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
TARGETS_PER_PAIR = 10
PAIRS = [
    PairChoice(target_class=6, poison_class=0, source="closest", score=0.21),
    PairChoice(target_class=4, poison_class=2, source="closest", score=0.15),
    PairChoice(target_class=1, poison_class=3, source="random"),
    PairChoice(target_class=9, poison_class=7, source="random"),
]
# Instances whose target each clean model already misclassifies.
MODEL_MISCLASSIFIED = frozenset({0, 1, 12, 35})
REFERENCE_MISCLASSIFIED = frozenset({0, 12, 35})
# Successes per pair (the first k targets of the pair), by attack.
MODEL_SUCCESSES = {"fc": (3, 2, 0, 1), "bp": (6, 4, 1, 2)}
REFERENCE_SUCCESSES = {"fc": (5, 4, 1, 2), "bp": (9, 7, 3, 5)}
POISONS = {"fc": 1, "bp": 5}
REACH_LEVEL = 0.5
UNREACHED = {"bp": frozenset({21, 22, 23})}  # three targets of Trouser -> Dress
DELTA = 25.5 / 255
BUDGET_DELTAS = (4 / 255, 8 / 255, 16 / 255, DELTA)
BUDGET_POISONS = (1, 5, 10, 25)


def rate(successes: int, trials: int) -> Rate:
    return Rate(
        successes=successes,
        trials=trials,
        rate=successes / trials if trials else 0.0,
        wilson95=wilson_interval(successes, trials),
    )


def draws() -> list[InstanceDraw]:
    return [
        InstanceDraw(
            target_index=100 * pair.target_class + k,
            target_class=pair.target_class,
            poison_class=pair.poison_class,
            base_indices=[1000 * pair.poison_class + k + j for j in range(max(POISONS.values()))],
            clean_correct=p * TARGETS_PER_PAIR + k not in MODEL_MISCLASSIFIED,
        )
        for p, pair in enumerate(PAIRS)
        for k in range(TARGETS_PER_PAIR)
    ]


def attack_result(
    name: str,
    successes_per_pair: tuple[int, ...],
    misclassified: frozenset[int],
    *,
    baseline_successes: frozenset[int] = frozenset({0}),
    unreached: frozenset[int] = frozenset(),
) -> AttackResult:
    """One attack's result, every aggregate computed from its rows."""
    rows = []
    for index, draw in enumerate(draws()):
        pair = index // TARGETS_PER_PAIR
        success = index % TARGETS_PER_PAIR < successes_per_pair[pair]
        far = index in unreached
        rows.append(
            InstanceResult(
                instance=index,
                target_index=draw.target_index,
                target_class=draw.target_class,
                poison_class=draw.poison_class,
                base_indices=draw.base_indices[: POISONS[name]],
                success=success,
                predicted_class=draw.poison_class if success else draw.target_class,
                poison_class_probability=0.81 if success else 0.07,
                re_acc=0.874 + 0.001 * (index % 5),
                feature_distance=3.9 if far else 0.6 + 0.01 * index,
                relative_feature_distance=0.78 if far else 0.08 + 0.002 * index,
                linf=DELTA,
                coefficients=[1 / POISONS[name]] * POISONS[name],
                objective_start=12.0,
                objective_end=6.5 if far else 0.4,
                baseline_success=index in baseline_successes,
                baseline_poison_class_probability=0.6 if index in baseline_successes else 0.05,
                baseline_re_acc=0.876,
            )
        )
    correct = [row for row in rows if row.instance not in misclassified]
    successes = sum(row.success for row in rows)
    baseline = sum(row.baseline_success for row in rows)

    def mean_std(values: list[float]) -> MeanStd:
        mean = sum(values) / len(values)
        return MeanStd(mean=mean, std=(sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5)

    pairs = []
    for p, choice in enumerate(PAIRS):
        of_pair = rows[p * TARGETS_PER_PAIR : (p + 1) * TARGETS_PER_PAIR]
        pairs.append(
            PairResult(
                target_class=choice.target_class,
                poison_class=choice.poison_class,
                source=choice.source,
                asr=rate(sum(r.success for r in of_pair), len(of_pair)),
                baseline=rate(sum(r.baseline_success for r in of_pair), len(of_pair)),
            )
        )
    return AttackResult(
        attack=name,
        poisons_per_instance=POISONS[name],
        instances=len(rows),
        successes=successes,
        asr=successes / len(rows),
        asr_wilson95=wilson_interval(successes, len(rows)),
        baseline=BaselineResult(
            successes=baseline,
            rate=baseline / len(rows),
            wilson95=wilson_interval(baseline, len(rows)),
            re_acc=mean_std([r.baseline_re_acc for r in rows]),
        ),
        re_acc=mean_std([r.re_acc for r in rows]),
        feature_distance=mean_std([r.feature_distance for r in rows]),
        relative_feature_distance=mean_std([r.relative_feature_distance for r in rows]),
        max_linf=DELTA,
        seconds={"craft": 41.5, "retrain": 3.2},
        rows=rows,
        asr_correct_targets=rate(sum(r.success for r in correct), len(correct)),
        baseline_correct_targets=rate(sum(r.baseline_success for r in correct), len(correct)),
        pairs=pairs,
        reach_level=REACH_LEVEL,
        unreached=len(unreached),
    )


def model_facts(path: str, defense: str) -> ModelFacts:
    return ModelFacts(
        path=path,
        arch="convnet",
        feature_dim=128,
        num_classes=10,
        defense=defense,
        trained_on="fashion-mnist",
        weights_sha256="ab" * 32,
    )


def budget_curve(model_correct: int, reference_correct: int | None) -> BudgetCurve:
    """BP at four deltas (5 poisons) and four poison counts (delta 25.5/255): the model's
    and the reference's (None: no reference) successes among their correctly classified
    targets (the audit's own budget, delta 25.5/255 with 5 poisons, is the headline)."""
    by_delta = ((1, 4), (3, 9), (7, 16), (10, 22))
    by_poisons = ((4, 10), (10, 22), (15, 27), (19, 31))

    def point(delta: float, poisons: int, model: int, reference: int) -> BudgetPoint:
        return BudgetPoint(
            delta=delta,
            poisons=poisons,
            model=rate(model, model_correct),
            model_baseline=rate(0, model_correct),
            reference=None if reference_correct is None else rate(reference, reference_correct),
        )

    return BudgetCurve(
        attack="bp",
        delta_points=[
            point(delta, POISONS["bp"], m, r)
            for delta, (m, r) in zip(BUDGET_DELTAS, by_delta, strict=True)
        ],
        poisons_points=[
            point(DELTA, poisons, m, r)
            for poisons, (m, r) in zip(BUDGET_POISONS, by_poisons, strict=True)
        ],
    )


def full_report(
    *,
    path: str = "/v1/models/6f1c2f0e-convnet",
    reference: bool = True,
    budget: bool = True,
    policy: Policy | None = None,
) -> AuditReport:
    """The realistic /3 report (see the module docstring); ``reference=False`` gives the same
    audit without a reference (and a note why), ``budget=False`` without a curve."""
    attacks = {
        name: attack_result(
            name,
            MODEL_SUCCESSES[name],
            MODEL_MISCLASSIFIED,
            unreached=UNREACHED.get(name, frozenset()),
        )
        for name in ("fc", "bp")
    }
    reference_facts = None
    comparison: dict[str, Comparison] = {}
    if reference:
        reference_attacks = {
            name: attack_result(
                name,
                REFERENCE_SUCCESSES[name],
                REFERENCE_MISCLASSIFIED,
                baseline_successes=frozenset(),
            )
            for name in ("fc", "bp")
        }
        reference_facts = ReferenceFacts(
            model=model_facts("/v1/models/reference-convnet-fashion-mnist", "none"),
            source="auto",
            pre_acc=0.8712,
            head_init="pretrained",
            instances_correct=len(draws()) - len(REFERENCE_MISCLASSIFIED),
            attacks=reference_attacks,
        )
        for name, result in attacks.items():
            ours, theirs = result.headline, reference_attacks[name].headline
            comparison[name] = Comparison(
                attack=name,
                model=ours,
                reference=theirs,
                difference=ours.rate - theirs.rate,
                difference95=difference_interval(
                    (ours.successes, ours.trials), (theirs.successes, theirs.trials)
                ),
            )
    model_correct = len(draws()) - len(MODEL_MISCLASSIFIED)
    reference_correct = len(draws()) - len(REFERENCE_MISCLASSIFIED) if reference else None
    curve = budget_curve(model_correct, reference_correct)
    report = AuditReport(
        created_at="2026-11-29T12:00:00+00:00",
        model=model_facts(path, "at-pcl"),
        dataset=DatasetFacts(
            name="fashion-mnist",
            classes=CLASSES,
            split={"train": 48000, "test": 10000},
            retrain_images=4800,
            pool_images=43200,
            eval_images=10000,
        ),
        pre_acc=0.8534,
        pre_acc_source="measured",
        head_init="pretrained",
        config={
            "pairs": [],
            "pair_sets": ["closest", "random"],
            "closest_pairs": 2,
            "random_pairs": 2,
            "targets_per_pair": TARGETS_PER_PAIR,
            "iterations": 500,
            "delta": DELTA,
            "retrain_epochs": 10,
            "retrain_lr": 0.1,
            "retrain_milestones": [5, 8],
            "retrain_gamma": 0.1,
            "retrain_batch_size": 128,
            "reach_level": REACH_LEVEL,
        },
        seed=7,
        device="cuda",
        precision="float32",
        instances=draws(),
        attacks=attacks,
        screen=ScreenFacts(
            separation=1.42,
            drift=0.31,
            normalized_drift=0.12,
            images=200,
            pgd_steps=10,
            delta=DELTA,
        ),
        timings={"total": 96.0},
        versions={"bulwark": "0.3.0", "torch": "2.5.1"},
        pair_choices=list(PAIRS),
        reference=reference_facts,
        reference_note=None if reference else "the audit was asked for none",
        comparison=comparison,
        budget_curve=curve if budget else None,
    )
    policy = policy or Policy(default=Thresholds(max_asr=0.2, max_asr_relative_to_reference=0.5))
    return report.model_copy(update={"verdict": decide(report, policy)})


def legacy_report() -> AuditReport:
    """The same audit as a ``bulwark-audit/2`` report stored it: no pair choices, headline,
    pairs, reach, reference, comparison or curve; read back through :func:`read_report`."""
    body: dict[str, Any] = full_report(reference=False, budget=False).model_dump(mode="json")
    for key in ("pair_choices", "reference", "reference_note", "comparison", "budget_curve"):
        body.pop(key)
    body["verdict"] = None
    for attack in body["attacks"].values():
        for key in (
            "asr_correct_targets",
            "baseline_correct_targets",
            "pairs",
            "reach_level",
            "unreached",
        ):
            attack.pop(key)
    for draw in body["instances"]:
        draw.pop("clean_correct")
    body["config"]["pairs"] = [[p.target_class, p.poison_class] for p in PAIRS]
    version: Literal["bulwark-audit/2"] = "bulwark-audit/2"
    body["schema_version"] = version
    return read_report(body)
