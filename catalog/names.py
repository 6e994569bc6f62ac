"""Pydantic types for catalog names: validated against the catalog, listed as an enum."""

from __future__ import annotations

from typing import Annotated

from catalog.archs import ARCHS
from catalog.attacks import ATTACKS
from catalog.datasets import DATASETS
from catalog.defenses import DEFENSES
from catalog.recipes import RECIPES
from catalog.registry import OneOf

ArchName = Annotated[str, OneOf(ARCHS)]
AttackName = Annotated[str, OneOf(ATTACKS)]
DatasetName = Annotated[str, OneOf(DATASETS)]
DefenseName = Annotated[str, OneOf(DEFENSES)]
RecipeName = Annotated[str, OneOf(RECIPES)]
