"""Submitting, listing, cancelling jobs and reading their reports."""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from datetime import datetime
from typing import Any, Literal

from celery import Celery
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import BrokerUnavailableError, ConflictError, InvalidFieldError, NotFoundError
from api.ratelimit import check_active_jobs, check_audit_size, check_pretrain_size
from api.schemas import JobPublic
from catalog import DATASETS, JOB_KINDS, SplitConfig
from common.artifacts import ArtifactStore, import_upload_key
from common.audit_parts import WAITING_FOR_PARTS, stop_audit_parts
from common.db import rows_matched
from common.models import (
    DatasetStatus,
    Job,
    JobStatus,
    Report,
    StoredModel,
    Tenant,
    TenantDataset,
    utcnow,
)
from common.queue import task_name
from common.settings import Settings
from common.specs import (
    AuditJobCreate,
    DatasetImportSpec,
    ImportJobSpec,
    PretrainJobCreate,
    SpecError,
    resolve_audit,
    resolve_pretrain,
    stored_config,
)
from common.webhooks import record_job_event

logger = logging.getLogger(__name__)

SortOrder = Literal["asc", "desc"]  # by created_at


def job_public(job: Job) -> JobPublic:
    public = JobPublic.model_validate(job)
    if JOB_KINDS.get(job.kind).has_report and job.status == JobStatus.SUCCEEDED:
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
    dataset = tenant_dataset(session, tenant, spec.dataset_id) if spec.dataset_id else None
    try:
        config = resolve_pretrain(spec)  # the core's own checks, torch-free
    except SpecError as error:
        raise InvalidFieldError(_in_body(error.errors)) from None
    if config.devices > settings.max_devices_per_job:
        raise InvalidFieldError.at(
            ("body", "overrides", "devices"),
            f"devices={config.devices} GPUs for one job, but this service allows at most "
            f"{settings.max_devices_per_job} (setting BULWARK_MAX_DEVICES_PER_JOB)",
        )
    if dataset is not None:
        errors = dataset_errors(dataset, split=config.resolved_split)
        if errors:
            raise InvalidFieldError(errors)
    check_pretrain_size(settings, config, dataset)  # epochs x images within the deployment's
    return _submit(
        session=session,
        celery=celery,
        settings=settings,
        tenant=tenant,
        kind="pretrain",
        spec=spec.model_dump(mode="json"),
        config=stored_config(config),
        model_id=None,
        idempotency_key=idempotency_key,
    )


def submit_audit(
    *,
    session: Session,
    celery: Celery,
    settings: Settings,
    tenant: Tenant,
    spec: AuditJobCreate,
    idempotency_key: str | None,
) -> Job:
    """Check the audit against its model and the core's config, every problem in one 422."""
    # Locked (shared) until the job row is committed, so a concurrent DELETE of the model
    # either sees this job and refuses, or deletes first and this answers 404.
    model = session.get(StoredModel, spec.model_id, with_for_update={"read": True})
    if model is None or model.tenant_id != tenant.id or model.deleted_at is not None:
        valid = session.scalars(
            select(StoredModel.id)
            .where(StoredModel.tenant_id == tenant.id, StoredModel.deleted_at.is_(None))
            .order_by(StoredModel.created_at.desc())
            .limit(50)
        ).all()
        raise NotFoundError(
            f"no model {spec.model_id}; audit one of valid_model_ids (your newest 50)",
            loc=["body", "model_id"],
            valid_model_ids=[str(v) for v in valid],
        )
    dataset = tenant_dataset(session, tenant, spec.dataset_id) if spec.dataset_id else None
    errors = _class_errors(spec, model) + _reference_errors(session, tenant, spec, model)
    config = None
    try:
        # The store key stands in for the model's local folder, which the worker fills in
        # (stored_config leaves it out). The core's own checks, torch-free.
        config = resolve_audit(spec, model=model.weights_key)
    except SpecError as error:
        errors += _in_body(error.errors)
    if dataset is not None and config is not None:
        # The dataset's own classes decide; a class count other than the model's gets a
        # fresh head (core.audit), so only channels, pairs and counts are checked.
        errors += dataset_errors(
            dataset,
            split=config.resolved_split,
            pairs=spec.effective_pairs,
            targets_per_pair=spec.targets_per_pair,
            in_channels=model.in_channels,
            pair_sets=tuple(config.pair_sets or ()),
        )
    if errors or config is None:
        raise InvalidFieldError(errors)
    check_audit_size(settings, config)  # iterations x targets x poisons within the deployment's
    return _submit(
        session=session,
        celery=celery,
        settings=settings,
        tenant=tenant,
        kind="audit",
        spec=spec.model_dump(mode="json"),
        config=stored_config(config),
        model_id=model.id,
        idempotency_key=idempotency_key,
    )


