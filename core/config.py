"""Typed, validated configs of the core's two jobs (torch-free: the API validates with these).

Every hyper-parameter of a pre-training run lives in :class:`PretrainConfig`, every setting of
an audit in :class:`AuditConfig`. Build them with :func:`pretrain_config` (a named recipe,
scaled to ``epochs``, plus overrides) and :func:`audit_config` (the paper's protocol plus
overrides, the re-training schedule rescaled with ``retrain_epochs``); requests from the CLI
and the API both go through these two functions (``common.specs``), so the same request gives
the same config. Out-of-range values raise :class:`pydantic.ValidationError`, whose message
names the field and the allowed range.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    model_validator,
)

from catalog import (
    ATTACKS,
    DATASETS,
    DEFAULT_ATTACKS,
    DEFAULT_DEFENSE,
    DEFENSES,
    RECIPES,
    ArchName,
    AttackName,
    AttackSettings,
    DatasetName,
    DefenseName,
    RecipeName,
    SplitConfig,
    default_recipe,
)
from catalog.requests import (
    DEFAULT_PAIR_SETS,
    MAX_BUDGET_POINTS,
    MAX_SEED,
    PairSetName,
)

Precision = Literal["auto", "float32", "bfloat16"]


class PretrainConfig(BaseModel):
    """Everything a pre-training run depends on. Pixel budgets are in [0,1] units."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: DatasetName
    data_dir: str | None = Field(None, description="where the dataset's files are")
    arch: ArchName = "resnet18"
    defense: DefenseName = DEFAULT_DEFENSE
    recipe: RecipeName = "paper"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    split: SplitConfig | None = None  # None: the dataset's default split (catalog)

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
    warmup_epochs: int = Field(0, ge=0, le=10_000)  # base-loss epochs before the joint loss
    centroid_lr: float = Field(0.01, gt=0, le=10)  # SGD lr of the trainable class centroids

    # PGD adversarial training (Eq. 7, 8)
    epsilon: float = Field(4 / 255, gt=0, le=1)  # l_inf budget in [0,1] pixel units
    pgd_steps: int = Field(10, ge=1, le=1000)
    pgd_step_size: float | None = Field(None, gt=0, le=1)  # None: 2.5 * epsilon / pgd_steps
    random_start: bool = True
    feature_term: bool = True  # ||f(x_adv) - f(x)|| in the AT loss; False is plain Madry AT

    precision: Precision = "auto"  # auto: bfloat16 on CUDA and CPUs with AMX or AVX512_BF16
    device: str | None = None  # None: cuda when present, else cpu
    # Processes training this run together, one GPU each on CUDA (core.distributed): each takes
    # its slice of every batch, and the optimization is the single process's (to rounding).
    devices: int = Field(1, ge=1, le=64)

    @property
    def uses_pcl(self) -> bool:
        return DEFENSES.get(self.defense).prototype

    @property
    def uses_at(self) -> bool:
        return DEFENSES.get(self.defense).adversarial

    @property
    def step_size(self) -> float:
        """The PGD step actually used (Madry et al.'s 2.5 * epsilon / steps by default)."""
        if self.pgd_step_size is not None:
            return self.pgd_step_size
        return 2.5 * self.epsilon / self.pgd_steps

    @property
    def resolved_split(self) -> SplitConfig:
        return self.split or DATASETS.get(self.dataset).default_split

    @model_validator(mode="after")
    def _check_split(self) -> Self:
        """Pre-training needs images to train on; an audit-only split (pretrain 0) has none."""
        if self.dataset in DATASETS and self.resolved_split.pretrain < 1:
            default = "" if self.split else f" (the default split of dataset {self.dataset!r})"
            raise ValueError(
                f"split has split.pretrain=0{default}, but pre-training needs split.pretrain "
                ">= 1 images per class: give a split with pre-training images"
            )
        return self

    @model_validator(mode="after")
    def _check_schedule(self) -> Self:
        check_milestones("milestones", self.milestones, self.epochs)
        if self.uses_pcl and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs must lie in [0, epochs - 1] = [0, {self.epochs - 1}], "
                f"got {self.warmup_epochs}"
            )
        return self


