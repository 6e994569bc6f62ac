"""Targeted clean-label poisoning attacks on a frozen feature extractor, one module each.

- ``fc``: Feature Collision (Shafahi et al. 2018), ``core.attacks.fc``
- ``cp``: Convex Polytope (Zhu et al. 2019), ``core.attacks.cp``
- ``bp``: Bullseye Polytope (Aghakhani et al. 2021), ``core.attacks.bp``
- ``gm``: Gradient Matching (Geiping et al. 2021, "Witches' Brew") on the victim's linear
  head, ``core.attacks.gm``

Each registers its class against its ``catalog.ATTACKS`` entry with ``@register_attack``;
``attack_class(name)`` finds it. The shared machinery (context, budget, result, batching) is
``core.attacks.base``. Adding an attack: a catalog entry with its settings model, one module
here with a registered :class:`Attack` subclass, and its tests (docs/architecture.md).
"""

from core.attacks import bp, cp, fc, gm  # noqa: F401  (each module registers its attack)
from core.attacks.base import (
    ActiveRows,
    Attack,
    AttackContext,
    Crafted,
    CraftResult,
    EarlyStop,
    FeatureExtractor,
    StepCallback,
    budget_box,
    frozen,
)
from core.attacks.bp import BullseyePolytope
from core.attacks.cp import ConvexPolytope, project_simplex
from core.attacks.fc import FeatureCollision
from core.attacks.gm import GradientMatching, match_loss
from core.attacks.registry import IMPLEMENTATIONS, attack_class, register_attack

__all__ = [
    "IMPLEMENTATIONS",
    "ActiveRows",
    "Attack",
    "AttackContext",
    "BullseyePolytope",
    "ConvexPolytope",
    "CraftResult",
    "Crafted",
    "EarlyStop",
    "FeatureCollision",
    "FeatureExtractor",
    "GradientMatching",
    "StepCallback",
    "attack_class",
    "budget_box",
    "frozen",
    "match_loss",
    "project_simplex",
    "register_attack",
]