def _reference_errors(
    session: Session, tenant: Tenant, spec: AuditJobCreate, model: StoredModel
) -> list[dict[str, Any]]:
    """A reference named by id must be another model of the tenant's that takes the same
    images (the audit runs the same instances through both)."""
    if not isinstance(spec.reference, uuid.UUID):
        return []
    reference = session.get(StoredModel, spec.reference, with_for_update={"read": True})
    loc = ("body", "reference")
    if reference is None or reference.tenant_id != tenant.id or reference.deleted_at is not None:
        return [{"loc": loc, "msg": f"no model {spec.reference} of yours to use as the reference"}]
    if reference.id == model.id:
        return [{"loc": loc, "msg": "the reference must be another model than the audited one"}]
    if reference.in_channels != model.in_channels:
        return [
            {
                "loc": loc,
                "msg": f"the reference takes {reference.in_channels}-channel images, the "
                f"audited model {model.in_channels}",
            }
        ]
    return []


def _class_errors(spec: AuditJobCreate, model: StoredModel) -> list[dict[str, Any]]:
    """The dataset's classes against the model's head and the pairs' class indices.

    A dataset whose class count is known only once its files are read (an image folder) is
    checked by the worker instead.
    """
    classes = DATASETS.get(spec.dataset_entry).num_classes
    if classes is None:
        return []
    errors: list[dict[str, Any]] = []
    # A feature-only exported model has no head ("head": "none"): any class count fits, the
    # audit re-trains a fresh head on the dataset's classes.
    if model.num_classes != classes and model.manifest.get("head") != "none":
        errors.append(
            {
                "loc": ("body", "dataset"),
                "msg": f"{spec.dataset} has {classes} classes but model {model.id} has "
                f"{model.num_classes}",
            }
        )
    for index, pair in enumerate(spec.effective_pairs):
        if max(pair) >= classes:
            errors.append(
                {
                    "loc": ("body", "pairs", index),
                    "msg": f"class indices must be below {classes}, got {list(pair)}",
                }
            )
    return errors


def tenant_dataset(session: Session, tenant: Tenant, dataset_id: uuid.UUID) -> TenantDataset:
    """The tenant's ready dataset ``dataset_id`` (404 naming the field if it is not the
    tenant's, 409 if not ready), locked against a DELETE until the job row is committed."""
    dataset = session.get(TenantDataset, dataset_id, with_for_update={"read": True})
    if dataset is None or dataset.tenant_id != tenant.id or dataset.deleted_at is not None:
        raise NotFoundError(
            f"no dataset {dataset_id}; give one of yours (GET /v1/datasets)",
            loc=["body", "dataset_id"],
        )
    if dataset.status != DatasetStatus.READY:
        raise ConflictError(
            f"dataset {dataset.id} is {dataset.status.value}; only a ready dataset can be used",
            loc=["body", "dataset_id"],
            dataset_status=dataset.status.value,
            error=dataset.error,
        )
    return dataset


