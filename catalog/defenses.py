"""Defenses at pre-training (Eq. 5-8 of the paper)."""

from __future__ import annotations

from dataclasses import dataclass

from catalog.registry import Catalog


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    title: str
    adversarial: bool  # PGD adversarial training (Eq. 7)
    prototype: bool  # Prototype Conformity Loss (Eq. 5, 6)


DEFENSES: Catalog[DefenseSpec] = Catalog(
    "defense",
    [
        DefenseSpec("none", "cross-entropy", adversarial=False, prototype=False),
        DefenseSpec("pcl", "(1-alpha) CE + alpha L_PC (Eq. 6)", adversarial=False, prototype=True),
        DefenseSpec(
            "at",
            "PGD AT with the feature-distance term (Eq. 7)",
            adversarial=True,
            prototype=False,
        ),
        DefenseSpec("at-pcl", "AT joint with L_PC (Eq. 8)", adversarial=True, prototype=True),
    ],
)
# The product's default: the paper's strongest defense overall (Table 1).
DEFAULT_DEFENSE = "at-pcl"
