"""Typed, validated job specs for the core (torch-free: the API validates with these too).

Every hyper-parameter of a pre-training run lives in :class:`PretrainConfig`. A config is built
from a named recipe (Appendix A of the paper, or a quick CPU preset) plus explicit overrides with
:func:`pretrain_config`; out-of-range values raise :class:`pydantic.ValidationError`, whose
message names the field and the allowed range.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

ARCHS = ("convnet", "resnet18", "resnet50")
DEFENSES = ("none", "pcl", "at", "at-pcl")
# Named datasets; anything else given as ``dataset`` is read as an image-folder path.
DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "tiny-imagenet")

Arch = Literal["convnet", "resnet18", "resnet50"]
Defense = Literal["none", "pcl", "at", "at-pcl"]
Precision = Literal["auto", "float32", "bfloat16"]


class Recipe(BaseModel):
    """A schedule preset: epochs and learning-rate milestones, in epochs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int
    milestones: tuple[int, ...]
    # Epochs trained with the defense's base loss before PC-Loss joins (PCL recipes only).
    warmup_epochs: int = 0
    alpha: float = 0.3

    def scaled(self, epochs: int) -> Recipe:
        """The same schedule stretched or squeezed to ``epochs``, milestones kept in proportion."""

        def scale(epoch: int) -> int:
            return max(1, min(epochs, round(epoch * epochs / self.epochs)))

        milestones = tuple(sorted({scale(m) for m in self.milestones if scale(m) < epochs}))
        warmup = min(scale(self.warmup_epochs), epochs - 1) if self.warmup_epochs else 0
        return self.model_copy(
            update={"epochs": epochs, "milestones": milestones, "warmup_epochs": warmup}
        )


def _paper(standard: Recipe, adversarial: Recipe, prototype: Recipe) -> dict[str, Recipe]:
    return {"none": standard, "at": adversarial, "pcl": prototype, "at-pcl": prototype}


_PCL_SCHEDULE = {"epochs": 220, "milestones": (80, 120, 160, 200), "warmup_epochs": 100}

# Recipe name -> defense -> schedule. The paper's recipes are Appendix A (CIFAR-10) and
# Appendix B (Tiny ImageNet); "quick" is a CPU preset of a few epochs with the same shape.
RECIPES: dict[str, dict[str, Recipe]] = {
    "paper": _paper(
        Recipe(epochs=120, milestones=(80, 100)),
        Recipe(epochs=200, milestones=(90, 120, 150)),
        Recipe(**_PCL_SCHEDULE, alpha=0.3),
    ),
    "paper-tiny-imagenet": _paper(
        Recipe(epochs=200, milestones=(90, 120, 150)),
        Recipe(epochs=200, milestones=(90, 120, 150)),
        Recipe(**_PCL_SCHEDULE, alpha=0.5),
    ),
    "quick": _paper(
        Recipe(epochs=8, milestones=(5, 7)),
        Recipe(epochs=8, milestones=(5, 7)),
        Recipe(epochs=10, milestones=(6, 8), warmup_epochs=4, alpha=0.3),
    ),
}


def default_recipe(dataset: str) -> str:
    """The paper's recipe for ``dataset``: Appendix B for Tiny ImageNet, Appendix A otherwise."""
    return "paper-tiny-imagenet" if dataset == "tiny-imagenet" else "paper"