def dataset_errors(
    dataset: TenantDataset,
    *,
    split: SplitConfig,
    pairs: tuple[tuple[int, int], ...] = (),
    targets_per_pair: int | None = None,
    in_channels: int | None = None,
    pair_sets: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """A request's choices against a tenant dataset's recorded facts, every problem named.

    ``pair_sets`` may pick any class as a target (``core.audit.choose_pairs``), so with sets
    every class needs ``targets_per_pair`` test images; explicit pairs need them only for
    their own target classes."""
    classes = len(dataset.classes or ())
    train, test = dataset.train_counts or [], dataset.test_counts or []
    channels = (dataset.image_shape or {}).get("channels")
    errors: list[dict[str, Any]] = []
    if in_channels is not None and channels != in_channels:
        errors.append(
            {
                "loc": ("body", "dataset_id"),
                "msg": f"dataset {dataset.id} has {channels}-channel images but the model takes "
                f"{in_channels}",
            }
        )
    for index, pair in enumerate(pairs):
        if max(pair) >= classes:
            errors.append(
                {
                    "loc": ("body", "pairs", index),
                    "msg": f"class indices must be below {classes} (dataset {dataset.id}), "
                    f"got {list(pair)}",
                }
            )
        elif targets_per_pair is not None and test[pair[0]] < targets_per_pair:
            errors.append(
                {
                    "loc": ("body", "targets_per_pair"),
                    "msg": f"targets_per_pair={targets_per_pair} but dataset {dataset.id} has "
                    f"{test[pair[0]]} test images of class {pair[0]}",
                }
            )
    if pair_sets and targets_per_pair is not None and test and min(test) < targets_per_pair:
        label = min(range(len(test)), key=lambda index: test[index])
        errors.append(
            {
                "loc": ("body", "targets_per_pair"),
                "msg": f"targets_per_pair={targets_per_pair} but dataset {dataset.id} has "
                f"{test[label]} test images of class {label}, which pair_sets "
                f"{list(pair_sets)} may choose as a target class",
            }
        )
    need = split.pretrain + split.retrain + split.pool
    short = [(label, count) for label, count in enumerate(train) if 0 < count < need]
    if short:
        label, count = min(short, key=lambda item: item[1])
        errors.append(
            {
                "loc": ("body", "overrides", "split"),
                "msg": f"the split needs {need} training images per class (pretrain "
                f"{split.pretrain} + retrain {split.retrain} + pool {split.pool}) but dataset "
                f"{dataset.id} has {count} of class {label} ({len(short)} classes short); "
                "give overrides.split with smaller counts",
            }
        )
    return errors


def _in_body(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Errors located in the request, as located in the HTTP request (under ``body``)."""
    return [{**error, "loc": ("body", *error["loc"])} for error in errors]


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
        session=session,
        celery=celery,
        settings=settings,
        tenant=tenant,
        kind="import",
        spec=spec.model_dump(mode="json"),
        config=None,
        model_id=None,
        idempotency_key=None,
        job_id=job_id,
    )


def submit_dataset(
    *,
    session: Session,
    celery: Celery,
    settings: Settings,
    tenant: Tenant,
    dataset: TenantDataset,
    spec: DatasetImportSpec,
) -> Job:
    """Queue the reading of a dataset upload already in the store at ``spec.upload_key``; the
    dataset's row (``dataset.job_id`` names the job) is committed with the job's."""
    session.add(dataset)
    return _submit(
        session=session,
        celery=celery,
        settings=settings,
        tenant=tenant,
        kind="dataset",
        spec=spec.model_dump(mode="json"),
        config=None,
        model_id=None,
        idempotency_key=None,
        job_id=dataset.job_id,
    )


def _submit(
    *,
    session: Session,
    celery: Celery,
    settings: Settings,
    tenant: Tenant,
    kind: str,
    spec: dict[str, Any],
    config: dict[str, Any] | None,
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
    check_active_jobs(session, settings, tenant)  # 429 at the tenant's quota
    job = Job(
        id=job_id or uuid.uuid4(),
        tenant_id=tenant.id,
        kind=kind,
        spec=spec,
        config=config,
        model_id=model_id,
        idempotency_key=idempotency_key,
    )
    session.add(job)
    try:
        # job.queued, committed with the job (its flush may meet the idempotency race too)
        record_job_event(session, job.id)
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
    """Send the job's task; if the broker cannot take it, the job fails with the reason (so
    no row waits queued for a message that was never sent) and the answer is a 503.

    The failed job gives up its ``Idempotency-Key``: the client's retry of the same request
    with the same key, once the queue is back, submits it anew instead of finding this job.
    """
    try:
        celery.send_task(
            task_name(job.kind), args=[str(job.id)], task_id=str(job.id), queue=settings.queue
        )
    except Exception as error:  # kombu raises many connection error types
        logger.exception("could not enqueue job %s", job.id)
        job.status = JobStatus.FAILED
        job.error = f"the job queue is unreachable ({error}); submit again later"
        job.finished_at = utcnow()
        job.idempotency_key = None
        record_job_event(session, job.id)
        session.commit()
        raise BrokerUnavailableError(f"the job queue is unreachable: {error}") from error


def _job_by_idempotency_key(session: Session, tenant: Tenant, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key))


def _same_request_or_conflict(job: Job, kind: str, spec: dict[str, Any]) -> Job:
    if job.kind != kind or job.spec != spec:
        raise ConflictError(
            f"Idempotency-Key was used for job {job.id} with a different request; "
            "use a new key for a new job"
        )
    return job


def _visible(tenant: Tenant, tenant_id: uuid.UUID, parent_id: object, deleted_at: object) -> bool:
    """Whether a job row is the tenant's to see: its own, not deleted, not an audit's part
    (a part is internal: its audit shows its progress)."""
    return tenant_id == tenant.id and deleted_at is None and parent_id is None


def get_job(*, session: Session, tenant: Tenant, job_id: uuid.UUID) -> Job:
    """The tenant's job; a deleted one, another tenant's or a missing one is a 404."""
    job = session.get(Job, job_id)
    if job is None or not _visible(tenant, job.tenant_id, job.parent_id, job.deleted_at):
        raise NotFoundError(f"no job {job_id}")
    return job


class JobBodyCache:
    """The public JSON of recently polled jobs, each under the ``updated_at`` it was read at.

    Every write to a job row sets ``updated_at`` (the column's ``onupdate``, which SQLAlchemy
    applies to ORM flushes and Core ``update(Job)`` alike), so a body stored under the row's
    current ``updated_at`` is the job as it is: a poll of an unchanged job reads four columns
    by primary key instead of the whole row, its JSON and the response model.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[uuid.UUID, tuple[datetime, bytes]] = {}
        self._lock = threading.Lock()

    def get(self, job_id: uuid.UUID, updated_at: datetime) -> bytes | None:
        with self._lock:
            entry = self._entries.get(job_id)
        return entry[1] if entry is not None and entry[0] == updated_at else None

    def put(self, job_id: uuid.UUID, updated_at: datetime, body: bytes) -> None:
        with self._lock:
            self._entries.pop(job_id, None)
            while len(self._entries) >= self.max_entries:  # the least recently stored
                del self._entries[next(iter(self._entries))]
            self._entries[job_id] = (updated_at, body)


JOB_VERSION = select(Job.tenant_id, Job.parent_id, Job.deleted_at, Job.updated_at).where(
    Job.id == bindparam("job_id")
)


def job_body(*, session: Session, tenant: Tenant, job_id: uuid.UUID, cache: JobBodyCache) -> bytes:
    """The tenant's job as ``GET /v1/jobs/{id}`` serves it (its public JSON); 404 as
    :func:`get_job`. An unchanged job's body comes from ``cache``."""
    version = session.execute(JOB_VERSION, {"job_id": job_id}).first()
    if version is None or not _visible(
        tenant, version.tenant_id, version.parent_id, version.deleted_at
    ):
        raise NotFoundError(f"no job {job_id}")
    body = cache.get(job_id, version.updated_at)
    if body is None:
        job = get_job(session=session, tenant=tenant, job_id=job_id)
        body = job_public(job).model_dump_json().encode()
        cache.put(job_id, job.updated_at, body)
    return body


def job_etag(body: bytes) -> str:
    """A strong ETag of the job as served: the sha256 of its public JSON (the body itself:
    the model's field order and Postgres's JSONB key order make it the same bytes for the
    same job)."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (or ``*``); weak comparison, as RFC
    9110 asks for If-None-Match."""
    if not if_none_match:
        return False
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or etag in [tag.removeprefix("W/") for tag in tags]


def list_jobs(
    *,
    session: Session,
    tenant: Tenant,
    kind: str | None,
    status: JobStatus | None,
    limit: int,
    offset: int,
    verdict: str | None = None,
    order: SortOrder = "desc",
) -> tuple[list[Job], int]:
    """The tenant's jobs, newest first (``order="asc"``: oldest first); ``verdict`` keeps the
    audits whose report's policy verdict has that outcome."""
    query = select(Job).where(
        Job.tenant_id == tenant.id,
        Job.deleted_at.is_(None),
        Job.parent_id.is_(None),  # an audit's parts are internal: the audit shows them
    )
    if kind is not None:
        query = query.where(Job.kind == kind)
    if status is not None:
        query = query.where(Job.status == status)
    if verdict is not None:
        outcome = Report.body[("verdict", "outcome")].as_string()
        query = query.where(
            Job.id.in_(
                select(Report.job_id).where(Report.tenant_id == tenant.id, outcome == verdict)
            )
        )
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    created = Job.created_at.asc() if order == "asc" else Job.created_at.desc()
    jobs = session.scalars(query.order_by(created, Job.id).limit(limit).offset(offset)).all()
    return list(jobs), total


def delete_job(
    *, session: Session, store: ArtifactStore, tenant: Tenant, job_id: uuid.UUID
) -> None:
    """Remove a finished job's artifacts (its report's stored pictures, a left-over upload)
    and tombstone its row; deleting it again changes nothing.

    Refused (409) while the job is queued or running: cancel it first. The report row stays
    with the job's tombstone (reads of it answer 404 with the job's) and no longer counts on
    its model's card or badge. A model the job produced is a resource of its own, kept.
    """
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.tenant_id != tenant.id:
        raise NotFoundError(f"no job {job_id}")
    if job.deleted_at is not None:
        return
    if not job.status.finished:
        session.rollback()
        raise ConflictError(
            f"job {job.id} is {job.status.value}; only a finished job can be deleted "
            "(cancel it first: POST /v1/jobs/{id}/cancel)",
            job_status=job.status.value,
        )
    report = session.scalar(select(Report).where(Report.job_id == job.id))
    # Only keys under the job's own prefix: a report names shared artifacts too (a cached
    # reference's files, under references/), which other audits still read.
    keys = [
        key
        for key in (report.body.get("stored_artifacts", []) if report is not None else [])
        if isinstance(key, str) and key.startswith(f"reports/{job.id}/")
    ]
    job.deleted_at = utcnow()
    session.commit()
    for key in [*keys, import_upload_key(job.id)]:
        store.delete(key)


def cancel_job(*, session: Session, tenant: Tenant, job_id: uuid.UUID) -> Job:
    """A queued job is cancelled at once; a running one is flagged, and its worker stops at
    the next progress step. Conditional updates, so a worker that starts the job at the same
    moment cannot be missed."""
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    if job.kind == "dataset" and not job.status.finished:
        raise ConflictError(
            f"job {job.id} reads dataset {job.spec.get('dataset_id')}; delete the dataset "
            "(DELETE /v1/datasets/{id}) to stop it"
        )
    if not request_cancel(session, job.id, message="cancelled before it started"):
        session.rollback()
        raise ConflictError(f"job {job.id} already {job.status.value}; nothing to cancel")
    session.commit()
    session.refresh(job)
    return job


def request_cancel(session: Session, job_id: uuid.UUID, *, message: str) -> bool:
    """Cancel a queued job at once (with ``message``), or flag a running one so that its worker
    stops at the next progress step; False when the job is neither. Conditional updates, so a
    worker that starts the job at the same moment cannot be missed. The caller commits."""
    now = utcnow()
    cancelled_queued = rows_matched(
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.CANCELLED,
                phase="cancelled",
                finished_at=now,
                cancel_requested=True,
                message=message,
                updated_at=now,
            )
        )
    )
    # An audit waiting for its parts is held by no worker (worker.tasks): it ends now.
    cancelled_waiting = not cancelled_queued and rows_matched(
        session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.RUNNING,
                Job.phase == WAITING_FOR_PARTS,
                Job.worker.is_(None),
            )
            .values(
                status=JobStatus.CANCELLED,
                phase="cancelled",
                finished_at=now,
                cancel_requested=True,
                lease_expires_at=None,
                eta_seconds=None,
                message="cancelled while its parts ran",
                updated_at=now,
            )
        )
    )
    if cancelled_queued or cancelled_waiting:
        record_job_event(session, job_id)  # committed by the caller with the cancellation
        stop_audit_parts(session, job_id, now)
        return True
    flagged = bool(
        rows_matched(
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                .values(cancel_requested=True, updated_at=now)
            )
        )
    )
    if flagged:
        stop_audit_parts(session, job_id, now)
    return flagged


def get_report(*, session: Session, tenant: Tenant, job_id: uuid.UUID) -> Report:
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    if not JOB_KINDS.get(job.kind).has_report:
        with_reports = [kind.name for kind in JOB_KINDS.entries() if kind.has_report]
        raise NotFoundError(
            f"job {job.id} is a {job.kind} job; only {', '.join(with_reports)} jobs have reports"
        )
    report = session.scalar(select(Report).where(Report.job_id == job.id))
    if report is None:
        raise ConflictError(
            f"job {job.id} is {job.status.value}; the report exists once it succeeded",
            job_status=job.status.value,
            error=job.error,
        )
    return report
