"""Issue 10's headline on real data: a verdict that tells an undefended model from a hardened one.

An undefended ConvNet and an ``at-pcl`` one are pre-trained on Fashion-MNIST with the same
recipe, split and seed, then each is audited once the way the service audits by default: BP
on the three class pairs the model itself confuses most plus one random pair, the undefended
reference audited on the same instances, and a budget curve. Under Bulwark's default policy
(``catalog.policy.DEFAULT_POLICY``: the poisons may add at most 10 points of ASR over the clean
baseline, and the model must at least halve its reference's ASR) the undefended model fails
because BP really poisons it, and the hardened one does not fail.

The sizes were chosen on the 2-core development machine. Measured there alone (an AVX512_BF16
AMD EPYC, two threads): 235 s in bfloat16 (pre-training none 31 s, its twin 30 s, at-pcl 86 s;
each audit 44 s) and 401 s in float32, which `precision=auto` picks on CPUs without native
bfloat16 (none 53 s, at-pcl 146 s, each audit 75 s). The at-pcl model's adversarial
training takes one PGD step: with three it took 278 s of the float32 run's 557 s, and its
audit came out the same (inconclusive; BP 3 of 23 correctly classified targets with one step,
3 of 21 with three, against the reference's 13 of 26 and 15 of 29).

- Pre-training on 1000 images per class (6 epochs, the paper's recipe scaled): with 500 (and
  4 epochs) the undefended model was markedly less vulnerable (BP 7 of 28 correctly
  classified targets against 16 of 27), so the audit would not show what the paper shows.
- BP only, 5 poisons, 150 iterations: on the undefended model BP's successes are the same at
  150, 300 and 800 iterations, so more iterations buy nothing here. FC (one poison) barely
  moves this small ConvNet (tests/test_attack_strength.py) and CP costs what BP does.
- 30 clean re-training images per class (the victim's fine-tuning set) and the paper's head
  re-training (100 epochs); 10 targets on each of 4 pairs = 40 instances, of which the clean
  model classifies about 27 correctly (the headline counts only those).
- The budget curve: BP at delta 8/255 and with one poison, on the model and the reference (the
  audit's own budget, 25.5/255 with 5 poisons, is the audit itself).

Deterministic on one machine (fixed seeds, CPU); ``precision`` is the product's ``auto``.
``BULWARK_VERDICT_SEED`` runs it from another seed (the assertions were checked on seeds 0 and
1 with three PGD steps, on seed 0 with one). The reports are printed, so a failing run shows
its numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catalog import DATASETS, SplitConfig
from catalog.policy import DEFAULT_POLICY
from core.audit import run_audit
from core.config import audit_config, pretrain_config
from core.data import ImageDataset
from core.datasets import load_dataset
from core.report import AuditReport, render_asr_table
from core.train import pretrain
from core.verdict import Verdict, decide, render_verdict

pytestmark = pytest.mark.slow

FASHION_DIR = Path(str(DATASETS.get("fashion-mnist").default_dir))
if not any(
    (FASHION_DIR / name).is_file()
    for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")
):
    pytest.skip(
        f"Fashion-MNIST is not installed at {FASHION_DIR} (apt dataset-fashion-mnist)",
        allow_module_level=True,
    )

SEED = int(os.environ.get("BULWARK_VERDICT_SEED", "0"))
SPLIT = SplitConfig(pretrain=1000, retrain=30, pool=30)
EPOCHS = 6
CLOSEST_PAIRS, RANDOM_PAIRS, TARGETS_PER_PAIR = 3, 1, 10
CURVE_DELTAS, CURVE_POISONS = (8 / 255,), (1,)


@pytest.fixture(scope="module")
def fashion() -> ImageDataset:
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="module")
def models(fashion: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoint folders: ``none`` and ``at-pcl`` from SEED, and ``none-twin``, a second
    undefended model from another seed.

    The twin is the undefended model's reference. Auditing a model against itself would make
    the comparison empty by construction (the same instances, the same crafting: identical
    rows, tests/test_audit_reference.py); an independently trained undefended model of the
    same recipe is what the automatic reference is, and shows how much two undefended models
    differ on the same instances.
    """
    folders = {}
    for name, defense, seed in (
        ("none", "none", SEED),
        ("none-twin", "none", SEED + 1),
        ("at-pcl", "at-pcl", SEED),
    ):
        config = pretrain_config(
            dataset="fashion-mnist",
            defense=defense,
            recipe="paper",
            epochs=EPOCHS,
            arch="convnet",
            split=SPLIT,
            seed=seed,
            pgd_steps=1,  # AT's PGD (at-pcl only): one step halves its pre-training
        )
        folder = Path(tmp_path_factory.mktemp(f"fashion-{name}"))
        trained = pretrain(config, out_dir=folder, dataset=fashion)
        print(f"\npre-trained {name}: Pre. Acc {trained.pre_acc:.4f} in {trained.seconds:.0f} s")
        folders[name] = folder
    return folders


