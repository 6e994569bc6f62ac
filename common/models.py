"""The system of record: tenants, API keys, jobs, models, datasets and reports (SQLAlchemy 2.0 ORM).

The schema is created only by the Alembic migrations in ``migrations/``; these classes are
what autogenerate compares against, so a change here needs a new migration.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates

from catalog import DATASET_FORMATS, JOB_KINDS

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads this class attribute)
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
    }


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATUSES


FINISHED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class ModelSource(enum.StrEnum):
    UPLOAD = "upload"
    PRETRAIN = "pretrain"


class DatasetStatus(enum.StrEnum):
    PENDING = "pending"  # uploaded; its dataset job has not read it yet
    READY = "ready"  # read, checked and stored as the canonical npz
    FAILED = "failed"  # the dataset job refused it (``error`` says why); nothing is kept


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    # Stored as VARCHAR with a CHECK constraint: adding a value is a one-line migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A tenant's key, stored as HMAC-SHA256 with the deployment's key secret (``hash_scheme``
    ``hmac-sha256``; rows from before migration 0007 say ``sha256`` until first used). Keys are
    256-bit random, so no slow hash is needed; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the key's first characters, for humans
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    hash_scheme: Mapped[str] = mapped_column(
        String(16), default="hmac-sha256", server_default="sha256"
    )
    last_used_at: Mapped[datetime | None]  # written at most once a minute per key


class StoredModel(Base):
    """A feature extractor: uploaded, or produced by a pre-training job."""

    __tablename__ = "models"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[ModelSource] = mapped_column(_enum(ModelSource, "model_source"))
    arch: Mapped[str] = mapped_column(String(32))
    num_classes: Mapped[int] = mapped_column(Integer)
    in_channels: Mapped[int] = mapped_column(Integer)
    feature_dim: Mapped[int] = mapped_column(Integer)
    # Everything else about the model (input shape, normalization, class names, recipe, Pre.
    # Acc ...), as in the checkpoint's manifest.json.
    manifest: Mapped[dict[str, Any]]
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    weights_key: Mapped[str] = mapped_column(String(300))  # in the artifact store
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A deleted model keeps its row as a tombstone (its files are removed): reads answer 404,
    # a repeated DELETE is 204, and the jobs and reports that name it keep their ids.
    deleted_at: Mapped[datetime | None]


class TenantDataset(Base):
    """A tenant's own image set: uploaded, read by a ``dataset`` job, audited by ``dataset_id``.

    The upload waits in the artifact store until its job reads it; a ready dataset is kept
    as one canonical npz (``data_key``) and its facts, which the API checks audits against.
    A deleted dataset keeps its row as a tombstone (``deleted_at``), so a repeated DELETE is
    answered the same.
    """

    __tablename__ = "datasets"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))  # a name of catalog.DATASET_FORMATS
    status: Mapped[DatasetStatus] = mapped_column(
        _enum(DatasetStatus, "dataset_status"), default=DatasetStatus.PENDING
    )
    error: Mapped[str | None] = mapped_column(Text)  # why the dataset job refused it
    sha256: Mapped[str] = mapped_column(String(64))  # of the upload as sent
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # of the upload as sent
    data_key: Mapped[str | None] = mapped_column(String(300))  # the canonical npz, once ready
    # The facts read from the files (core.datasets.tenant.dataset_facts), once ready.
    classes: Mapped[list[str] | None] = mapped_column(JSON)  # class names, by label
    image_shape: Mapped[dict[str, Any] | None]  # {"channels", "height", "width"}
    train_counts: Mapped[list[int] | None] = mapped_column(JSON)  # training images per class
    test_counts: Mapped[list[int] | None] = mapped_column(JSON)  # test images per class
    # The dataset job that reads the upload.
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]

    @validates("format")
    def _known_format(self, _key: str, name: str) -> str:
        return DATASET_FORMATS.check(name)


class Job(Base):
    """A job of one of the kinds of ``catalog.JOB_KINDS``; its id is also the Celery task id."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    # A name of ``catalog.JOB_KINDS``, checked in code (not by a CHECK constraint), so a new
    # kind of job needs no migration.
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.QUEUED, index=True
    )
    spec: Mapped[dict[str, Any]]  # the validated request, as JSON
    # The core config the request resolved to at submission (``common.specs.stored_config``:
    # without the paths and device the worker fills in); None for import jobs.
    config: Mapped[dict[str, Any] | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # The audited model (audit jobs); the produced one is result_model_id.
    model_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    phase: Mapped[str] = mapped_column(String(64), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    lease_expires_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(200))
    result_model_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]
    # A deleted (finished) job keeps its row as a tombstone; its artifacts are removed.
    deleted_at: Mapped[datetime | None]
    # The audit an ``audit-part`` job crafts a part of (worker.tasks: an audit fanned out
    # across workers); None for every job a tenant submitted.
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )

    @validates("kind")
    def _known_kind(self, _key: str, kind: str) -> str:
        return JOB_KINDS.check(kind)


class Report(Base):
    """An audit's ASR report (one per audit job)."""

    __tablename__ = "reports"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), unique=True
    )
    model_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), index=True
    )
    body: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StoredPolicy(Base):
    """One version of a tenant's audit policy (``catalog.policy.Policy`` as JSON); the
    newest version is in force, older ones stay so a verdict can name the one it used."""

    __tablename__ = "policies"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    body: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Webhook(Base):
    """An endpoint a tenant registered for job state changes; ``secret`` signs deliveries
    (HMAC-SHA256) and is shown to the tenant once, at creation."""

    __tablename__ = "webhooks"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(200))
    events: Mapped[list[str] | None] = mapped_column(JSON)  # None: every event
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]


class WebhookDelivery(Base):
    """One event sent (or being sent) to one webhook: its payload, attempts and outcome."""

    __tablename__ = "webhook_deliveries"
    # The delivery pump polls pending rows by due time twice a second: index only those, so
    # the poll stays cheap however long the delivery log grows.
    __table_args__ = (
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    webhook_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhooks.id", ondelete="CASCADE"), index=True
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[uuid.UUID | None]
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    response_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    next_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
