"""What a client asks for: the request bodies of jobs, shared by the API, the worker and the CLI.

A request holds only what the user chose; ``common.specs`` resolves it into the core's full
config (recipe defaults, rescaled schedules, ranges), the same way for HTTP and the CLI.
Fields the service sets itself (paths, devices) cannot be given as overrides: a tenant names
data by a built-in dataset or by the id of one of its own datasets, never by server path.
"""

from __future__ import annotations

import math
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from catalog.attacks import ATTACKS, DEFAULT_ATTACKS
from catalog.dataset_formats import DatasetFormatName
from catalog.defenses import DEFAULT_DEFENSE
from catalog.names import ArchName, AttackName, DatasetName, DefenseName, RecipeName

# Paper's target/poison pairs (Appendix A) by CIFAR-10 class index: airplane/horse,
# bird/automobile, deer/automobile, frog/cat. Other datasets use the same indices.
PAPER_PAIRS: tuple[tuple[int, int], ...] = ((0, 7), (2, 1), (4, 1), (6, 3))
# How an audit chooses its class pairs besides explicit ones (core.audit.choose_pairs):
# ``closest``, the pairs the clean model confuses most (its own feature space); ``paper``, the
# paper's pairs, where the dataset has CIFAR-10's classes; ``random``, drawn from the seed.
PairSetName = Literal["closest", "paper", "random"]
PAIR_SETS: tuple[PairSetName, ...] = ("closest", "paper", "random")
DEFAULT_PAIR_SETS: tuple[PairSetName, ...] = ("closest", "random")
MAX_BUDGET_POINTS = 8
MAX_SEED = 2**32 - 1
# The catalog dataset a tenant dataset (``dataset_id``) is read as: the worker fetches its
# canonical npz and reads it with this entry's reader.
TENANT_DATASET_ENTRY = "npz"

# Config fields that are request fields of their own or set by the service.
RESERVED_PRETRAIN_OVERRIDES = frozenset(
    {"dataset", "data_dir", "device", "arch", "defense", "recipe", "seed", "epochs"}
)
RESERVED_AUDIT_OVERRIDES = frozenset(
    {
        "model",
        "dataset",
        "data_dir",
        "device",
        "attacks",
        "attack_settings",
        "pairs",
        "pair_sets",
        "closest_pairs",
        "random_pairs",
        "reference",
        "budget_attack",
        "budget_deltas",
        "budget_poisons",
        "targets_per_pair",
        "iterations",
        "delta",
        "seed",
    }
)


