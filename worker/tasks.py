"""The Celery tasks: thin wrappers that re-read the job, call the core, persist the result.

Tasks take only the job id (the message is JSON); everything else is read from the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from common.artifacts import model_manifest_key, model_weights_key
from common.models import Job, JobStatus, ModelSource, Report, StoredModel, utcnow
from common.queue import AUDIT_TASK, PRETRAIN_TASK
from common.settings import Settings
from common.specs import AuditJobCreate, PretrainJobCreate, SpecError
from worker.celery_app import app
from worker.jobs import (
    Heartbeat,
    JobCancelledError,
    JobFailedError,
    ProgressWriter,
    Resources,
    claim_job,
    finish_job,
    release_lease,
    worker_name,
    worker_resources,
)

logger = logging.getLogger(__name__)
# Errors whose message the core wrote for the user (bad data, bad checkpoint, diverged loss).
USER_ERROR_NAMES = {"TrainingError", "CheckpointError", "DatasetError", "AuditError"}
Execute = Callable[[Job, Resources, ProgressWriter], None]


@app.task(name=PRETRAIN_TASK, bind=True)
def run_pretrain(task: Task, job_id: str) -> None:
    """Pre-train a hardened extractor; a redelivery resumes from the last finished epoch."""
    run_job(task, job_id, execute=execute_pretrain)


@app.task(name=AUDIT_TASK, bind=True)
def run_audit_job(task: Task, job_id: str) -> None:
    """Attack a stored extractor with FC, CP and BP and store the ASR report."""
    run_job(task, job_id, execute=execute_audit)


def run_job(task: Task, job_id: str, *, execute: Execute) -> None:
    """Claim the job, run ``execute`` under a lease heartbeat, record how it ended."""
    resources = worker_resources()
    settings = resources.settings
    job_uuid = uuid.UUID(job_id)
    worker = worker_name()
    job = claim_job(resources=resources, job_id=job_uuid, worker=worker)
    if job is None:
        return
    logger.info("job %s (%s) attempt %d on %s", job.id, job.kind, job.attempts, worker)
    try:
        with Heartbeat(resources=resources, job_id=job.id, worker=worker) as heartbeat:
            progress = ProgressWriter(resources=resources, job_id=job.id, heartbeat=heartbeat)
            execute(job, resources, progress)
    except JobCancelledError:
        finish_job(resources=resources, job_id=job.id, status=JobStatus.CANCELLED,
                   phase="cancelled", message="cancelled while running")  # fmt: skip
    except SoftTimeLimitExceeded:
        finish_job(
            resources=resources, job_id=job.id, status=JobStatus.FAILED, phase="time limit",
            error=f"the job ran past the worker's time limit of "
            f"{settings.task_soft_time_limit_seconds} s; ask for fewer epochs or iterations",
        )  # fmt: skip
    except OperationalError as error:  # the database went away: transient, retry later
        logger.warning("job %s: database error, retrying: %s", job.id, error)
        with contextlib.suppress(OperationalError):
            release_lease(resources=resources, job_id=job.id)
        raise task.retry(exc=error, countdown=settings.lease_seconds + 5, max_retries=5) from error
    except Exception as error:
        finish_job(resources=resources, job_id=job.id, status=JobStatus.FAILED,
                   phase="failed", error=user_message(error))  # fmt: skip
        if not isinstance(error, JobFailedError) and type(error).__name__ not in USER_ERROR_NAMES:
            logger.exception("job %s failed", job.id)


def user_message(error: Exception) -> str:
    name = type(error).__name__
    if isinstance(error, JobFailedError) or name in USER_ERROR_NAMES:
        return str(error)
    if name == "OutOfMemoryError":
        return f"out of memory ({error}); resubmit with a smaller batch_size or model"
    return f"internal error ({name}: {error}); the operators have the traceback in the logs"


def dataset_dir(settings: Settings, name: str) -> str | None:
    if settings.datasets_dir is not None and (settings.datasets_dir / name).is_dir():
        return str(settings.datasets_dir / name)
    return None


def job_work_dir(settings: Settings, job_id: uuid.UUID) -> Path:
    """Local scratch of one job: the resumable training state survives a worker crash here."""
    return settings.resolved_work_dir / str(job_id)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def execute_pretrain(job: Job, resources: Resources, progress: ProgressWriter) -> None:
    from core.checkpoint import MANIFEST_NAME, WEIGHTS_NAME
    from core.train import pretrain

    settings, store = resources.settings, resources.store
    spec = PretrainJobCreate.model_validate(job.spec)
    try:
        config = spec.to_config(data_dir=dataset_dir(settings, spec.dataset))
    except SpecError as error:
        raise JobFailedError(f"invalid spec: {error}") from None
    work_dir = job_work_dir(settings, job.id)
    out_dir = work_dir / "checkpoint"
    result = pretrain(config, out_dir=out_dir, work_dir=work_dir, progress=progress)

    # The model id follows from the job id, so a redelivered job never makes a second model.
    model_id = uuid.uuid5(job.id, "model")
    weights = out_dir / WEIGHTS_NAME
    store.put_file(model_weights_key(model_id), weights)
    store.put_file(model_manifest_key(model_id), out_dir / MANIFEST_NAME)
    manifest = result.manifest
    with resources.session_factory() as session:
        if session.get(StoredModel, model_id) is None:
            session.add(
                StoredModel(
                    id=model_id,
                    tenant_id=job.tenant_id,
                    name=spec.name or f"{spec.arch}-{spec.defense}-{spec.dataset}-{job.id.hex[:8]}",
                    source=ModelSource.PRETRAIN,
                    arch=manifest["arch"],
                    num_classes=manifest["num_classes"],
                    in_channels=manifest["in_channels"],
                    feature_dim=manifest["feature_dim"],
                    manifest=manifest,
                    sha256=sha256_of(weights),
                    size_bytes=weights.stat().st_size,
                    weights_key=model_weights_key(model_id),
                )
            )
        _mark_succeeded(session, job.id, result_model_id=model_id,
                        message=f"Pre. Acc {result.pre_acc:.4f}")  # fmt: skip
    shutil.rmtree(work_dir, ignore_errors=True)


def execute_audit(job: Job, resources: Resources, progress: ProgressWriter) -> None:
    from core.audit import run_audit

    settings, store = resources.settings, resources.store
    spec = AuditJobCreate.model_validate(job.spec)
    work_dir = job_work_dir(settings, job.id)
    with resources.session_factory() as session:
        model = session.get(StoredModel, job.model_id) if job.model_id else None
        if model is None:
            raise JobFailedError("the model to audit was deleted before the audit ran")
        model_dir = work_dir / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        store.fetch(model.weights_key, model_dir / "model.safetensors")
        (model_dir / "manifest.json").write_text(json.dumps(model.manifest))
        model_id = model.id
    try:
        config = spec.to_config(model=str(model_dir), data_dir=dataset_dir(settings, spec.dataset))
    except SpecError as error:
        raise JobFailedError(f"invalid spec: {error}") from None
    poisons_dir = work_dir / "poisons"
    report: dict[str, Any] = run_audit(config, progress=progress, poisons_dir=poisons_dir)
    # The poisons (exact .npz and a .png strip per attack) go to the store beside the report.
    stored = []
    for path in sorted(poisons_dir.glob("*")) if poisons_dir.is_dir() else []:
        key = f"reports/{job.id}/poisons/{path.name}"
        store.put_file(key, path)
        stored.append(key)
    report = {**report, "stored_artifacts": stored}
    report_id = uuid.uuid5(job.id, "report")
    with resources.session_factory() as session:
        if session.get(Report, report_id) is None:
            session.add(Report(id=report_id, tenant_id=job.tenant_id, job_id=job.id,
                               model_id=model_id, body=report))  # fmt: skip
        _mark_succeeded(session, job.id, result_model_id=None, message="report ready")
    shutil.rmtree(work_dir, ignore_errors=True)


def _mark_succeeded(session: Any, job_id: uuid.UUID, *, result_model_id: uuid.UUID | None,
                    message: str) -> None:  # fmt: skip
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(status=JobStatus.SUCCEEDED, phase="done", progress=1.0, message=message,
                eta_seconds=None, error=None, finished_at=now, updated_at=now,
                lease_expires_at=None, result_model_id=result_model_id)
    )  # fmt: skip
    session.commit()
