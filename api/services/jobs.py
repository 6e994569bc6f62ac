"""Submitting, listing, cancelling jobs and reading their reports."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import BrokerUnavailableError, ConflictError, InvalidFieldError, NotFoundError
from api.schemas import JobPublic
from common.models import Job, JobKind, JobStatus, Report, StoredModel, Tenant, utcnow
from common.queue import TASK_FOR_KIND
from common.settings import Settings
from common.specs import AuditJobCreate, ImportJobSpec, PretrainJobCreate, SpecError

logger = logging.getLogger(__name__)

# Classes of each named dataset, to refuse an audit whose model cannot fit the data.
DATASET_CLASSES = {"digits": 10, "fashion-mnist": 10, "mnist": 10, "cifar10": 10,
                   "tiny-imagenet": 200}  # fmt: skip


def job_public(job: Job) -> JobPublic:
    public = JobPublic.model_validate(job)
    if job.kind == JobKind.AUDIT and job.status == JobStatus.SUCCEEDED:
        public.report_url = f"/v1/jobs/{job.id}/report"
    return public


def submit_pretrain(
    *,
    session: Session,
    celery: Celery,
    settings: Settings,
    tenant: Tenant,
    spec: PretrainJobCreate,
    idempotency_key: str | None,
) -> Job:
    try:
        spec.to_config()  # the core's own checks, torch-free
    except SpecError as error:
        first = error.errors[0]
        raise InvalidFieldError(("body", *first["loc"]), first["msg"]) from None
    return _submit(
        session=session, celery=celery, settings=settings, tenant=tenant,
        kind=JobKind.PRETRAIN, spec=spec.model_dump(mode="json"), model_id=None,
        idempotency_key=idempotency_key,
    )  # fmt: skip


def submit_audit(
    *,
    session: Session,
    celery: Celery,
    settings: Settings,
    tenant: Tenant,
    spec: AuditJobCreate,
    idempotency_key: str | None,
) -> Job:
    model = session.get(StoredModel, spec.model_id)
    if model is None or model.tenant_id != tenant.id:
        valid = session.scalars(
            select(StoredModel.id).where(StoredModel.tenant_id == tenant.id)
            .order_by(StoredModel.created_at.desc()).limit(50)
        ).all()  # fmt: skip
        raise NotFoundError(
            f"no model {spec.model_id}; audit one of valid_model_ids (your newest 50)",
            loc=["body", "model_id"],
            valid_model_ids=[str(v) for v in valid],
        )
    classes = DATASET_CLASSES[spec.dataset]
    if model.num_classes != classes:
        raise InvalidFieldError(
            ("body", "dataset"),
            f"{spec.dataset} has {classes} classes but model {model.id} has {model.num_classes}",
        )
    for index, pair in enumerate(spec.effective_pairs):
        if max(pair) >= classes:
            raise InvalidFieldError(
                ("body", "pairs", index), f"class indices must be below {classes}, got {pair}"
            )
    try:
        spec.to_config(model=model.weights_key)  # the core's own checks, torch-free
    except SpecError as error:
        first = error.errors[0]
        raise InvalidFieldError(("body", *first["loc"]), first["msg"]) from None
    return _submit(
        session=session, celery=celery, settings=settings, tenant=tenant, kind=JobKind.AUDIT,
        spec=spec.model_dump(mode="json"), model_id=model.id, idempotency_key=idempotency_key,
    )  # fmt: skip


def submit_import(
    *,
    session: Session,
    celery: Celery,
    settings: Settings,
    tenant: Tenant,
    job_id: uuid.UUID,
    spec: ImportJobSpec,
) -> Job:
    """Queue the conversion of a torch upload already in the store at ``spec.upload_key``."""
    return _submit(
        session=session, celery=celery, settings=settings, tenant=tenant, kind=JobKind.IMPORT,
        spec=spec.model_dump(mode="json"), model_id=None, idempotency_key=None, job_id=job_id,
    )  # fmt: skip


def _submit(
    *,
    session: Session,
    celery: Celery,
    settings: Settings,
    tenant: Tenant,
    kind: JobKind,
    spec: dict[str, Any],
    model_id: uuid.UUID | None,
    idempotency_key: str | None,
    job_id: uuid.UUID | None = None,
) -> Job:
    """Commit the job row, then enqueue it by task name with the job id as task id.

    With an ``Idempotency-Key`` a repeated request returns the first job (and enqueues nothing
    new); the same key with a different request is a conflict.
    """
    if idempotency_key is not None:
        existing = _job_by_idempotency_key(session, tenant, idempotency_key)
        if existing is not None:
            return _same_request_or_conflict(existing, kind, spec)
    job = Job(
        id=job_id or uuid.uuid4(), tenant_id=tenant.id, kind=kind, spec=spec, model_id=model_id,
        idempotency_key=idempotency_key,
    )  # fmt: skip
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        existing = _job_by_idempotency_key(session, tenant, idempotency_key or "")
        if existing is None:
            raise
        return _same_request_or_conflict(existing, kind, spec)
    enqueue(session=session, celery=celery, settings=settings, job=job)
    return job


def enqueue(*, session: Session, celery: Celery, settings: Settings, job: Job) -> None:
    """Send the job's task; if the broker cannot take it, the job fails with the reason."""
    try:
        celery.send_task(
            TASK_FOR_KIND[job.kind], args=[str(job.id)], task_id=str(job.id), queue=settings.queue
        )
    except Exception as error:  # kombu raises many connection error types
        logger.exception("could not enqueue job %s", job.id)
        job.status, job.error, job.finished_at = (
            JobStatus.FAILED, f"the job queue is unreachable ({error}); submit again later",
            utcnow(),
        )  # fmt: skip
        session.commit()
        raise BrokerUnavailableError(f"the job queue is unreachable: {error}") from error


