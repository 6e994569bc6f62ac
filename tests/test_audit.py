"""The audit protocol: batched head re-training, baselines, the report and the CLI.

Mechanics run on a ConvNet pre-trained on sklearn's digits; attack strength (each attack beats
the baseline on an undefended model, and adversarial pre-training lowers BP's ASR) runs on a
Fashion-MNIST subset, the largest real image set these machines have.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from catalog import DATASETS
from core.audit import (
    AuditError,
    HeadSchedule,
    choose_instances,
    fresh_head,
    retrain_heads,
    run_audit,
)
from core.checkpoint import save_extractor
from core.config import AuditConfig
from core.data import split_dataset
from core.datasets import load_dataset
from core.pictures import MIN_TILE
from core.report import SCHEMA_VERSION, AuditReport, read_report
from core.verdict import wilson_interval


@pytest.fixture(scope="module")
def digits_checkpoint(digits_extractor, tmp_path_factory) -> Path:
    """The shared digits extractor as a checkpoint folder, which is what run_audit reads."""
    loaded = digits_extractor("none")
    out = tmp_path_factory.mktemp("digits-checkpoint")
    save_extractor(out, loaded.model, loaded.manifest)
    return out


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _digits_config(model: Path, **overrides) -> AuditConfig:
    settings = {
        "model": str(model),
        "dataset": "digits",
        "pairs": ((0, 7), (2, 1), (4, 1)),
        "targets_per_pair": 2,
        "iterations": 10,
        "retrain_epochs": 10,
        "retrain_milestones": (6, 8),
        **overrides,
    }
    # Three poisons for the polytope attacks keeps the test fast.
    chosen = settings.get("attacks", ("fc", "cp", "bp"))
    settings.setdefault("attack_settings", {a: {"poisons": 3} for a in ("cp", "bp") if a in chosen})
    return AuditConfig(**settings)


# ---- batched re-training ---------------------------------------------------------------------


def _one_head_alone(clean_x, clean_y, extra_x, extra_y, weight, bias, schedule, seed):
    """The plain reference: one nn.Linear, torch.optim.Adam, the same batches."""
    head = torch.nn.Linear(clean_x.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=schedule.lr)
    x, y = torch.cat([clean_x, extra_x]), torch.cat([clean_y, extra_y])
    generator = torch.Generator().manual_seed(seed)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(schedule.milestones), gamma=schedule.gamma
    )
    for _ in range(schedule.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), schedule.batch_size):
            batch = order[start : start + schedule.batch_size]
            loss = torch.nn.functional.cross_entropy(head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return head.weight.detach(), head.bias.detach()


def test_batched_retraining_equals_a_per_instance_loop():
    generator = torch.Generator().manual_seed(0)
    n, dim, classes, heads, k = 70, 16, 4, 5, 3
    clean_x = torch.randn(n, dim, generator=generator)
    clean_y = torch.randint(0, classes, (n,), generator=generator)
    extra_x = torch.randn(heads, k, dim, generator=generator) + 1.0
    extra_y = torch.randint(0, classes, (heads, 1), generator=generator).expand(-1, k)
    weight, bias = fresh_head(classes, dim, seed=3, device=torch.device("cpu"))
    schedule = HeadSchedule(epochs=12, lr=0.1, milestones=(6, 9), batch_size=16)

    weights, biases = retrain_heads(
        clean_x,
        clean_y,
        extra_x,
        extra_y,
        init_weight=weight,
        init_bias=bias,
        schedule=schedule,
        seed=7,
    )

    assert weights.shape == (heads, classes, dim) and biases.shape == (heads, classes)
    for h in range(heads):
        w, b = _one_head_alone(
            clean_x, clean_y, extra_x[h], extra_y[h], weight, bias, schedule, seed=7
        )
        torch.testing.assert_close(weights[h], w, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(biases[h], b, atol=1e-4, rtol=1e-4)
    # The heads did learn: each fits its own extra images.
    logits = torch.einsum("hkd,hcd->hkc", extra_x, weights) + biases[:, None]
    assert float((logits.argmax(-1) == extra_y).float().mean()) > 0.9


def test_wilson_interval():
    low, high = wilson_interval(0, 40)
    assert low == 0.0 and high == pytest.approx(0.0876, abs=1e-4)
    low, high = wilson_interval(20, 40)
    assert low == pytest.approx(0.3520, abs=1e-4) and high == pytest.approx(0.6480, abs=1e-4)
    assert wilson_interval(40, 40)[1] == 1.0


# ---- protocol ----------------------------------------------------------------------------------


def test_instances_are_drawn_from_the_seed_and_the_right_sets(digits):
    split = split_dataset(digits.train_y, DATASETS.get("digits").default_split)
    pairs = ((0, 7), (2, 1))
    first = choose_instances(digits, split.pool, pairs, 3, 5, seed=1)
    assert first == choose_instances(digits, split.pool, pairs, 3, 5, seed=1)
    assert first != choose_instances(digits, split.pool, pairs, 3, 5, seed=2)
    pool = set(split.pool.tolist())
    for instance in first:
        assert int(digits.test_y[instance.target_index]) == instance.target_class
        assert len(set(instance.base_indices)) == 5 and set(instance.base_indices) <= pool
        assert all(int(digits.train_y[i]) == instance.poison_class for i in instance.base_indices)
    assert len({inst.target_index for inst in first}) == 6
    with pytest.raises(AuditError, match="pool"):
        choose_instances(digits, split.pool, pairs, 3, 1000, seed=1)


def test_zero_budget_gives_the_baseline(digits_checkpoint, digits):
    report = run_audit(_digits_config(digits_checkpoint, delta=0.0), dataset=digits).model_dump()
    for name in ("fc", "cp", "bp"):
        result = report["attacks"][name]
        assert result["asr"] == result["baseline"]["rate"]
        for row in result["rows"]:
            assert row["success"] == row["baseline_success"]
            assert row["linf"] == 0.0
            assert row["poison_class_probability"] == pytest.approx(
                row["baseline_poison_class_probability"], abs=1e-5
            )
    # No budget, no drift: the Eq. 4b screen measures nothing (1e-6 is the distance's floor,
    # which keeps its gradient finite at zero).
    assert report["screen"]["drift"] <= 1.01e-6 and report["screen"]["separation"] > 1.0


def test_report_has_what_the_issue_lists(digits_checkpoint, digits, tmp_path):
    seen = []
    config = _digits_config(digits_checkpoint, attacks=("fc", "bp"))
    typed = run_audit(config, progress=seen.append, poisons_dir=tmp_path, dataset=digits)
    assert isinstance(typed, AuditReport)
    # The JSON round trip gives the same typed report back.
    assert read_report(typed.model_dump_json()) == typed
    report = typed.model_dump(mode="json")
    json.dumps(report)  # JSON-able as is

    assert report["schema_version"] == SCHEMA_VERSION
    assert report["config"] == config.model_dump(mode="json") and report["seed"] == 0
    assert report["head_init"] == "pretrained" and 0.5 < report["pre_acc"] <= 1.0
    assert set(report["versions"]) >= {"torch", "numpy", "python"}
    assert {"load", "features", "screen", "craft:fc", "retrain:fc", "craft:bp", "total"} <= set(
        report["timings"]
    )
    # The Eq. 4a/4b screen of every audit: positive, finite, at the audit's delta.
    screen = report["screen"]
    assert screen["delta"] == config.delta and screen["images"] == min(500, len(digits.test_y))
    assert screen["separation"] > 1.0 and 0.0 < screen["normalized_drift"] < 10.0
    assert (
        run_audit(
            _digits_config(digits_checkpoint, attacks=("fc",), iterations=1, screen_images=0),
            dataset=digits,
        ).screen
        is None
    )
    assert len(report["instances"]) == 6
    for name, k in (("fc", 1), ("bp", 3)):
        result = report["attacks"][name]
        assert result["instances"] == 6 and len(result["rows"]) == 6
        # The grid: base | poison per poison, then the target, each tile at least 96 px, a
        # header row and a label left of each instance's row.
        grid = Image.open(tmp_path / f"{name}.png")
        assert grid.width > (2 * k + 1) * MIN_TILE and grid.height > 6 * MIN_TILE
        assert result["asr"] == result["successes"] / 6
        low, high = result["asr_wilson95"]
        assert low <= result["asr"] <= high
        assert 0.0 <= result["baseline"]["rate"] <= 1.0 and "wilson95" in result["baseline"]
        assert set(result["re_acc"]) == {"mean", "std"} and 0.5 < result["re_acc"]["mean"] <= 1
        assert result["max_linf"] <= config.delta + 1e-6
        for row, instance in zip(result["rows"], report["instances"], strict=True):
            assert row["target_index"] == instance["target_index"]
            assert row["base_indices"] == instance["base_indices"][:k]
            assert 0.0 <= row["poison_class_probability"] <= 1.0
            assert row["feature_distance"] >= 0 and row["linf"] <= config.delta + 1e-6
            assert row["objective_end"] < row["objective_start"]
        saved = dict(__import__("numpy").load(tmp_path / f"{name}.npz"))
        assert saved["poisons"].shape == (6, k, 1, 8, 8)
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    # Progress: phases in order, fractions never going back, ending at 1.
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert seen[0].phase == "load"
    # Progress reaches tenants through the job's message: no server path in it.
    assert not any(str(digits_checkpoint) in p.message for p in seen)


def test_bad_audits_are_refused_with_the_field_named(digits_checkpoint, digits):
    with pytest.raises(AuditError, match="pairs"):
        run_audit(_digits_config(digits_checkpoint, pairs=((0, 12),)), dataset=digits)
    with pytest.raises(AuditError, match="channel"):
        run_audit(
            _digits_config(digits_checkpoint),
            dataset=load_dataset("fashion-mnist").__class__(
                "rgb",
                digits.train_x.expand(-1, 3, -1, -1),
                digits.train_y,
                digits.test_x.expand(-1, 3, -1, -1),
                digits.test_y,
                digits.classes,
                False,
            ),
        )
    for field, value in (
        ("pairs", ((1, 1),)),
        ("attacks", ("fc", "xx")),
        ("delta", 1.5),
        ("iterations", 0),
        ("retrain_milestones", (80, 60)),
        ("unknown_field", 1),
    ):
        with pytest.raises(ValidationError, match=field):
            _digits_config(digits_checkpoint, **{field: value})


@pytest.mark.slow  # a CLI subprocess or a whole audit: out of make test-fast
def test_cli_writes_the_report_and_poisons(digits_checkpoint, tmp_path, capsys):
    from bulwark.cli import main

    out = tmp_path / "report.json"
    code = main(
        [
            "audit",
            "--model",
            str(digits_checkpoint),
            "--dataset",
            "digits",
            "--attacks",
            "bp",
            "--pairs",
            "0:7,2:1",
            "--targets-per-pair",
            "2",
            "--iterations",
            "5",
            "--retrain-epochs",
            "5",
            "--out",
            str(out),
            "--save-poisons",
            str(tmp_path / "poisons"),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["config"]["pairs"] == [[0, 7], [2, 1]]
    assert report["config"]["retrain_milestones"] == [3, 4]
    assert (tmp_path / "poisons" / "bp.npz").is_file()
    printed = capsys.readouterr().out
    assert "BP" in printed and "ASR" in printed and "report written" in printed

    assert (
        main(
            [
                "audit",
                "--model",
                str(digits_checkpoint),
                "--dataset",
                "digits",
                "--pairs",
                "0:0",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "pairs" in capsys.readouterr().err


@pytest.mark.slow  # a CLI subprocess or a whole audit: out of make test-fast
def test_cli_policy_verdicts_and_exit_codes(digits_checkpoint, tmp_path, capsys, monkeypatch):
    """--policy: 0 pass, 1 fail, 3 inconclusive, 2 a bad policy (before any audit work)."""
    from bulwark.cli import main

    def audit(policy: dict | str, *extra: str, model: Path = digits_checkpoint) -> int:
        path = tmp_path / "policy.json"
        path.write_text(policy if isinstance(policy, str) else json.dumps(policy))
        # Two instances of FC: every bound is wide.
        return main(
            [
                "audit",
                "--model",
                str(model),
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
                "--out",
                str(out),
                "--policy",
                str(path),
                *extra,
            ]
        )

    out = tmp_path / "report.json"
    # A threshold every result meets: pass, and --json prints the report alone on stdout.
    assert audit({"default": {"max_asr": 1.0}}, "--json") == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    written = json.loads(out.read_text())
    assert printed == written and written["verdict"]["outcome"] == "pass"
    assert written["verdict"]["checks"][0]["attack"] == "fc"
    assert "verdict: PASS" in captured.err and "report written" in captured.err

    # 0/2 has a one-sided 95% upper bound of 57.5% and 2/2 a lower bound of 42.5%: at 50%
    # no two-instance result decides.
    assert audit({"default": {"max_asr": 0.5}}) == 3
    printed = capsys.readouterr().out
    assert "verdict: INCONCLUSIVE" in printed and "max_asr" in printed and "ASR" in printed
    assert json.loads(out.read_text())["verdict"]["outcome"] == "inconclusive"

    # Every instance a success (the audit's own result, rewritten): any success fails 0%.
    import core.audit
    from core.report import Rate

    real = core.audit.run_audit

    def all_succeed(*args, **kwargs):
        report = real(*args, **kwargs)
        fc = report.attacks["fc"]
        trials = fc.headline.trials
        every = Rate(successes=trials, trials=trials, rate=1.0, wilson95=(0.5, 1.0))
        fc = fc.model_copy(
            update={"successes": fc.instances, "asr": 1.0, "asr_correct_targets": every}
        )
        return report.model_copy(update={"attacks": {"fc": fc}})

    monkeypatch.setattr(core.audit, "run_audit", all_succeed)
    assert audit({"default": {"max_asr": 0.0}}) == 1
    assert "verdict: FAIL" in capsys.readouterr().out
    assert json.loads(out.read_text())["verdict"]["reason"].startswith("FC fails max_asr")
    monkeypatch.undo()

    # Bad policies: exit 2 before the audit (the model does not even exist), no report.
    out.unlink()
    missing = tmp_path / "nowhere"
    assert audit('{"default": {"max_asr": 0.2}', model=missing) == 2
    assert "--policy" in capsys.readouterr().err
    invalid = {"confidence": 1.5, "default": {"max_asr": -1}, "attacks": {"xx": {}}}
    assert audit(invalid, model=missing) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(e.startswith("bulwark audit: --policy") for e in errors)
    for field in ("confidence", "default.max_asr", "attacks.xx"):
        assert any(f"policy.json: {field}: " in e for e in errors), (field, errors)
    absent = tmp_path / "absent.json"
    assert (
        main(
            [
                "audit",
                "--model",
                str(missing),
                "--dataset",
                "digits",
                "--out",
                str(out),
                "--policy",
                str(absent),
            ]
        )
        == 2
    )
    assert "cannot read" in capsys.readouterr().err
    assert not out.exists()


def test_the_same_seed_gives_the_same_report(digits_checkpoint, digits):
    config = _digits_config(digits_checkpoint, attacks=("fc", "bp"), screen_images=50)
    first, second = (run_audit(config, dataset=digits).model_dump() for _ in range(2))
    for report in (first, second):
        del report["created_at"], report["timings"]
        for result in report["attacks"].values():
            del result["seconds"]
    assert first == second


def test_a_schema_1_report_is_still_readable(digits_checkpoint, digits):
    body = run_audit(
        _digits_config(digits_checkpoint, attacks=("fc",), iterations=2, screen_images=0),
        dataset=digits,
    ).model_dump(mode="json")
    # A /1 report kept the attack settings flat in its config.
    config = {k: v for k, v in body["config"].items() if k != "attack_settings"}
    old = {**body, "schema_version": "bulwark-audit/1", "config": {**config, "fc_mu": 0.1}}
    old.pop("stored_artifacts")
    report = read_report(old)
    assert report.schema_version == "bulwark-audit/1" and report.config["fc_mu"] == 0.1


def test_a_toy_attack_added_through_the_registry_runs_in_an_audit(digits_checkpoint, digits):
    """Adding an attack is a catalog entry and a registered class: nothing else changes."""
    from dataclasses import dataclass
    from typing import ClassVar

    from catalog import ATTACKS, AttackSettings, AttackSpec
    from core.attacks import IMPLEMENTATIONS, Attack, Crafted, budget_box, register_attack

    class ToySettings(AttackSettings):
        poisons: int = 2

    ATTACKS.register(AttackSpec("toy", "Toy", "a test", ToySettings))
    try:

        @register_attack
        @dataclass(frozen=True)
        class Toy(Attack):
            """Moves every pixel by +delta (clipped): uses the context's labels to check them."""

            name: ClassVar[str] = "toy"

            def craft(self, model, context, target_features, bases, callback, active):
                context.require("poison_classes", "head_weight", "clean_features")
                lower, upper = budget_box(bases, self.delta)
                poisons = torch.clamp(bases + self.delta, lower, upper)
                objective = [torch.zeros(len(bases))] * (self.iterations + 1)
                coefficients = torch.full(bases.shape[:2], 1 / bases.shape[1])
                return Crafted(poisons, coefficients, objective, per_poison_distance=False)

        config = _digits_config(digits_checkpoint, attacks=("toy", "fc"), screen_images=0)
        report = run_audit(config, dataset=digits)
        toy = report.attacks["toy"]
        assert toy.poisons_per_instance == 2 and toy.instances == 6
        assert toy.max_linf == pytest.approx(config.delta, abs=1e-6)
        assert report.config["attack_settings"]["toy"] == {"poisons": 2}
    finally:
        ATTACKS.unregister("toy")
        IMPLEMENTATIONS.pop("toy", None)
