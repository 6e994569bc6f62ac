"""What makes an audit's numbers comparable: the pairs and how they are chosen, the headline
over correctly classified targets, the reach, the undefended reference on the same instances,
the budget curve, and the automatic reference's pre-training run and cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from catalog.policy import Policy, Thresholds
from core.audit import (
    AuditError,
    CleanFeatures,
    choose_pairs,
    clean_stage,
    confusion,
    load_stage,
    run_audit,
)
from core.checkpoint import save_extractor
from core.config import AuditConfig, audit_config
from core.datasets import load_dataset
from core.reference import (
    NoAutoReferenceError,
    auto_reference_config,
    ensure_reference,
    reference_key,
)
from core.report import read_report
from core.verdict import decide, difference_interval


@pytest.fixture(scope="module")
def checkpoints(digits_extractor, tmp_path_factory) -> dict[str, Path]:
    """The undefended and the adversarially pre-trained digits extractors, as folders."""
    folders = {}
    for defense in ("none", "at"):
        loaded = digits_extractor(defense)
        out = tmp_path_factory.mktemp(f"ref-{defense}")
        save_extractor(out, loaded.model, loaded.manifest)
        folders[defense] = out
    return folders


def _config(model: Path, **overrides) -> AuditConfig:
    settings = {
        "model": str(model),
        "dataset": "digits",
        "attacks": ("fc", "bp"),
        "attack_settings": {"bp": {"poisons": 3}},
        "targets_per_pair": 3,
        "iterations": 8,
        "retrain_epochs": 10,
        "screen_images": 0,
        **overrides,
    }
    return audit_config(**settings)


# ---- pairs ------------------------------------------------------------------------------------


def _clean(config: AuditConfig) -> tuple[CleanFeatures, object]:
    inputs = load_stage(config)
    return clean_stage(inputs), inputs.data


def test_pairs_explicit_then_closest_then_random_without_repeats(checkpoints):
    config = _config(
        checkpoints["none"], pairs=((0, 7),), pair_sets=("closest", "random"), random_pairs=3
    )
    clean, data = _clean(config)
    choices = choose_pairs(config, data, clean)
    pairs = [(c.target_class, c.poison_class) for c in choices]
    assert [c.source for c in choices] == ["explicit", "closest", "closest", *["random"] * 3]
    assert pairs[0] == (0, 7) and len(set(pairs)) == len(pairs) == 6
    # closest: the two largest off-diagonal entries of the clean model's confusion matrix
    matrix = confusion(clean, 10)
    off_diagonal = sorted(
        ((float(matrix[t, p]), (t, p)) for t in range(10) for p in range(10) if t != p),
        key=lambda item: (-item[0], item[1]),
    )
    expected = [pair for _, pair in off_diagonal if pair != (0, 7)][:2]
    assert pairs[1:3] == expected
    assert choices[1].score == pytest.approx(float(matrix[expected[0]]), abs=1e-6)
    assert choices[1].score >= choices[2].score
    # random: a function of the seed
    again = choose_pairs(config, data, clean)
    other = choose_pairs(config.model_copy(update={"seed": 5}), data, clean)
    assert again == choices
    assert [c for c in other if c.source == "random"] != [
        c for c in choices if c.source == "random"
    ]


def test_default_pair_sets_and_the_paper_set_needs_cifar_classes(checkpoints):
    config = _config(checkpoints["none"])
    assert config.pair_sets == ("closest", "random") and config.pairs == ()
    assert _config(checkpoints["none"], pairs=((1, 2),)).pair_sets == ()
    paper = _config(checkpoints["none"], pair_sets=("paper",))
    clean, data = _clean(paper)
    with pytest.raises(AuditError, match="CIFAR-10"):
        choose_pairs(paper, data, clean)
    with pytest.raises(ValueError, match="pair_sets that add some"):
        _config(checkpoints["none"], pair_sets=("closest",), closest_pairs=0)


# ---- one audit with a reference and a budget curve ---------------------------------------------


@pytest.fixture(scope="module")
def audited(checkpoints):
    """The adversarially trained model against the undefended one, with a budget curve whose
    last delta point and first poisons point are the audit's own budget."""
    config = _config(
        checkpoints["at"],
        reference=str(checkpoints["none"]),
        budget_deltas=(8 / 255, 25.5 / 255),
        budget_poisons=(3, 1),
    )
    return config, run_audit(config)


