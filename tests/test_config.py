"""core.config: the paper's recipes, scaling, overrides and validation messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from catalog import DEFENSES, RECIPES, Schedule, SplitConfig, default_recipe
from core.config import PretrainConfig, pretrain_config


def schedule(recipe: str, defense: str) -> Schedule:
    return RECIPES.get(recipe).for_defense(defense)


# ---- recipes (Appendix A and B of the paper) ------------------------------------------------


def test_paper_recipes_match_appendix_a() -> None:
    none, at = schedule("paper", "none"), schedule("paper", "at")
    assert (none.epochs, none.milestones) == (120, (80, 100))
    assert (at.epochs, at.milestones) == (200, (90, 120, 150))
    for defense in ("pcl", "at-pcl"):
        recipe = schedule("paper", defense)
        assert recipe.epochs == 220
        assert recipe.milestones == (80, 120, 160, 200)
        assert recipe.warmup_epochs == 100
        assert recipe.alpha == 0.3
    assert none.warmup_epochs == 0 and at.warmup_epochs == 0


def test_tiny_imagenet_recipe_matches_appendix_b() -> None:
    for defense in ("none", "at"):
        tiny = schedule("paper-tiny-imagenet", defense)
        assert (tiny.epochs, tiny.milestones) == (200, (90, 120, 150))
    for defense in ("pcl", "at-pcl"):
        tiny = schedule("paper-tiny-imagenet", defense)
        assert tiny.alpha == 0.5 and tiny.epochs == 220 and tiny.warmup_epochs == 100
    assert default_recipe("tiny-imagenet") == "paper-tiny-imagenet"
    assert default_recipe("cifar10") == "paper" and default_recipe("digits") == "paper"


def test_every_recipe_covers_every_defense_with_a_valid_schedule() -> None:
    for name in RECIPES:
        for defense in DEFENSES:
            config = pretrain_config(dataset="digits", defense=defense, recipe=name)
            assert config.recipe == name


def test_pretrain_config_takes_the_recipe_schedule() -> None:
    config = pretrain_config(dataset="cifar10", defense="at-pcl")
    assert config.recipe == "paper"
    assert config.epochs == 220 and config.milestones == (80, 120, 160, 200)
    assert config.warmup_epochs == 100 and config.alpha == 0.3
    assert config.uses_at and config.uses_pcl
    tiny = pretrain_config(dataset="tiny-imagenet", defense="pcl")
    assert tiny.recipe == "paper-tiny-imagenet" and tiny.alpha == 0.5


def test_paper_defaults_of_the_config() -> None:
    config = PretrainConfig(dataset="cifar10")
    assert config.batch_size == 128 and config.lr == 0.1 and config.lr_gamma == 0.1
    assert config.momentum == 0.9 and config.epsilon == pytest.approx(4 / 255)
    assert config.pgd_steps == 10 and config.random_start and config.feature_term
    # The product's default defense is the paper's strongest: AT joint with PC-Loss.
    assert config.defense == "at-pcl" and config.uses_at and config.uses_pcl


# ---- scaling --------------------------------------------------------------------------------


@pytest.mark.parametrize("epochs", [11, 22, 44, 110, 440])
def test_scaled_recipe_keeps_milestones_and_warmup_in_proportion(epochs: int) -> None:
    recipe = schedule("paper", "pcl")
    scaled = recipe.scaled(epochs)
    assert scaled.epochs == epochs
    assert len(scaled.milestones) == len(recipe.milestones)
    for new, old in zip(scaled.milestones, recipe.milestones, strict=True):
        assert abs(new / epochs - old / recipe.epochs) <= 0.5 / epochs + 1e-9
    assert abs(scaled.warmup_epochs / epochs - 100 / 220) <= 0.5 / epochs + 1e-9
    assert scaled.alpha == recipe.alpha
    assert recipe.epochs == 220  # the preset itself is unchanged


def test_scaled_recipe_examples() -> None:
    assert schedule("paper", "none").scaled(12).milestones == (8, 10)
    assert schedule("paper", "at").scaled(20).milestones == (9, 12, 15)
    pcl = schedule("paper", "pcl").scaled(22)
    assert (pcl.milestones, pcl.warmup_epochs) == ((8, 12, 16, 20), 10)


def test_scaled_to_very_few_epochs_stays_valid() -> None:
    for epochs in (1, 2, 3):
        scaled = schedule("paper", "pcl").scaled(epochs)
        assert all(1 <= m < epochs for m in scaled.milestones)
        assert list(scaled.milestones) == sorted(set(scaled.milestones))
        assert 0 <= scaled.warmup_epochs < epochs
        config = pretrain_config(dataset="digits", defense="pcl", epochs=epochs)
        assert config.epochs == epochs


def test_pretrain_config_scales_the_recipe_to_epochs() -> None:
    config = pretrain_config(dataset="digits", defense="none", epochs=12)
    assert config.epochs == 12 and config.milestones == (8, 10)


# ---- overrides ------------------------------------------------------------------------------


def test_overrides_win_over_the_recipe_and_none_means_keep() -> None:
    config = pretrain_config(
        dataset="digits",
        defense="at-pcl",
        recipe="quick",
        epochs=20,
        milestones=(5, 15),
        warmup_epochs=3,
        alpha=0.6,
        epsilon=8 / 255,
        pgd_steps=4,
        lr=0.05,
        feature_term=False,
        batch_size=None,  # None: the default stays
    )
    assert config.milestones == (5, 15) and config.warmup_epochs == 3
    assert config.alpha == 0.6 and config.epsilon == pytest.approx(8 / 255)
    assert config.pgd_steps == 4 and config.lr == 0.05 and config.feature_term is False
    assert config.batch_size == 128 and config.recipe == "quick" and config.epochs == 20


def test_step_size_defaults_to_madry_and_can_be_set() -> None:
    config = pretrain_config(dataset="digits", defense="at", epsilon=0.1, pgd_steps=5)
    assert config.pgd_step_size is None
    assert config.step_size == pytest.approx(2.5 * 0.1 / 5)
    assert pretrain_config(dataset="digits", pgd_step_size=0.01).step_size == 0.01


def test_split_config_defaults_are_the_papers() -> None:
    assert SplitConfig() == SplitConfig(pretrain=4800, retrain=50, pool=150)
    config = pretrain_config(dataset="digits", split={"pretrain": 10, "retrain": 2, "pool": 3})
    assert config.split == SplitConfig(pretrain=10, retrain=2, pool=3)


def test_config_is_frozen() -> None:
    config = pretrain_config(dataset="digits")
    with pytest.raises(ValidationError, match="frozen"):
        config.epochs = 3  # type: ignore[misc]


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [
        ("epsilon", 2, "less than or equal to 1"),
        ("epsilon", 0, "greater than 0"),
        ("alpha", 1.0, "less than 1"),
        ("alpha", 0, "greater than 0"),
        ("epochs", 0, "greater than or equal to 1"),
        ("epochs", 20_000, "less than or equal to 10000"),
        ("pgd_steps", 0, "greater than or equal to 1"),
        ("pgd_step_size", 1.5, "less than or equal to 1"),
        ("lr", -0.1, "greater than 0"),
        ("momentum", 1.0, "less than 1"),
        ("batch_size", 0, "greater than or equal to 1"),
        ("seed", -1, "greater than or equal to 0"),
        ("weight_decay", 2, "less than or equal to 1"),
        ("warmup_epochs", -1, "greater than or equal to 0"),
    ],
)
def test_out_of_range_value_names_the_field_and_the_bound(
    field: str, value: float, bound: str
) -> None:
    with pytest.raises(ValidationError) as info:
        pretrain_config(dataset="digits", defense="at", **{field: value})
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(field,)]
    message = str(info.value)
    assert field in message and bound in message


def test_epsilon_above_one_mentions_epsilon_and_one() -> None:
    with pytest.raises(ValidationError) as info:
        pretrain_config(dataset="digits", epsilon=2)
    message = str(info.value)
    assert "epsilon" in message and "1" in message.split("epsilon", 1)[1]


def test_split_counts_must_be_positive_but_pretrain_may_be_zero() -> None:
    for field in ("retrain", "pool"):
        with pytest.raises(ValidationError) as info:
            SplitConfig(**{field: 0})
        assert field in str(info.value) and "greater than or equal to 1" in str(info.value)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        SplitConfig(pretrain=-1)
    assert SplitConfig(pretrain=0).pretrain == 0  # an audit-only split


def test_pretraining_names_split_pretrain_when_it_is_zero() -> None:
    from catalog.requests import PretrainRequest
    from common.specs import SpecError, resolve_pretrain

    split = {"pretrain": 0, "retrain": 10, "pool": 25}
    with pytest.raises(SpecError) as info:
        resolve_pretrain(PretrainRequest(dataset="digits", overrides={"split": split}))
    [error] = info.value.errors
    assert error["loc"] == ("overrides", "split") and "split.pretrain=0" in error["msg"]


@pytest.mark.parametrize(
    ("milestones", "match"),
    [
        ((100, 80), "strictly increasing"),
        ((80, 80), "strictly increasing"),
        ((0, 50), r"\[1, 119\]"),
        ((80, 120), r"\[1, 119\]"),
    ],
)
def test_bad_milestones_raise_with_the_allowed_range(
    milestones: tuple[int, ...], match: str
) -> None:
    with pytest.raises(ValidationError, match=match) as info:
        pretrain_config(dataset="digits", defense="none", milestones=milestones)
    assert "milestones" in str(info.value)


def test_warmup_must_end_before_the_last_epoch_for_pcl() -> None:
    with pytest.raises(ValidationError, match=r"warmup_epochs.*\[0, 9\]"):
        pretrain_config(dataset="digits", defense="pcl", epochs=10, warmup_epochs=10)
    # Without PC-Loss the warm-up is unused, so it is not checked against epochs.
    config = pretrain_config(dataset="digits", defense="none", epochs=10, warmup_epochs=10)
    assert config.warmup_epochs == 10


def test_unknown_recipe_raises_validation_error_listing_the_recipes() -> None:
    with pytest.raises(
        ValidationError, match=r"unknown recipe 'fast'; valid recipes: paper"
    ) as info:
        pretrain_config(dataset="digits", recipe="fast")
    assert info.value.errors()[0]["loc"] == ("recipe",)
    with pytest.raises(ValidationError, match="valid recipes"):
        PretrainConfig(dataset="digits", recipe="fast")


@pytest.mark.parametrize(("field", "value"), [("defense", "mixup"), ("arch", "vgg16")])
def test_unknown_choice_raises_validation_error_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(ValidationError) as info:
        pretrain_config(dataset="digits", **{field: value})
    assert info.value.errors()[0]["loc"] == (field,)
    assert value in str(info.value)


def test_extra_fields_are_forbidden() -> None:
    for build in (
        lambda: pretrain_config(dataset="digits", learning_rate=0.1),
        lambda: PretrainConfig(dataset="digits", learning_rate=0.1),  # type: ignore[call-arg]
        lambda: SplitConfig(pretrian=10),  # type: ignore[call-arg]
        lambda: Schedule(epochs=3, milestones=(1,), gamma=0.2),  # type: ignore[call-arg]
    ):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            build()


def test_empty_dataset_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="dataset"):
        PretrainConfig(dataset="")


def test_config_round_trips_through_json() -> None:
    config = pretrain_config(dataset="digits", defense="at-pcl", epochs=7, seed=11)
    assert PretrainConfig.model_validate_json(config.model_dump_json()) == config


def test_importing_core_config_leaves_torch_out() -> None:
    code = (
        "import sys, core.config, core\n"
        "bad = sorted(m for m in ('torch', 'fastapi', 'sqlalchemy', 'celery') "
        "if m in sys.modules)\n"
        "print(bad)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


# ---- one resolution path for the CLI and the API -------------------------------------------


def _cli_args(command: str, argv: list[str]):
    """The namespace ``bulwark COMMAND argv`` parses to (without running anything)."""
    import argparse
    import importlib

    module = importlib.import_module(f"bulwark.commands.{command}")
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(), command, "")
    return module, parser.parse_args([command, *argv])


def test_cli_and_api_resolve_the_same_audit_request_to_the_same_config() -> None:
    from catalog.requests import AuditJobCreate
    from common.specs import resolve_audit

    module, args = _cli_args(
        "audit",
        [
            "--model",
            "m",
            "--dataset",
            "fashion-mnist",
            "--attacks",
            "fc,bp",
            "--pairs",
            "0:7,2:1",
            "--retrain-epochs",
            "20",
            "--attack-set",
            "fc.mu=0.2",
            "--set",
            "retrain_lr=0.05",
            "--iterations",
            "50",
            "--out",
            "r.json",
        ],
    )
    cli_request, data_dir = module.build_request(args)
    api_request = AuditJobCreate.model_validate(
        {
            "model_id": "00000000-0000-0000-0000-000000000001",
            "dataset": "fashion-mnist",
            "attacks": ["fc", "bp"],
            "pairs": [[0, 7], [2, 1]],
            "iterations": 50,
            "attack_settings": {"fc": {"mu": 0.2}},
            "overrides": {"retrain_epochs": 20, "retrain_lr": 0.05},
        }
    )
    cli = resolve_audit(cli_request, model="m", data_dir=data_dir)
    api = resolve_audit(api_request, model="m")
    assert cli == api
    # The documented example: retrain_epochs alone rescales the milestones (x0.1 at 60%, 80%).
    assert api.retrain_milestones == (12, 16) and api.attack_settings["fc"].mu == 0.2


def test_cli_and_api_resolve_the_same_pretrain_request_to_the_same_config() -> None:
    from catalog.requests import PretrainJobCreate
    from common.specs import resolve_pretrain

    module, args = _cli_args(
        "pretrain",
        [
            "--dataset",
            "digits",
            "--arch",
            "convnet",
            "--epochs",
            "5",
            "--alpha",
            "0.4",
            "--set",
            "momentum=0.8",
            "--split",
            "100:10:25",
            "--out",
            "x",
        ],
    )
    cli_request, _ = module.build_request(args)
    api_request = PretrainJobCreate.model_validate(
        {
            "dataset": "digits",
            "arch": "convnet",
            "epochs": 5,
            "overrides": {
                "alpha": 0.4,
                "momentum": 0.8,
                "split": {"pretrain": 100, "retrain": 10, "pool": 25},
            },
        }
    )
    cli, api = resolve_pretrain(cli_request), resolve_pretrain(api_request)
    assert cli == api
    # Both default to the product's defense and the paper's recipe, scaled to 5 epochs.
    assert api.defense == "at-pcl" and api.recipe == "paper" and api.epochs == 5


def test_every_invalid_field_of_a_request_is_reported_at_once() -> None:
    from catalog.requests import AuditRequest
    from common.specs import SpecError, resolve_audit

    request = AuditRequest(
        dataset="digits",
        attack_settings={"fc": {"mu": -1}},
        overrides={"retrain_lr": -1, "screen_steps": 0},
    )
    with pytest.raises(SpecError) as info:
        resolve_audit(request, model="m")
    assert {error["loc"] for error in info.value.errors} == {
        ("attack_settings", "fc", "mu"),
        ("overrides", "retrain_lr"),
        ("overrides", "screen_steps"),
    }
