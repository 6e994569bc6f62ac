"""The base of the documents a worker stores and an API reads back (torch-free): the audit
report and the parts it holds (``core.report``, ``core.verdict``, ``catalog.policy``).

They refuse unknown fields, so that a typo or a foreign document is an error, not a silently
dropped field. One case must read anyway: during a rolling deploy an API older than its
workers reads reports that carry fields added since it was built. Validated with the context
:data:`IGNORE_NEWER_FIELDS` (``core.report.read_report(..., newer_fields="ignore")``), every
level of such a document drops the fields its model does not know and keeps the rest; the
fields it knows are validated as strictly as ever.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator

# The validation context under which stored documents drop the fields their model lacks.
IGNORE_NEWER_FIELDS = {"newer_fields": "ignore"}


class StoredModel(BaseModel):
    """A frozen model that refuses unknown fields, unless validated under
    :data:`IGNORE_NEWER_FIELDS` (then it drops them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_newer_fields(cls, data: Any, info: ValidationInfo) -> Any:
        context = info.context or {}
        if context.get("newer_fields") != "ignore" or not isinstance(data, dict):
            return data
        known = set(cls.model_fields) | {
            field.alias for field in cls.model_fields.values() if field.alias is not None
        }
        return {key: value for key, value in data.items() if key in known}
