"""The one catalog of Bulwark's concepts (torch-free).

Datasets, architectures, defenses, recipes, attacks and job kinds are each described once
here; the CLI, the API, the request specs and the core derive their choices, defaults and
validation messages from these records, and the torch implementations register against them.
See docs/architecture.md for how to add an entry.
"""

from catalog.archs import ARCHS, ArchSpec, recognize_arch
from catalog.attacks import ATTACKS, DEFAULT_ATTACKS, AttackSettings, AttackSpec
from catalog.dataset_formats import (
    DATASET_FORMATS,
    DatasetFormatName,
    DatasetFormatSpec,
    infer_format,
)
from catalog.datasets import DATASETS, DatasetSpec, SplitConfig
from catalog.defenses import DEFAULT_DEFENSE, DEFENSES, DefenseSpec
from catalog.jobs import JOB_KINDS, JobKindName, JobKindSpec
from catalog.names import ArchName, AttackName, DatasetName, DefenseName, RecipeName
from catalog.recipes import RECIPES, RecipeSpec, Schedule, default_recipe
from catalog.registry import Catalog, OneOf, UnknownNameError

__all__ = [
    "ARCHS",
    "ATTACKS",
    "DATASETS",
    "DATASET_FORMATS",
    "DEFAULT_ATTACKS",
    "DEFAULT_DEFENSE",
    "DEFENSES",
    "JOB_KINDS",
    "RECIPES",
    "ArchName",
    "ArchSpec",
    "AttackName",
    "AttackSettings",
    "AttackSpec",
    "Catalog",
    "DatasetFormatName",
    "DatasetFormatSpec",
    "DatasetName",
    "DatasetSpec",
    "DefenseName",
    "DefenseSpec",
    "JobKindName",
    "JobKindSpec",
    "OneOf",
    "RecipeName",
    "RecipeSpec",
    "Schedule",
    "SplitConfig",
    "UnknownNameError",
    "default_recipe",
    "infer_format",
    "recognize_arch",
]
