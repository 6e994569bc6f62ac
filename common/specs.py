"""Job specs: what a client submits, validated the same way by the API and the worker.

Torch-free: the pre-training spec is checked by building the core's own
:class:`core.config.PretrainConfig` (which imports no torch), so an out-of-range override is
refused at submission with the core's message, not hours later on a GPU.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.config import (
    DATASETS,
    PAPER_PAIRS,
    RECIPES,
    Arch,
    AuditConfig,
    Defense,
    PretrainConfig,
    pretrain_config,
)

ATTACKS = ("fc", "cp", "bp")
Attack = Literal["fc", "cp", "bp"]
# Fields the service sets itself: a tenant names data by dataset name, never by server path.
RESERVED_OVERRIDES = frozenset(
    {"dataset", "data_dir", "device", "arch", "defense", "recipe", "seed", "epochs"}
)
RESERVED_AUDIT_OVERRIDES = frozenset(
    {"model", "dataset", "data_dir", "device", "attacks", "pairs", "targets_per_pair",
     "iterations", "delta", "seed"}
)  # fmt: skip


def _known_dataset(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {list(DATASETS)}")
    return name


class SpecError(ValueError):
    """A spec the core refuses; ``errors`` are pydantic-style, with ``loc`` naming the field."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


class PretrainJobCreate(BaseModel):
    """A robust pre-training run: a named recipe scaled to ``epochs``, plus overrides."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description=f"one of {list(DATASETS)}")
    arch: Arch = "resnet18"
    defense: Defense = "at-pcl"
    recipe: str | None = Field(None, description="default: the paper's recipe for the dataset")
    epochs: int | None = Field(None, ge=1, le=10_000, description="default: the recipe's")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='any other PretrainConfig field, e.g. {"lr": 0.05, "batch_size": 256}',
    )
    name: str | None = Field(None, max_length=200, description="name of the produced model")

    _check_dataset = field_validator("dataset")(_known_dataset)

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, recipe: str | None) -> str | None:
        if recipe is not None and recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; valid recipes: {sorted(RECIPES)}")
        return recipe

    @field_validator("overrides")
    @classmethod
    def _no_reserved_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(RESERVED_OVERRIDES & overrides.keys())
        if reserved:
            raise ValueError(f"set {reserved} as top-level fields, not overrides")
        return overrides

    def to_config(
        self, *, data_dir: str | None = None, device: str | None = None
    ) -> PretrainConfig:
        """The core's config for this spec; raises :class:`SpecError` naming the bad field."""
        try:
            return pretrain_config(
                dataset=self.dataset,
                defense=self.defense,
                recipe=self.recipe,
                epochs=self.epochs,
                arch=self.arch,
                seed=self.seed,
                data_dir=data_dir,
                device=device,
                **self.overrides,
            )
        except ValidationError as error:
            raise SpecError(_spec_errors(error, self.overrides, PretrainConfig)) from None


def _spec_errors(
    error: ValidationError, overrides: dict[str, Any], config: type[BaseModel]
) -> list[dict[str, Any]]:
    """The core config's errors, located in the request: ``overrides.<field>`` or ``<field>``.

    A whole-config error ("milestones must ...") is put on the field its message starts with.
    """
    errors = []
    for item in error.errors(include_url=False, include_context=False):
        if item["loc"]:
            field = str(item["loc"][0])
        else:
            words = item["msg"].removeprefix("Value error, ").split()
            field = words[0] if words and words[0] in config.model_fields else ""
        loc = ("overrides", field) if field in overrides else (field or "overrides",)
        errors.append({"loc": loc, "msg": item["msg"], "type": item["type"]})
    return errors


class AuditJobCreate(BaseModel):
    """An audit of a stored model: FC, CP and/or BP under the paper's protocol."""

    model_config = ConfigDict(extra="forbid")

    model_id: uuid.UUID
    dataset: str = Field(description=f"one of {list(DATASETS)}; the model's classes must match")
    attacks: list[Attack] = Field(default_factory=lambda: list(ATTACKS), min_length=1)
    pairs: list[tuple[int, int]] | None = Field(
        None,
        min_length=1,
        description="(target class, poison class) pairs; default: the paper's pairs",
    )
    targets_per_pair: int = Field(10, ge=1, le=10_000)
    iterations: int = Field(500, ge=1, le=100_000, description="optimization steps per attack")
    delta: float = Field(25.5 / 255, gt=0, le=1, description="l_inf budget in [0,1] pixels")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='any other AuditConfig field, e.g. {"retrain_epochs": 20}',
    )

    _check_dataset = field_validator("dataset")(_known_dataset)

    @field_validator("attacks")
    @classmethod
    def _unique_attacks(cls, attacks: list[str]) -> list[str]:
        if len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks repeat: {attacks}")
        return attacks

    @field_validator("pairs")
    @classmethod
    def _distinct_classes(cls, pairs: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        for target, poison in pairs or ():
            if target == poison or target < 0 or poison < 0:
                raise ValueError(
                    f"pair ({target}, {poison}): classes must be distinct non-negative indices"
                )
        if pairs is not None and len(set(pairs)) != len(pairs):
            raise ValueError(f"pairs repeat: {pairs}")
        return pairs

    @field_validator("overrides")
    @classmethod
    def _no_reserved_audit_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(RESERVED_AUDIT_OVERRIDES & overrides.keys())
        if reserved:
            raise ValueError(f"{reserved} are set by the service or as top-level fields")
        return overrides

    @property
    def effective_pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.pairs) if self.pairs is not None else PAPER_PAIRS

    def to_config(
        self, *, model: str, data_dir: str | None = None, device: str | None = None
    ) -> AuditConfig:
        """The core's config for this spec, auditing the checkpoint at ``model``; raises
        :class:`SpecError` naming the bad field."""
        fields: dict[str, Any] = {
            "model": model,
            "dataset": self.dataset,
            "data_dir": data_dir,
            "device": device,
            "attacks": tuple(self.attacks),
            "pairs": self.effective_pairs,
            "targets_per_pair": self.targets_per_pair,
            "iterations": self.iterations,
            "delta": self.delta,
            "seed": self.seed,
            **self.overrides,
        }
        try:
            return AuditConfig.model_validate(fields)
        except ValidationError as error:
            raise SpecError(_spec_errors(error, self.overrides, AuditConfig)) from None


class ImportJobSpec(BaseModel):
    """A torch ``.pt`` upload waiting in the artifact store, with its form's metadata.

    The API never reads the file (it would have to unpickle it); a worker reads it with
    ``torch.load(weights_only=True)``, checks it against this metadata and stores safetensors.
    """

    model_config = ConfigDict(extra="forbid")

    upload_key: str
    filename: str | None = None
    sha256: str  # of the uploaded .pt file
    name: str | None = None
    arch: str
    input_shape: list[int] = Field(min_length=3, max_length=3)
    classes: list[str] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