def test_headline_counts_only_correctly_classified_targets(audited):
    _, report = audited
    correct = [draw.clean_correct for draw in report.instances]
    assert all(value is not None for value in correct)
    for result in report.attacks.values():
        rows = sorted(result.rows, key=lambda row: row.instance)
        wins = sum(row.success for row, ok in zip(rows, correct, strict=True) if ok)
        base = sum(row.baseline_success for row, ok in zip(rows, correct, strict=True) if ok)
        assert result.asr_correct_targets.successes == wins
        assert result.asr_correct_targets.trials == sum(correct)
        assert result.baseline_correct_targets.successes == base
        assert result.headline == result.asr_correct_targets


def test_per_pair_results_add_up_and_reach_is_counted(audited):
    config, report = audited
    for result in report.attacks.values():
        assert len(result.pairs) == len(report.pair_choices) == 4
        assert sum(p.asr.successes for p in result.pairs) == result.successes
        assert sum(p.asr.trials for p in result.pairs) == result.instances
        assert {p.source for p in result.pairs} == {"closest", "random"}
        far = sum(row.relative_feature_distance > config.reach_level for row in result.rows)
        assert result.unreached == far and result.reach_level == config.reach_level
        assert result.asr_is_lower_bound == (far > 0)


def test_the_reference_runs_on_the_same_instances_and_is_compared(audited):
    _, report = audited
    reference = report.reference
    assert reference is not None and reference.source == "named"
    assert reference.model.defense == "none" and report.model.defense == "at"
    for name, theirs in reference.attacks.items():
        mine = report.attacks[name]
        pairs = [
            (r.target_index, r.base_indices) for r in sorted(mine.rows, key=lambda r: r.instance)
        ]
        same = [
            (r.target_index, r.base_indices) for r in sorted(theirs.rows, key=lambda r: r.instance)
        ]
        assert pairs == same
        comparison = report.comparison[name]
        assert comparison.model == mine.headline and comparison.reference == theirs.headline
        assert comparison.difference == pytest.approx(mine.headline.rate - theirs.headline.rate)
        low, high = comparison.difference95
        assert low <= comparison.difference <= high
    # The report reads back, and the reference's timings are its own phases.
    assert read_report(report.model_dump_json()) == report
    assert "reference:craft:bp" in report.timings and "curve" in report.timings


def test_auditing_a_model_against_itself_gives_no_difference(checkpoints):
    config = _config(
        checkpoints["none"],
        attacks=("fc",),
        attack_settings={},
        reference=str(checkpoints["none"]),
        pairs=((0, 7),),
    )
    report = run_audit(config)
    comparison = report.comparison["fc"]
    assert comparison.difference == 0.0
    assert report.attacks["fc"].rows == report.reference.attacks["fc"].rows


def test_budget_curve_points_reproduce_the_audit_at_its_own_budget(audited):
    config, report = audited
    curve = report.budget_curve
    assert curve is not None and curve.attack == "bp"
    assert [p.delta for p in curve.delta_points] == list(config.budget_deltas)
    assert {p.poisons for p in curve.delta_points} == {3}
    assert [p.poisons for p in curve.poisons_points] == [3, 1]
    assert all(p.delta == config.delta for p in curve.poisons_points)
    # Crafting is deterministic: the audit's own budget gives the audit's own numbers.
    own = report.attacks["bp"]
    for point in (curve.delta_points[-1], curve.poisons_points[0]):
        assert point.model == own.headline
        assert point.reference == report.reference.attacks["bp"].headline


def test_reference_ratio_check_in_the_verdict(audited):
    _, report = audited
    policy = Policy(default=Thresholds(max_asr_relative_to_reference=0.5))
    verdict = decide(report, policy)
    assert {c.name for c in verdict.checks} == {"max_asr_relative_to_reference"}
    without = report.model_copy(update={"reference": None, "comparison": {}})
    assert decide(without, policy).checks == []


# ---- the automatic reference --------------------------------------------------------------------


def test_auto_reference_is_the_same_run_without_a_defense(checkpoints):
    manifest = json.loads((checkpoints["at"] / "manifest.json").read_text())
    config = _config(checkpoints["at"])
    pretrain = auto_reference_config(manifest, config)
    trained = manifest["config"]
    assert pretrain.defense == "none" and trained["defense"] == "at"
    assert (pretrain.arch, pretrain.epochs, pretrain.recipe, pretrain.seed) == (
        trained["arch"],
        trained["epochs"],
        trained["recipe"],
        trained["seed"],
    )
    assert pretrain.resolved_split == config.resolved_split
    key = reference_key(pretrain, "builtin:digits")
    assert key == reference_key(pretrain.model_copy(update={"device": "cpu"}), "builtin:digits")
    assert key != reference_key(pretrain, "dataset:other")
    with pytest.raises(NoAutoReferenceError, match="architecture 'exported'"):
        auto_reference_config({**manifest, "arch": "exported"}, config)
    audit_only = _config(checkpoints["at"], split={"pretrain": 0, "retrain": 10, "pool": 25})
    with pytest.raises(NoAutoReferenceError, match="no pre-training images"):
        auto_reference_config(manifest, audit_only)