class SplitConfig(BaseModel):
    """Per-class counts of the paper's split of the training set (Appendix A).

    In class order, the first ``pretrain`` images of each class pre-train; of the rest, the
    next ``retrain`` form the clean re-training set and the next ``pool`` the base-image pool.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pretrain: int = Field(4800, ge=1, description="pre-training images per class")
    retrain: int = Field(50, ge=1, description="clean re-training images per class")
    pool: int = Field(150, ge=1, description="base-pool images per class")


class PretrainConfig(BaseModel):
    """Everything a pre-training run depends on. Pixel budgets are in [0,1] units."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = Field(min_length=1, description="a name in DATASETS or an image-folder path")
    data_dir: str | None = Field(None, description="where the dataset's files are")
    arch: Arch = "resnet18"
    defense: Defense = "none"
    recipe: str = "paper"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    split: SplitConfig | None = None  # None: core.data.default_split(dataset)

    epochs: int = Field(120, ge=1, le=10_000)
    milestones: tuple[int, ...] = (80, 100)  # epochs after which lr is multiplied by lr_gamma
    lr: float = Field(0.1, gt=0, le=10)  # SGD learning rate for a batch of batch_size
    lr_gamma: float = Field(0.1, gt=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    batch_size: int = Field(128, ge=1, le=65_536)
    augment: bool = True  # random crop (padding 4, or 1/8 of the side) and flip where it fits

    # PC-Loss (Eq. 5, 6, 8)
    alpha: float = Field(0.3, gt=0, lt=1)  # weight of L_PC; CE (or the AT loss) gets 1 - alpha
    warmup_epochs: int = Field(0, ge=0)  # base-loss epochs before the joint loss
    centroid_lr: float = Field(0.01, gt=0, le=10)  # SGD lr of the trainable class centroids

    # PGD adversarial training (Eq. 7, 8)
    epsilon: float = Field(4 / 255, gt=0, le=1)  # l_inf budget in [0,1] pixel units
    pgd_steps: int = Field(10, ge=1, le=1000)
    pgd_step_size: float | None = Field(None, gt=0, le=1)  # None: 2.5 * epsilon / pgd_steps
    random_start: bool = True
    feature_term: bool = True  # ||f(x_adv) - f(x)|| in the AT loss; False is plain Madry AT

    precision: Precision = "auto"  # auto: bfloat16 on CUDA and CPUs with AMX or AVX512_BF16
    device: str | None = None  # None: cuda when present, else cpu

    @property
    def uses_pcl(self) -> bool:
        return self.defense in ("pcl", "at-pcl")

    @property
    def uses_at(self) -> bool:
        return self.defense in ("at", "at-pcl")

    @property
    def step_size(self) -> float:
        """The PGD step actually used (Madry et al.'s 2.5 * epsilon / steps by default)."""
        if self.pgd_step_size is not None:
            return self.pgd_step_size
        return 2.5 * self.epsilon / self.pgd_steps

    @model_validator(mode="after")
    def _check_schedule(self) -> Self:
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")
        if any(not 1 <= m < self.epochs for m in self.milestones):
            raise ValueError(
                f"milestones must lie in [1, epochs - 1] = [1, {self.epochs - 1}], "
                f"got {self.milestones}"
            )
        if self.uses_pcl and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs must lie in [0, epochs - 1] = [0, {self.epochs - 1}], "
                f"got {self.warmup_epochs}"
            )
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
        return self