def _job_by_idempotency_key(session: Session, tenant: Tenant, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key))


def _same_request_or_conflict(job: Job, kind: JobKind, spec: dict[str, Any]) -> Job:
    if job.kind != kind or job.spec != spec:
        raise ConflictError(
            f"Idempotency-Key was used for job {job.id} with a different request; "
            "use a new key for a new job"
        )
    return job


def get_job(*, session: Session, tenant: Tenant, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id:
        raise NotFoundError(f"no job {job_id}")
    return job


def list_jobs(
    *,
    session: Session,
    tenant: Tenant,
    kind: JobKind | None,
    status: JobStatus | None,
    limit: int,
    offset: int,
) -> tuple[list[Job], int]:
    query = select(Job).where(Job.tenant_id == tenant.id)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if status is not None:
        query = query.where(Job.status == status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    jobs = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    ).all()
    return list(jobs), total


def cancel_job(*, session: Session, tenant: Tenant, job_id: uuid.UUID) -> Job:
    """A queued job is cancelled at once; a running one is flagged, and its worker stops at
    the next progress step. Conditional updates, so a worker that starts the job at the same
    moment cannot be missed."""
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    now = utcnow()
    cancelled_queued = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, phase="cancelled", finished_at=now,
                cancel_requested=True, message="cancelled before it started", updated_at=now)
    ).rowcount  # fmt: skip
    if not cancelled_queued:
        flagged = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.RUNNING)
            .values(cancel_requested=True, updated_at=now)
        ).rowcount
        if not flagged:
            session.rollback()
            raise ConflictError(f"job {job.id} already {job.status.value}; nothing to cancel")
    session.commit()
    session.refresh(job)
    return job


def get_report(*, session: Session, tenant: Tenant, job_id: uuid.UUID) -> Report:
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    if job.kind != JobKind.AUDIT:
        raise NotFoundError(f"job {job.id} is a {job.kind.value} job; only audits have reports")
    report = session.scalar(select(Report).where(Report.job_id == job.id))
    if report is None:
        raise ConflictError(
            f"job {job.id} is {job.status.value}; the report exists once it succeeded",
            status=job.status.value,
            error=job.error,
        )
    return report