# Bounds every request value must keep so that the database can hold it: a JSON column
# takes no NUL character and no NaN or Infinity, a name column at most NAME_MAX characters.
NAME_MAX = 200
MAX_CLASS_INDEX = 100_000
INT64_MAX = 2**63 - 1
MAX_JSON_DEPTH = 32
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# Requests refuse NaN and Infinity in their number fields (422), not only in the core.
STRICT_REQUEST = ConfigDict(extra="forbid", allow_inf_nan=False)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a model, dataset or job, or None if it can."""
    if len(name) > NAME_MAX:
        return f"at most {NAME_MAX} characters, got {len(name)}"
    if CONTROL_CHARACTERS.search(name):
        return "no control characters (NUL, newlines, escapes) in a name"
    return None


def _checked_name(name: str | None) -> str | None:
    if name is not None and (problem := name_problem(name)) is not None:
        raise ValueError(problem)
    return name


def json_value_problem(value: Any, depth: int = 0) -> str | None:
    """Why a free-form JSON value (overrides, settings) cannot be stored, or None."""
    if depth > MAX_JSON_DEPTH:
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN and Infinity are not numbers a job can use"
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not -INT64_MAX <= value <= INT64_MAX:
        return f"integer {value} is out of range"
    if isinstance(value, str) and "\x00" in value:
        return "a NUL character in a string"
    if isinstance(value, dict):
        for key, item in value.items():
            problem = json_value_problem(key, depth + 1) or json_value_problem(item, depth + 1)
            if problem is not None:
                return f"{key!s:.40}: {problem}"
    if isinstance(value, list | tuple):
        for item in value:
            if (problem := json_value_problem(item, depth + 1)) is not None:
                return problem
    return None


def _json_safe(value: Any) -> Any:
    if (problem := json_value_problem(value)) is not None:
        raise ValueError(problem)
    return value


def _no_reserved(overrides: dict[str, Any], reserved: frozenset[str]) -> dict[str, Any]:
    taken = sorted(reserved & overrides.keys())
    if taken:
        raise ValueError(f"set {taken} as top-level fields, not overrides")
    return overrides


DATASET_FIELD = "a built-in dataset; or give dataset_id instead"
DATASET_ID_FIELD = "one of your ready datasets (POST /v1/datasets), in place of dataset"


def _one_dataset(dataset: str | None, dataset_id: uuid.UUID | None) -> None:
    """Exactly one of ``dataset`` and ``dataset_id``."""
    if (dataset is None) == (dataset_id is None):
        given = "both" if dataset is not None else "neither"
        raise ValueError(
            "give exactly one of dataset (a built-in dataset) and dataset_id (one of your "
            f"datasets); got {given}"
        )


def _dataset_entry(dataset: str | None) -> str:
    return TENANT_DATASET_ENTRY if dataset is None else dataset


class PretrainRequest(BaseModel):
    """A robust pre-training run: a named recipe scaled to ``epochs``, plus overrides."""

    model_config = STRICT_REQUEST

    dataset: DatasetName | None = Field(None, description=DATASET_FIELD)
    dataset_id: uuid.UUID | None = Field(None, description=DATASET_ID_FIELD)
    arch: ArchName = "resnet18"
    defense: DefenseName = DEFAULT_DEFENSE
    recipe: RecipeName | None = Field(None, description="default: the paper's for the dataset")
    epochs: int | None = Field(None, ge=1, le=10_000, description="default: the recipe's")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='any other pre-training config field, e.g. {"lr": 0.05, "batch_size": 256}',
    )

    @field_validator("overrides")
    @classmethod
    def _no_reserved_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        return _json_safe(_no_reserved(overrides, RESERVED_PRETRAIN_OVERRIDES))

    @model_validator(mode="after")
    def _exactly_one_dataset(self) -> PretrainRequest:
        _one_dataset(self.dataset, self.dataset_id)
        return self

    @property
    def dataset_entry(self) -> str:
        """The catalog dataset read: ``dataset``, or the tenant-dataset entry for an id."""
        return _dataset_entry(self.dataset)


class PretrainJobCreate(PretrainRequest):
    name: str | None = Field(
        None, max_length=NAME_MAX, description="name of the produced model (no control characters)"
    )

    @field_validator("name")
    @classmethod
    def _storable_name(cls, name: str | None) -> str | None:
        return _checked_name(name)


class BudgetRequest(BaseModel):
    """A budget curve: the audit re-runs one attack at each delta (with the audit's poisons)
    and at each poison count (with the audit's delta)."""

    model_config = STRICT_REQUEST

    attack: AttackName | None = Field(
        None,
        description="the attack swept (one of the audit's); default: bp if run, else the first",
    )
    deltas: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=list,
        max_length=MAX_BUDGET_POINTS,
        description="l_inf budgets in [0,1] pixels, e.g. [4/255, 8/255, 16/255, 25.5/255]",
    )
    poisons: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=list,
        max_length=MAX_BUDGET_POINTS,
        description="poisons per instance, e.g. [1, 5, 10, 25]",
    )