def audit(model: Path, reference: Path, fashion: ImageDataset) -> AuditReport:
    config = audit_config(
        model=str(model),
        dataset="fashion-mnist",
        split=SPLIT,
        attacks=("bp",),
        pair_sets=("closest", "random"),
        closest_pairs=CLOSEST_PAIRS,
        random_pairs=RANDOM_PAIRS,
        targets_per_pair=TARGETS_PER_PAIR,
        iterations=150,
        reference=str(reference),
        budget_deltas=CURVE_DELTAS,
        budget_poisons=CURVE_POISONS,
        eval_images=2000,  # Pre./Re. Acc and the closest pairs' confusion on 2000 test images
        screen_images=0,
        seed=SEED,
    )
    return run_audit(config, dataset=fashion)


@pytest.fixture(scope="module")
def audited(
    models: dict[str, Path], fashion: ImageDataset
) -> dict[str, tuple[AuditReport, Verdict]]:
    """Each model audited once against an undefended reference, and its default verdict."""
    out = {}
    for name, reference in (("none", "none-twin"), ("at-pcl", "none")):
        report = audit(models[name], models[reference], fashion)
        verdict = decide(report, DEFAULT_POLICY)
        print(f"\n== {name} (seed {SEED}), audited in {report.timings['total']:.0f} s ==")
        print(f"{render_asr_table(report)}\n{render_verdict(verdict)}")
        out[name] = (report, verdict)
    return out


@pytest.mark.parametrize("name", ["none", "at-pcl"])
def test_each_report_has_the_reference_the_pairs_and_the_budget_curve(
    audited: dict[str, tuple[AuditReport, Verdict]], name: str
) -> None:
    report, _ = audited[name]
    result = report.attacks["bp"]
    # The undefended reference, audited on the very same instances, and compared.
    reference = report.reference
    assert reference is not None and reference.source == "named"
    assert reference.model.defense == "none" and report.model.defense == name
    theirs = reference.attacks["bp"]
    assert [(r.target_index, r.base_indices) for r in theirs.rows] == [
        (r.target_index, r.base_indices) for r in result.rows
    ]
    comparison = report.comparison["bp"]
    assert (comparison.model, comparison.reference) == (result.headline, theirs.headline)
    # ASR per pair over the model's closest pairs and a random one.
    sources = [choice.source for choice in report.pair_choices]
    assert sources == ["closest"] * CLOSEST_PAIRS + ["random"] * RANDOM_PAIRS
    assert [(p.target_class, p.poison_class, p.source) for p in result.pairs] == [
        (c.target_class, c.poison_class, c.source) for c in report.pair_choices
    ]
    assert all(p.asr.trials == TARGETS_PER_PAIR for p in result.pairs)
    assert sum(p.asr.successes for p in result.pairs) == result.successes
    # The budget curve, on the model and on the reference.
    curve = report.budget_curve
    assert curve is not None and curve.attack == "bp"
    assert [p.delta for p in curve.delta_points] == list(CURVE_DELTAS)
    assert [p.poisons for p in curve.poisons_points] == list(CURVE_POISONS)
    for point in [*curve.delta_points, *curve.poisons_points]:
        assert point.reference is not None
        assert point.model.trials == result.headline.trials
        assert point.reference.trials == theirs.headline.trials


def test_the_undefended_model_fails_because_the_poisons_work(
    audited: dict[str, tuple[AuditReport, Verdict]],
) -> None:
    report, verdict = audited["none"]
    assert verdict.outcome == "fail", verdict.reason
    # The failing check is the poisons' own effect, not only the comparison with the twin: at
    # 95% BP adds more than 10 points of ASR over the clean baseline (lower bounds 24.9 points
    # from seed 0, 15.4 from seed 1; the twin's ratio check failed only on seed 0).
    (above,) = [c for c in verdict.checks if c.name == "max_asr_above_baseline"]
    assert above.outcome == "fail", above
    # And a smaller budget poisons less: the curve's points lie below the audit's own ASR.
    own = report.attacks["bp"].headline
    curve = report.budget_curve
    assert curve is not None
    for point in [*curve.delta_points, *curve.poisons_points]:
        assert point.model.successes < own.successes, point


def test_the_hardened_model_does_better_than_its_undefended_reference(
    audited: dict[str, tuple[AuditReport, Verdict]],
) -> None:
    none_report, _ = audited["none"]
    report, verdict = audited["at-pcl"]
    assert verdict.outcome in ("pass", "inconclusive"), verdict.reason
    # On the same instances the undefended reference is poisoned far more often (seeds 0 and
    # 1: -35.9 and -35.2 points).
    comparison = report.comparison["bp"]
    assert comparison.difference < -0.2, comparison
    # And its headline ASR is clearly below the undefended model's own audit (seed 0: 22.7%
    # against 59.3%, seed 1: 13.0% against 41.9%).
    assert report.attacks["bp"].headline.rate < none_report.attacks["bp"].headline.rate - 0.1
