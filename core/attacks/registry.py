"""Attack name -> implementation, checked against the catalog."""

from __future__ import annotations

from typing import TypeVar

from catalog.attacks import ATTACKS
from core.attacks.base import Attack

AttackT = TypeVar("AttackT", bound=type[Attack])

# A plain dict, filled by the @register_attack of each attack module.
IMPLEMENTATIONS: dict[str, type[Attack]] = {}


def register_attack(cls: AttackT) -> AttackT:
    """Class decorator: ``cls`` implements the catalog entry named ``cls.name``."""
    ATTACKS.get(cls.name)  # an implementation without a catalog entry is a mistake
    IMPLEMENTATIONS[cls.name] = cls
    return cls


def attack_class(name: str) -> type[Attack]:
    """The implementation of catalog attack ``name``."""
    ATTACKS.get(name)  # unknown names get the catalog's message
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"attack {name!r} is in the catalog but has no implementation") from None
