"""BP, Bullseye Polytope (Aghakhani et al. 2021): Convex Polytope with c fixed at 1/k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from core.attacks.cp import ConvexPolytope
from core.attacks.registry import register_attack


@register_attack
@dataclass(frozen=True)
class BullseyePolytope(ConvexPolytope):
    """Bullseye Polytope: the poisons' mean feature is pulled onto the target's ("bullseye").

    That puts the target near the centre of the polytope rather than on its boundary, which
    transfers better; the optimizer, budget and objective are otherwise CP's.
    """

    name: ClassVar[str] = "bp"
    learn_coefficients: ClassVar[bool] = False
