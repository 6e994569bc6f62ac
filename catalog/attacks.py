"""Attacks: the targeted clean-label poisoning attacks an audit can run, and their settings.

Each entry has a pydantic settings model (frozen, ranges checked) holding everything the attack
takes besides the audit-wide budget (delta, iterations). The torch implementation registers
against the entry's name in ``core.attacks`` (one module per attack).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from catalog.registry import Catalog


class AttackSettings(BaseModel):
    """Settings every attack has: how many poisons one instance gets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    poisons: int = Field(5, ge=1, le=100, description="poisons per instance")


class FeatureCollisionSettings(AttackSettings):
    poisons: int = Field(1, ge=1, le=100, description="poisons per instance")
    step: float = Field(
        0.25 * 25.5 / 255, gt=0, le=1, description="l_inf size of the first step, in pixels"
    )
    mu: float = Field(
        0.1, ge=0, le=1e6, description="weight of mean((x - x_b)^2) against the feature term"
    )


class PolytopeSettings(AttackSettings):
    lr: float = Field(0.04, gt=0, le=1, description="Adam step on the poisons, in pixels")


class ConvexPolytopeSettings(PolytopeSettings):
    coefficient_steps: int = Field(
        10,
        ge=1,
        le=10_000,
        description="projected-gradient steps on the coefficients per iteration",
    )


class GradientMatchingSettings(AttackSettings):
    lr: float = Field(0.01, gt=0, le=1, description="Adam step on the poisons, in pixels")
    restarts: int = Field(
        2, ge=1, le=16, description="random starts per instance; the best match is kept"
    )


@dataclass(frozen=True)
class AttackSpec:
    name: str
    title: str
    reference: str
    settings: type[AttackSettings]

    @property
    def default_poisons(self) -> int:
        return int(self.settings.model_fields["poisons"].default)


ATTACKS: Catalog[AttackSpec] = Catalog(
    "attack",
    [
        AttackSpec(
            name="fc",
            title="Feature Collision",
            reference='Shafahi et al. 2018, "Poison Frogs!"',
            settings=FeatureCollisionSettings,
        ),
        AttackSpec(
            name="cp",
            title="Convex Polytope",
            reference="Zhu et al. 2019",
            settings=ConvexPolytopeSettings,
        ),
        AttackSpec(
            name="bp",
            title="Bullseye Polytope",
            reference="Aghakhani et al. 2021",
            settings=PolytopeSettings,
        ),
        AttackSpec(
            name="gm",
            title="Gradient Matching",
            reference='Geiping et al. 2021, "Witches\' Brew", in the transfer setting',
            settings=GradientMatchingSettings,
        ),
    ],
)
# The paper's three attacks, the default of every audit.
DEFAULT_ATTACKS: tuple[str, ...] = ("fc", "cp", "bp")