def check_milestones(field: str, milestones: tuple[int, ...], epochs: int) -> None:
    """Milestones strictly increasing inside [1, epochs - 1]; the message starts with ``field``."""
    if list(milestones) != sorted(set(milestones)):
        raise ValueError(f"{field} must be strictly increasing, got {milestones}")
    if any(not 1 <= m < epochs for m in milestones):
        raise ValueError(
            f"{field} must lie in [1, epochs - 1] = [1, {epochs - 1}], got {milestones}"
        )


def pretrain_config(
    *,
    dataset: str,
    defense: str = DEFAULT_DEFENSE,
    recipe: str | None = None,
    epochs: int | None = None,
    **overrides: Any,
) -> PretrainConfig:
    """A :class:`PretrainConfig` from a named recipe, scaled to ``epochs``, with overrides.

    ``recipe`` defaults to the paper's recipe for ``dataset``. ``epochs`` rescales the
    recipe's milestones and warm-up in proportion; explicit ``milestones`` or
    ``warmup_epochs`` overrides win over the scaled ones.
    """
    recipe = recipe or default_recipe(dataset)
    values: dict[str, Any] = {"dataset": dataset, "defense": defense, "recipe": recipe}
    if recipe in RECIPES and defense in DEFENSES:
        schedule = RECIPES.get(recipe).for_defense(defense)
        if epochs is not None and epochs >= 1:
            schedule = schedule.scaled(epochs)
        values |= {
            "epochs": schedule.epochs,
            "milestones": schedule.milestones,
            "warmup_epochs": schedule.warmup_epochs,
            "alpha": schedule.alpha,
        }
    if epochs is not None:
        values["epochs"] = epochs
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PretrainConfig.model_validate(values)


# The paper's head re-training (Appendix A): x0.1 at 60% and 80% of the epochs.
PAPER_RETRAIN_EPOCHS = 100
PAPER_RETRAIN_MILESTONES = (60, 80)


def scaled_retrain_milestones(epochs: int) -> tuple[int, ...]:
    """The paper's re-training milestones (60 and 80 of 100 epochs) in proportion to ``epochs``."""
    return tuple(
        sorted(
            {
                round(m * epochs / PAPER_RETRAIN_EPOCHS)
                for m in PAPER_RETRAIN_MILESTONES
                if 1 <= round(m * epochs / PAPER_RETRAIN_EPOCHS) < epochs
            }
        )
    )


