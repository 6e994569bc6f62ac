"""Requests resolved into the core's configs: one path for the API, the worker and the CLI.

A request (``catalog.requests``) holds what the user chose; :func:`resolve_pretrain` and
:func:`resolve_audit` turn it into the full core config with the recipe's defaults and the
rescaling rules of ``core.config``. The CLI builds the same request from its flags, so the
same request gives the same config on every path. Torch-free.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from catalog.requests import (
    AuditJobCreate,
    AuditRequest,
    DatasetImportSpec,
    ImportJobSpec,
    PretrainJobCreate,
    PretrainRequest,
)
from core.config import AuditConfig, PretrainConfig, audit_config, pretrain_config

__all__ = [
    "AuditJobCreate",
    "AuditRequest",
    "DatasetImportSpec",
    "ImportJobSpec",
    "PretrainJobCreate",
    "PretrainRequest",
    "SpecError",
    "resolve_audit",
    "resolve_pretrain",
    "spec_errors",
]

# Fields of the core configs that the service fills in itself: never stored as requested.
SERVICE_FIELDS = frozenset({"model", "data_dir", "device", "reference"})


class SpecError(ValueError):
    """A request the core refuses; ``errors`` are pydantic-style, ``loc`` naming the field."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


def resolve_pretrain(
    request: PretrainRequest, *, data_dir: str | None = None, device: str | None = None
) -> PretrainConfig:
    """The core's config for ``request``; raises :class:`SpecError` naming every bad field.

    A tenant dataset (``dataset_id``) resolves to the catalog's tenant-dataset entry, read
    from ``data_dir``, the file the worker fetched; the request keeps the id.
    """
    try:
        return pretrain_config(
            dataset=request.dataset_entry,
            defense=request.defense,
            recipe=request.recipe,
            epochs=request.epochs,
            arch=request.arch,
            seed=request.seed,
            data_dir=data_dir,
            device=device,
            **request.overrides,
        )
    except ValidationError as error:
        raise SpecError(spec_errors(error, request.overrides, PretrainConfig, request)) from None


def resolve_audit(
    request: AuditRequest,
    *,
    model: str,
    data_dir: str | None = None,
    device: str | None = None,
) -> AuditConfig:
    """The core's config auditing the checkpoint at ``model``; raises :class:`SpecError`."""
    try:
        return audit_config(
            model=model,
            dataset=request.dataset_entry,
            data_dir=data_dir,
            device=device,
            attacks=tuple(request.attacks),
            attack_settings=request.attack_settings,
            pairs=request.effective_pairs,
            pair_sets=tuple(request.pair_sets) if request.pair_sets is not None else None,
            closest_pairs=request.closest_pairs,
            random_pairs=request.random_pairs,
            budget_attack=request.budget.attack if request.budget else None,
            budget_deltas=tuple(request.budget.deltas) if request.budget else (),
            budget_poisons=tuple(request.budget.poisons) if request.budget else (),
            targets_per_pair=request.targets_per_pair,
            iterations=request.iterations,
            delta=request.delta,
            seed=request.seed,
            **request.overrides,
        )
    except ValidationError as error:
        raise SpecError(spec_errors(error, request.overrides, AuditConfig, request)) from None


def stored_config(config: BaseModel) -> dict[str, Any]:
    """The resolved config as a job row keeps it: without the fields the service fills in."""
    return config.model_dump(mode="json", exclude=set(SERVICE_FIELDS))


def spec_errors(
    error: ValidationError,
    overrides: dict[str, Any],
    config: type[BaseModel],
    request: BaseModel | None = None,
) -> list[dict[str, Any]]:
    """The core config's errors, located in the request: ``overrides.<field>`` or ``<field>``.

    A whole-config error ("milestones must ...") is put on the field its message starts with.
    A config field that is not a field of ``request`` can only be set as an override, so its
    error is located there even when it came from a default (``overrides.split``).
    """
    request_fields = type(request).model_fields if request is not None else None
    errors = []
    for item in error.errors(include_url=False, include_context=False):
        if item["loc"]:
            field = str(item["loc"][0])
            rest = tuple(item["loc"][1:])
        else:
            words = item["msg"].removeprefix("Value error, ").split()
            field = words[0] if words and words[0] in config.model_fields else ""
            rest = ()
        overridable = (
            request_fields is not None
            and field in config.model_fields
            and field not in request_fields
            and field not in SERVICE_FIELDS
        )
        if field in overrides or overridable:
            loc: tuple[Any, ...] = ("overrides", field, *rest)
        else:
            loc = (field or "overrides", *rest)
        errors.append({"loc": loc, "msg": item["msg"], "type": item["type"]})
    return errors
