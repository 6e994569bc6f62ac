"""Response schemas, named by role (the request specs live in ``catalog.requests``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

from catalog import DatasetFormatName, JobKindName
from common.models import DatasetStatus, JobStatus, ModelSource
from core.report import AuditReport


def _as_utc(value: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; every stored timestamp is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UTCDateTime = Annotated[datetime, AfterValidator(_as_utc)]

# The largest values a request may carry into an Integer column, and a page's offset (Postgres
# takes OFFSET as a bigint; no tenant holds 2**31 rows): anything past them is a 422.
MAX_INT32 = 2**31 - 1
MAX_OFFSET = MAX_INT32


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    kind: JobKindName
    status: JobStatus
    phase: str
    progress: float  # share of the job done, 0 to 1
    message: str
    eta_seconds: float | None
    error: str | None  # why the job failed, in words a user can act on
    attempts: int
    cancel_requested: bool
    spec: dict[str, Any]  # the request as submitted
    # The core config the request resolved to (recipe defaults, rescaled schedules), without
    # the paths and device a worker fills in; None for import jobs.
    config: dict[str, Any] | None
    model_id: uuid.UUID | None  # the audited model (audit jobs)
    result_model_id: uuid.UUID | None  # the hardened model (pre-training jobs)
    report_url: str | None = None  # the ASR report (audit jobs that succeeded)
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    updated_at: UTCDateTime
    finished_at: UTCDateTime | None


class JobsPage(BaseModel):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    source: ModelSource
    arch: str
    num_classes: int
    in_channels: int
    feature_dim: int
    sha256: str
    size_bytes: int
    manifest: dict[str, Any]
    created_at: UTCDateTime
    weights_url: str
    card_url: str


class ModelsPage(BaseModel):
    items: list[ModelPublic]
    total: int
    limit: int
    offset: int


class ImageShape(BaseModel):
    channels: int
    height: int
    width: int


class DatasetPublic(BaseModel):
    """A tenant dataset. Its facts are null until its dataset job has read it (``ready``)."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    format: DatasetFormatName
    status: DatasetStatus  # pending, ready or failed
    error: str | None  # why the dataset job refused the upload (failed)
    sha256: str  # of the upload as sent
    size_bytes: int  # of the upload as sent
    classes: list[str] | None  # class names, by label
    image_shape: ImageShape | None
    train_counts: list[int] | None  # training images per class
    test_counts: list[int] | None  # test images per class
    job_id: uuid.UUID | None  # the dataset job that reads the upload
    created_at: UTCDateTime


class DatasetsPage(BaseModel):
    items: list[DatasetPublic]
    total: int
    limit: int
    offset: int


class SignaturePublic(BaseModel):
    """An Ed25519 signature over the canonical JSON of a report's body (``common.signing``)."""

    algorithm: Literal["ed25519"]
    key_id: str  # first 16 hex digits of sha256(raw public key)
    signature: str  # base64url, without padding, of the 64-byte signature
    signed: str  # what was signed: the canonical JSON of the report body


class ReportPublic(BaseModel):
    id: uuid.UUID
    job_id: uuid.UUID
    model_id: uuid.UUID | None
    created_at: UTCDateTime
    body: AuditReport  # the audit's report (core.report; schema bulwark-audit/1 or /2)
    # The deployment's signature over ``body``, made when served; check it with `bulwark verify`
    # against GET /.well-known/bulwark-signing-key.
    signature: SignaturePublic


class SigningKeyPublic(BaseModel):
    """The deployment's public key, which checks the signatures of its reports."""

    algorithm: Literal["ed25519"]
    key_id: str  # first 16 hex digits of sha256(raw public key)
    public_key: str  # the 32 raw bytes, base64
    public_key_pem: str  # SubjectPublicKeyInfo PEM


class HealthPublic(BaseModel):
    status: str
    checks: dict[str, str] = {}