class AuditConfig(BaseModel):
    """Everything a poisoning audit depends on (the paper's protocol, Appendix A).

    Pixel budgets and step sizes are in [0,1] pixel units. ``attack_settings`` holds, for
    every attack in ``attacks``, its full settings (the catalog's model for that attack,
    documented in ``catalog.attacks`` and ``core.attacks``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(min_length=1, description="checkpoint folder or weights file")
    dataset: DatasetName
    data_dir: str | None = Field(None, description="where the dataset's files are")
    split: SplitConfig | None = None  # None: the dataset's default split (catalog)

    attacks: tuple[AttackName, ...] = Field(DEFAULT_ATTACKS, min_length=1)
    attack_settings: dict[str, SerializeAsAny[AttackSettings]] = Field(default_factory=dict)
    # Class pairs (target, poison): the explicit ones, then those each pair set adds (in the
    # order of pair_sets, without repeats; core.audit.choose_pairs). pair_sets None resolves
    # to the default sets when no pairs are given and to none when they are.
    pairs: tuple[tuple[int, int], ...] = ()
    pair_sets: tuple[PairSetName, ...] | None = None
    closest_pairs: int = Field(2, ge=0, le=1000)  # pairs the closest set adds
    random_pairs: int = Field(2, ge=0, le=1000)  # pairs the random set adds
    # An undefended reference model's folder: audited on the same instances (core.audit).
    reference: str | None = None
    # An instance whose poisons end farther from the target than this (feature distance over
    # the target's feature norm) was never reached: the ASR is then a lower bound.
    reach_level: float = Field(0.5, gt=0, le=100)
    # The budget curve (core.budget): budget_attack re-run at each delta and poison count.
    budget_attack: AttackName | None = None  # None: bp if it runs, else the first attack
    budget_deltas: tuple[float, ...] = Field((), max_length=MAX_BUDGET_POINTS)
    budget_poisons: tuple[int, ...] = Field((), max_length=MAX_BUDGET_POINTS)
    targets_per_pair: int = Field(10, ge=1, le=10_000)  # test images attacked per pair
    # Sequential audit (core.audit.run_audit): the instances crafted in ``rounds`` rounds and
    # the audit stopped once a round decides the verdict under the policy.
    sequential: bool = False
    rounds: int = Field(4, ge=1, le=100)
    # ... and stopped for futility once a look finds that all its planned instances, at the
    # rates seen so far, would still leave the verdict inconclusive (core.verdict.futile).
    stop_for_futility: bool = True
    # Every early_stop_every crafting iterations, the instances whose poisons already succeed
    # stop being crafted (their heads re-trained as one batched problem); 0: never.
    early_stop_every: int = Field(0, ge=0, le=100_000)
    iterations: int = Field(500, ge=1, le=100_000)  # optimization steps per attack
    # Multi-draw crafting (core.attacks.base): each crafting iteration averages the poisons'
    # features over this many views of the extractor (the victim's random crop and flip, its
    # dropout masks), so that the poisons survive a victim who augments while re-training.
    # 1 is the paper's attacks; the crafting work grows in proportion.
    draws: int = Field(1, ge=1, le=32)
    # The victim re-trains its head on one seeded augmented view of each poison (and the
    # baseline on the same view of each base) instead of the poisons themselves: the threat
    # model of a victim who augments, for which draws > 1 is meant (core.audit.retrain_stage).
    victim_augment: bool = False
    delta: float = Field(25.5 / 255, ge=0, le=1)  # l_inf budget around each base image

    # Re-training of the linear head on frozen features (Appendix A: Adam, 100 epochs).
    retrain_epochs: int = Field(PAPER_RETRAIN_EPOCHS, ge=1, le=100_000)
    retrain_lr: float = Field(0.1, gt=0, le=10)
    retrain_milestones: tuple[int, ...] = PAPER_RETRAIN_MILESTONES  # lr *= retrain_gamma after
    retrain_gamma: float = Field(0.1, gt=0, le=1)
    retrain_batch_size: int = Field(64, ge=1, le=1_000_000)  # images per Adam step

    eval_images: int | None = Field(None, ge=1, le=10_000_000)  # for Pre./Re. Acc; None: all
    # The Eq. 4a/4b feature-space screen (core.screen) on the first test images, PGD at delta.
    screen_images: int = Field(500, ge=0, le=1_000_000)  # 0 turns the screen off
    screen_steps: int = Field(10, ge=1, le=1000)  # PGD steps of the drift measurement
    attack_batch_size: int | None = Field(None, ge=1, le=1_000_000)  # None: all at once
    seed: int = Field(0, ge=0, le=MAX_SEED)  # chooses targets and bases; seeds re-training
    precision: Precision = "auto"  # auto: bfloat16 on CUDA and CPUs with AMX or AVX512_BF16
    device: str | None = None  # None: cuda when present, else cpu

    @model_validator(mode="before")
    @classmethod
    def _complete_attack_settings(cls, values: Any) -> Any:
        """Every chosen attack gets its catalog settings model, defaults filled in."""
        if not isinstance(values, dict):
            return values
        if values.get("pair_sets") is None:
            values = {**values, "pair_sets": () if values.get("pairs") else DEFAULT_PAIR_SETS}
        attacks = values.get("attacks", DEFAULT_ATTACKS)
        given = values.get("attack_settings") or {}
        if not isinstance(attacks, list | tuple) or not isinstance(given, dict):
            return values  # the field validators name the bad type
        unused = sorted(set(given) - set(attacks))
        if unused:
            raise ValueError(f"attack_settings names {unused}, which are not in attacks")
        settings, problems = {}, []
        for name in attacks:
            if name not in ATTACKS:
                return values  # the attacks field names the unknown attack
            raw = given.get(name, {})
            model = ATTACKS.get(name).settings
            try:
                settings[name] = raw if isinstance(raw, model) else model.model_validate(raw)
            except ValidationError as error:
                problems += [
                    {**item, "loc": ("attack_settings", name, *item["loc"])}
                    for item in error.errors(include_url=False)
                ]
        if problems:  # every bad setting, located in the config
            raise ValidationError.from_exception_data(cls.__name__, problems)  # type: ignore[arg-type]
        return {**values, "attack_settings": settings}

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
        sets = self.pair_sets or ()
        if len(set(sets)) != len(sets):
            raise ValueError(f"pair_sets must not repeat, got {list(sets)}")
        adds = {"closest": self.closest_pairs, "random": self.random_pairs, "paper": 1}
        if not self.pairs and not any(adds[name] for name in sets):
            raise ValueError(
                "pairs: give explicit pairs, or pair_sets that add some (closest_pairs or "
                "random_pairs above 0)"
            )
        if self.sequential and self.rounds > self.targets_per_pair:
            raise ValueError(
                f"rounds ({self.rounds}) must not exceed targets_per_pair "
                f"({self.targets_per_pair}): every round takes a share of each pair's targets"
            )
        for delta in self.budget_deltas:
            if not 0 < delta <= 1:
                raise ValueError(f"budget_deltas must be in (0, 1], got {delta}")
        for poisons in self.budget_poisons:
            if not 1 <= poisons <= 100:
                raise ValueError(f"budget_poisons must be in [1, 100], got {poisons}")
        if self.budget_attack is not None and self.budget_attack not in self.attacks:
            raise ValueError(
                f"budget_attack {self.budget_attack!r} must be one of the audit's attacks "
                f"{list(self.attacks)}"
            )
        check_milestones("retrain_milestones", self.retrain_milestones, self.retrain_epochs)
        return self

    @property
    def resolved_split(self) -> SplitConfig:
        return self.split or DATASETS.get(self.dataset).default_split

    def poisons(self, attack: str) -> int:
        """Poisons per instance of ``attack``."""
        return self.attack_settings[attack].poisons

    @property
    def max_poisons(self) -> int:
        """Bases drawn per instance: the most any attack, or the budget curve, uses."""
        curve = max(self.budget_poisons, default=0) if self.curve_attack else 0
        return max(curve, *(self.poisons(name) for name in self.attacks))

    @property
    def curve_attack(self) -> str | None:
        """The attack the budget curve sweeps, or None when the audit has no curve."""
        if not self.budget_deltas and not self.budget_poisons:
            return None
        if self.budget_attack is not None:
            return self.budget_attack
        return "bp" if "bp" in self.attacks else self.attacks[0]


def audit_config(**values: Any) -> AuditConfig:
    """An :class:`AuditConfig` from the given fields (None means the default).

    A ``retrain_epochs`` without ``retrain_milestones`` keeps the paper's schedule shape
    (x0.1 at 60% and 80% of the epochs).
    """
    given = {k: v for k, v in values.items() if v is not None}
    epochs = given.get("retrain_epochs")
    if isinstance(epochs, int) and epochs >= 1 and "retrain_milestones" not in given:
        given["retrain_milestones"] = scaled_retrain_milestones(epochs)
    # Bad attack settings are reported together with every other bad field: check them
    # apart, and validate the rest without them.
    settings = given.get("attack_settings")
    problems: list[Any] = []  # pydantic's ErrorDetails, re-raised as InitErrorDetails
    if isinstance(settings, dict):
        valid = {}
        for name, raw in settings.items():
            try:
                AuditConfig.model_validate({**given, "attack_settings": {name: raw}})
            except ValidationError as error:
                mine = [e for e in error.errors() if e["loc"][:2] == ("attack_settings", name)]
                if mine:
                    problems += mine
                    continue
            valid[name] = raw
        given["attack_settings"] = valid
    try:
        config = AuditConfig.model_validate(given)
    except ValidationError as error:
        every = [*problems, *error.errors()]
        raise ValidationError.from_exception_data(AuditConfig.__name__, every) from None
    if problems:
        raise ValidationError.from_exception_data(AuditConfig.__name__, problems)
    return config
