"""Job kinds: what a job of each kind takes as its spec, and the Celery task that runs it.

The API sends tasks by these names and never imports the worker; the worker registers one
task per entry under the same name (``worker/tasks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, Field

from catalog.registry import Catalog, OneOf
from catalog.requests import (
    AuditJobCreate,
    DatasetImportSpec,
    ImportJobSpec,
    PretrainJobCreate,
)


class AuditPartSpec(BaseModel):
    """An ``audit-part`` job: one part of its audit (``jobs.parent_id``), as
    ``core.audit.audit_parts`` names it (``model-fc-round0``, ``reference-bp-round0``). The
    model, dataset, config and reference are the audit's own."""

    part: str = Field(min_length=1, max_length=64)


@dataclass(frozen=True)
class JobKindSpec:
    name: str
    title: str
    spec: type[BaseModel]  # the job row's ``spec`` validates against this
    task: str  # the Celery task name
    has_report: bool = False  # whether a succeeded job has a report


JOB_KINDS: Catalog[JobKindSpec] = Catalog(
    "job kind",
    [
        JobKindSpec(
            name="pretrain",
            title="robust pre-training of a feature extractor",
            spec=PretrainJobCreate,
            task="bulwark.pretrain",
        ),
        JobKindSpec(
            name="audit",
            title="a clean-label poisoning audit of a stored model",
            spec=AuditJobCreate,
            task="bulwark.audit",
            has_report=True,
        ),
        JobKindSpec(
            name="audit-part",
            title="one attack of an audit crafted on any worker (internal: its audit shows it)",
            spec=AuditPartSpec,
            task="bulwark.audit_part",
        ),
        JobKindSpec(
            name="import",
            title="a torch state-dict upload converted to safetensors by a worker",
            spec=ImportJobSpec,
            task="bulwark.import",
        ),
        JobKindSpec(
            name="dataset",
            title="a tenant's dataset upload read, checked and stored as a canonical npz",
            spec=DatasetImportSpec,
            task="bulwark.dataset",
        ),
    ],
)

JobKindName = Annotated[str, OneOf(JOB_KINDS)]