def pretrain_config(
    *,
    dataset: str,
    defense: Defense = "none",
    recipe: str | None = None,
    epochs: int | None = None,
    **overrides: object,
) -> PretrainConfig:
    """A :class:`PretrainConfig` from a named recipe, scaled to ``epochs``, with overrides.

    ``recipe`` defaults to the paper's recipe for ``dataset``. ``epochs`` rescales the
    recipe's milestones and warm-up in proportion; explicit ``milestones`` or
    ``warmup_epochs`` overrides win over the scaled ones.
    """
    recipe = recipe or default_recipe(dataset)
    if recipe not in RECIPES or defense not in RECIPES[recipe]:
        # Let pydantic build the error so it reads like every other bad field.
        return PretrainConfig(dataset=dataset, defense=defense, recipe=recipe)
    schedule = RECIPES[recipe][defense]
    if epochs is not None and epochs >= 1:
        schedule = schedule.scaled(epochs)
    values: dict[str, object] = {
        "dataset": dataset,
        "defense": defense,
        "recipe": recipe,
        "epochs": schedule.epochs if epochs is None else epochs,
        "milestones": schedule.milestones,
        "warmup_epochs": schedule.warmup_epochs,
        "alpha": schedule.alpha,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PretrainConfig.model_validate(values)


AttackName = Literal["fc", "cp", "bp"]
# The paper's target/poison pairs (Appendix A) by CIFAR-10 class index: airplane/horse,
# bird/automobile, deer/automobile, frog/cat.
PAPER_PAIRS: tuple[tuple[int, int], ...] = ((0, 7), (2, 1), (4, 1), (6, 3))


class AuditConfig(BaseModel):
    """Everything a poisoning audit depends on (the paper's protocol, Appendix A).

    Pixel budgets and step sizes are in [0,1] pixel units. The attacks' own settings
    (``fc_*``, ``polytope_*``) are documented in ``core.attacks``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1, description="checkpoint folder or weights file")
    dataset: str = Field(min_length=1, description="a name in DATASETS or an image-folder path")
    data_dir: str | None = Field(None, description="where the dataset's files are")
    split: SplitConfig | None = None  # None: core.data.default_split(dataset)

    attacks: tuple[AttackName, ...] = Field(("fc", "cp", "bp"), min_length=1)
    pairs: tuple[tuple[int, int], ...] = Field(PAPER_PAIRS, min_length=1)  # (target, poison)
    targets_per_pair: int = Field(10, ge=1, le=10_000)  # test images attacked per pair
    iterations: int = Field(500, ge=1, le=100_000)  # optimization steps per attack
    delta: float = Field(25.5 / 255, ge=0, le=1)  # l_inf budget around each base image

    fc_poisons: int = Field(1, ge=1, le=100)  # poisons per FC instance
    fc_step: float = Field(0.25 * 25.5 / 255, gt=0, le=1)  # l_inf size of FC's first step
    fc_mu: float = Field(0.1, ge=0, le=1e6)  # FC's proximity weight (core.attacks)
    polytope_poisons: int = Field(5, ge=1, le=100)  # poisons per CP / BP instance
    polytope_lr: float = Field(0.04, gt=0, le=1)  # Adam step on CP / BP poisons, pixels
    cp_coefficient_steps: int = Field(10, ge=1, le=10_000)  # simplex steps per CP iteration

    # Re-training of the linear head on frozen features (Appendix A: Adam, 100 epochs).
    retrain_epochs: int = Field(100, ge=1, le=100_000)
    retrain_lr: float = Field(0.1, gt=0, le=10)
    retrain_milestones: tuple[int, ...] = (60, 80)  # epochs after which lr *= retrain_gamma
    retrain_gamma: float = Field(0.1, gt=0, le=1)
    retrain_batch_size: int = Field(64, ge=1, le=1_000_000)  # images per Adam step

    eval_images: int | None = Field(None, ge=1)  # test images for Pre./Re. Acc; None: all
    # The Eq. 4a/4b feature-space screen (core.screen) on the first test images, PGD at delta.
    screen_images: int = Field(500, ge=0, le=1_000_000)  # 0 turns the screen off
    screen_steps: int = Field(10, ge=1, le=1000)  # PGD steps of the drift measurement
    attack_batch_size: int | None = Field(None, ge=1)  # images per forward; None: all at once
    seed: int = Field(0, ge=0, le=2**32 - 1)  # chooses targets and bases; seeds re-training
    precision: Precision = "auto"  # auto: bfloat16 on CUDA and CPUs with AMX or AVX512_BF16
    device: str | None = None  # None: cuda when present, else cpu

    @model_validator(mode="after")
    def _check(self) -> Self:
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks must not repeat, got {self.attacks}")
        for target, poison in self.pairs:
            if target < 0 or poison < 0 or target == poison:
                raise ValueError(
                    f"pairs must be (target class, poison class) of two different class "
                    f"indices >= 0, got ({target}, {poison})"
                )
        if len(set(self.pairs)) != len(self.pairs):
            raise ValueError(f"pairs must not repeat, got {self.pairs}")
        milestones = self.retrain_milestones
        if list(milestones) != sorted(set(milestones)):
            raise ValueError(f"retrain_milestones must be strictly increasing, got {milestones}")
        if any(not 1 <= m < self.retrain_epochs for m in milestones):
            raise ValueError(
                f"retrain_milestones must lie in [1, retrain_epochs - 1] = "
                f"[1, {self.retrain_epochs - 1}], got {milestones}"
            )
        return self