def test_ensure_reference_trains_once_into_place(checkpoints, tmp_path, monkeypatch):
    manifest = json.loads((checkpoints["at"] / "manifest.json").read_text())
    pretrain = auto_reference_config(manifest, _config(checkpoints["at"]))
    pretrain = pretrain.model_copy(update={"epochs": 1, "milestones": ()})
    folder = tmp_path / "refs" / reference_key(pretrain, "builtin:digits")
    assert ensure_reference(pretrain, folder) == folder
    written = json.loads((folder / "manifest.json").read_text())
    assert written["defense"] == "none"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no scratch left

    import core.train

    def refuse(*_args, **_kwargs):
        raise AssertionError("a cached reference was trained again")

    monkeypatch.setattr(core.train, "pretrain", refuse)
    assert ensure_reference(pretrain, folder) == folder


@pytest.mark.slow  # seconds of CPU or a subprocess: out of make test-fast
def test_cli_auto_reference_is_cached_between_audits(checkpoints, tmp_path, monkeypatch, capsys):
    from bulwark.cli import main

    cache = tmp_path / "cache"
    args = [
        "audit",
        "--model",
        str(checkpoints["at"]),
        "--dataset",
        "digits",
        "--attacks",
        "fc",
        "--pairs",
        "0:7",
        "--targets-per-pair",
        "2",
        "--iterations",
        "2",
        "--retrain-epochs",
        "2",
        "--reference-cache",
        str(cache),
    ]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    first = read_report(tmp_path / "a.json")
    assert first.reference is not None and first.reference.source == "auto"
    assert first.reference.model.defense == "none"
    assert first.verdict is not None  # the default policy decides without --policy
    (entry,) = cache.iterdir()

    import core.train

    monkeypatch.setattr(core.train, "pretrain", lambda *a, **k: pytest.fail("trained twice"))
    assert main([*args, "--out", str(tmp_path / "b.json")]) == 0
    second = read_report(tmp_path / "b.json")
    assert second.attacks["fc"].rows == first.attacks["fc"].rows
    assert [p.name for p in cache.iterdir()] == [entry.name]
    assert main([*args, "--reference", "none", "--out", str(tmp_path / "c.json")]) == 0
    assert read_report(tmp_path / "c.json").reference_note == "no reference: --reference none"
    capsys.readouterr()


def test_newcombe_difference_interval_matches_the_published_example():
    # Newcombe (1998), Table II, example (a): 56/70 vs 48/80 -> 0.0524 to 0.3339.
    low, high = difference_interval((56, 70), (48, 80))
    assert low == pytest.approx(0.0524, abs=5e-4) and high == pytest.approx(0.3339, abs=5e-4)
    assert difference_interval((0, 10), (0, 10))[0] < 0 < difference_interval((0, 10), (0, 10))[1]


def test_digits_dataset_is_what_the_pairs_index(checkpoints):
    """Pairs name dataset class indices; the clean model's confusion has a row per class."""
    config = _config(checkpoints["none"])
    clean, data = _clean(config)
    matrix = confusion(clean, data.num_classes)
    assert matrix.shape == (10, 10)
    assert torch.allclose(matrix.sum(1), torch.ones(10, dtype=torch.float64), atol=1e-5)
    assert load_dataset("digits").num_classes == 10


def test_the_union_counts_an_instance_lost_to_any_attack(audited):
    _, report = audited
    union = report.union
    assert union is not None and union.attacks == ["fc", "bp"]
    correct = [draw.clean_correct for draw in report.instances]
    rows = {name: {r.instance: r for r in result.rows} for name, result in report.attacks.items()}
    lost = [any(rows[name][i].success for name in rows) for i in range(len(correct))]
    assert union.asr_all.successes == sum(lost)
    assert union.asr.successes == sum(w for w, ok in zip(lost, correct, strict=True) if ok)
    assert union.asr.successes >= max(r.headline.successes for r in report.attacks.values())
    won, base = union.discordant
    assert won - base == union.asr.successes - union.baseline.successes
    # The reference has its union, the comparison a row for it, the verdict a check of it.
    assert report.reference.union is not None and "union" in report.comparison
    verdict = decide(report, Policy(default=Thresholds(max_asr=0.9)))
    assert ("union", "max_asr") in {(c.attack, c.name) for c in verdict.checks}