class AuditRequest(BaseModel):
    """An audit under the paper's protocol: which attacks, pairs, targets and budget."""

    model_config = STRICT_REQUEST

    dataset: DatasetName | None = Field(
        None, description=f"{DATASET_FIELD}; the model's classes must match the dataset's"
    )
    dataset_id: uuid.UUID | None = Field(
        None,
        description=f"{DATASET_ID_FIELD}; a class count other than the model's gets a fresh head",
    )
    attacks: list[AttackName] = Field(default_factory=lambda: list(DEFAULT_ATTACKS), min_length=1)
    attack_settings: dict[AttackName, dict[str, Any]] = Field(
        default_factory=dict,
        description='per-attack settings, e.g. {"fc": {"mu": 0.2}, "bp": {"poisons": 10}}',
    )
    pairs: list[tuple[int, int]] | None = Field(
        None,
        min_length=1,
        description="explicit (target class, poison class) pairs, audited besides pair_sets",
    )
    pair_sets: list[PairSetName] | None = Field(
        None,
        description="how more pairs are chosen: closest (the clean model's most confused "
        "pairs), paper (CIFAR-10's classes only), random (seeded); default: closest and random "
        "when no pairs are given, none when they are",
    )
    closest_pairs: int = Field(2, ge=0, le=1000, description="pairs the closest set adds")
    random_pairs: int = Field(2, ge=0, le=1000, description="pairs the random set adds")
    reference: Literal["auto", "none"] | uuid.UUID = Field(
        "auto",
        description="the undefended reference audited on the same instances: one of your "
        "model ids, auto (Bulwark pre-trains the model's architecture without a defense on "
        "the audit's data, cached and reused; a torch.export program has no auto reference) "
        "or none",
    )
    budget: BudgetRequest | None = Field(None, description="an optional budget curve")
    targets_per_pair: int = Field(10, ge=1, le=10_000)
    iterations: int = Field(500, ge=1, le=100_000, description="optimization steps per attack")
    delta: float = Field(25.5 / 255, gt=0, le=1, description="l_inf budget in [0,1] pixels")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='any other audit config field, e.g. {"retrain_epochs": 20}',
    )

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
            if target == poison or min(target, poison) < 0:
                raise ValueError(
                    f"pair ({target}, {poison}): classes must be distinct non-negative indices"
                )
            if max(target, poison) > MAX_CLASS_INDEX:
                raise ValueError(
                    f"pair ({target}, {poison}): class indices are at most {MAX_CLASS_INDEX}"
                )
        if pairs is not None and len(set(pairs)) != len(pairs):
            raise ValueError(f"pairs repeat: {pairs}")
        return pairs

    @field_validator("overrides")
    @classmethod
    def _no_reserved_audit_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        return _json_safe(_no_reserved(overrides, RESERVED_AUDIT_OVERRIDES))

    @field_validator("attack_settings")
    @classmethod
    def _storable_settings(cls, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return _json_safe(settings)

    @model_validator(mode="after")
    def _settings_for_chosen_attacks(self) -> AuditRequest:
        unused = sorted(set(self.attack_settings) - set(self.attacks))
        if unused:
            raise ValueError(f"attack_settings names {unused}, which are not in attacks")
        return self

    @model_validator(mode="after")
    def _exactly_one_dataset(self) -> AuditRequest:
        _one_dataset(self.dataset, self.dataset_id)
        return self

    @property
    def dataset_entry(self) -> str:
        """The catalog dataset read: ``dataset``, or the tenant-dataset entry for an id."""
        return _dataset_entry(self.dataset)

    @property
    def effective_pairs(self) -> tuple[tuple[int, int], ...]:
        """The explicit pairs (the sets' pairs are chosen by the audit itself)."""
        return tuple(self.pairs) if self.pairs is not None else ()

    def attack_poisons(self) -> int:
        """The most poisons any chosen attack uses per instance (at its defaults)."""
        return max(
            int(
                self.attack_settings.get(name, {}).get("poisons", ATTACKS.get(name).default_poisons)
            )
            for name in self.attacks
        )


class AuditJobCreate(AuditRequest):
    model_id: uuid.UUID


class ImportJobSpec(BaseModel):
    """A torch ``.pt`` upload waiting in the artifact store, with its form's metadata.

    The API never reads the file (it would have to unpickle it); a worker reads it with
    ``torch.load(weights_only=True)``, checks it against this metadata and stores safetensors.
    A ``torch.export`` program (``format="export"``) has no Bulwark ``arch``, and ``output``
    says whether it ends in logits (its last linear layer is the head) or in features. An
    ONNX graph (``format="onnx"``, accepted where the deployment enables ONNX) is converted on
    the worker (``core.onnx_import``), re-exported with ``torch.export`` on ``input_shape`` and
    then checked and stored exactly as an uploaded ``.pt2``.
    """

    model_config = STRICT_REQUEST

    upload_key: str
    filename: str | None = None
    sha256: str  # of the uploaded .pt file
    name: str | None = None
    format: Literal["torch-state-dict", "export", "onnx"] = "torch-state-dict"
    arch: ArchName | None = None  # required for a torch state dict
    input_shape: list[int] = Field(min_length=3, max_length=3)
    classes: list[str] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    output: Literal["logits", "features"] = "logits"  # what an export or onnx graph outputs

    @model_validator(mode="after")
    def _state_dicts_name_their_arch(self) -> ImportJobSpec:
        if self.format == "torch-state-dict" and self.arch is None:
            raise ValueError("a torch state dict needs its arch")
        return self


class DatasetImportSpec(BaseModel):
    """A tenant's dataset upload waiting in the artifact store for the worker that reads it.

    The API checked only the container (member names and declared sizes); the worker reads
    the arrays or images (``core.datasets.tenant``), stores the canonical npz and the facts
    on the dataset's row, and deletes the upload either way.
    """

    model_config = STRICT_REQUEST

    dataset_id: uuid.UUID
    upload_key: str
    format: DatasetFormatName
    filename: str | None = None
    sha256: str  # of the upload as sent
