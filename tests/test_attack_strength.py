"""Attack strength on real data: the audit must not under-report what the attacks can do.

An undefended ConvNet and an adversarially pre-trained one (``at``, with the feature term) are
trained on the same Fashion-MNIST subset from the same seed, then audited on the same instances
at the default delta (25.5/255). The pairs are the visually closest class pairs of
Fashion-MNIST (shirt/T-shirt, pullover/coat, both ways), where five 28x28 poisons within
delta can reach a target's neighbourhood in feature space; on the paper's CIFAR pairs by index
(T-shirt/sneaker, ...) a small ConvNet's features barely collide (docs/results.md).

Deterministic: fixed seeds, CPU, float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog import SplitConfig
from core.audit import run_audit
from core.config import AuditConfig, pretrain_config
from core.datasets import load_dataset
from core.train import pretrain

pytestmark = pytest.mark.slow  # two pre-trainings and two audits: about 5 minutes on 2 cores

SPLIT = SplitConfig(pretrain=1000, retrain=50, pool=150)
SIMILAR_PAIRS = ((6, 0), (0, 6), (2, 4), (4, 2))  # (target, poison): shirt/T-shirt, pullover/coat


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="module")
def reports(fashion, tmp_path_factory) -> dict[str, dict]:
    """Audit reports of the undefended and the adversarially pre-trained model."""
    out = {}
    # The same split (so the same instances); AT gets one PGD step and 4 epochs to keep this
    # fast (the module took 263 s alone on the 2-core AVX512_BF16 EPYC, float32, two threads).
    for defense, epochs in (("none", 6), ("at", 4)):
        config = pretrain_config(
            dataset="fashion-mnist",
            defense=defense,
            recipe="paper",
            epochs=epochs,
            arch="convnet",
            split=SPLIT,
            seed=0,
            pgd_steps=1,
            precision="float32",
        )
        model_dir = Path(tmp_path_factory.mktemp(f"fashion-{defense}"))
        pretrain(config, out_dir=model_dir, dataset=fashion)
        audit = AuditConfig(
            model=str(model_dir),
            dataset="fashion-mnist",
            split=SPLIT,
            pairs=SIMILAR_PAIRS,
            attacks=("fc", "cp", "bp", "gm"),
            targets_per_pair=5,
            iterations=200,
            screen_images=200,
            seed=0,
            precision="float32",
        )
        out[defense] = run_audit(audit, dataset=fashion).model_dump()
    return out


def test_polytope_attacks_beat_the_baseline_on_an_undefended_model(reports):
    for name in ("cp", "bp"):
        result = reports["none"]["attacks"][name]
        baseline = round(result["baseline"]["rate"] * result["instances"])
        assert result["successes"] >= baseline + 4, (name, result["successes"], baseline)


def test_feature_collision_pulls_the_poison_towards_its_target(reports):
    """FC (one poison) rarely flips a target of this small ConvNet within delta, but every
    poison must end far closer to its target in feature space than its base started."""
    result = reports["none"]["attacks"]["fc"]
    assert result["successes"] >= round(result["baseline"]["rate"] * result["instances"])
    ratios = sorted(row["objective_end"] / row["objective_start"] for row in result["rows"])
    assert ratios[-1] < 1.0 and ratios[len(ratios) // 2] < 0.5, ratios


def test_adversarial_pretraining_lowers_bullseye_asr_on_the_same_instances(reports):
    none, at = reports["none"], reports["at"]

    def draws(report: dict) -> list[tuple]:
        return [(d["target_index"], d["base_indices"]) for d in report["instances"]]

    assert draws(none) == draws(at)  # same targets and bases
    assert at["attacks"]["bp"]["successes"] < none["attacks"]["bp"]["successes"]
    # And the Eq. 4b screen sees why: less adversarial feature drift after AT.
    assert at["screen"]["normalized_drift"] < none["screen"]["normalized_drift"]


def test_the_union_is_the_worst_case_and_clearly_above_the_baseline(reports):
    """Issue 12's strength test: over the closest pairs of an undefended model, an instance
    lost to any attack counts; the union is at least the best single attack and clearly
    above the baseline (no attack at all). Counted over every instance: on these pairs the
    clean model already misclassifies many targets (shirt and T-shirt), which the headline
    leaves out, so too few remain in it for a margin."""
    none = reports["none"]
    union = none["union"]
    attacks = none["attacks"].values()
    assert union["asr"]["successes"] >= max(r["asr_correct_targets"]["successes"] for r in attacks)
    assert union["asr_all"]["successes"] >= max(r["successes"] for r in attacks)
    baseline = max(r["baseline"]["successes"] for r in attacks)
    assert union["asr_all"]["successes"] >= baseline + 4, (union["asr_all"], baseline)


def test_gradient_matching_is_no_weaker_than_no_attack(reports):
    """GM (two restarts of 200 steps) on the head the victim starts from: at least the
    baseline's successes on the undefended model."""
    result = reports["none"]["attacks"]["gm"]
    assert result["successes"] >= result["baseline"]["successes"], result["successes"]
