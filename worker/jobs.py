"""Job life cycle on the worker side: claim, lease heartbeat, throttled progress, finish.

Every task is idempotent. A conditional update claims the job: a queued job, or a running job
whose lease ran out (its worker died). A finished job, a job another live worker holds, or a
message for an unknown job is a no-op. Each claim counts an attempt; a job that has crashed its
worker ``max_attempts`` times fails with a message instead of looping forever.

A ``dataset`` job that ends failed or cancelled by any of these paths takes its pending dataset
with it (``_finish``): the dataset's row becomes ``failed`` with the job's error in the same
transaction, and its upload is deleted, so no dataset waits ``pending`` for a job that is over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache

from celery import Celery
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from common.artifacts import (
    ArtifactStore,
    dataset_data_key,
    dataset_upload_key,
    make_artifact_store,
)
from common.db import make_engine, make_session_factory, rows_matched
from common.models import DatasetStatus, Job, JobStatus, TenantDataset, utcnow
from common.queue import task_name
from common.settings import Settings, get_settings
from common.webhooks import record_job_event
from core.errors import BulwarkError
from core.progress import Progress

logger = logging.getLogger(__name__)


class JobCancelledError(Exception):
    """Raised from the progress callback to stop a job whose cancellation was requested."""


class JobFailedError(Exception):
    """A job that cannot succeed; the message is shown to the user as the job's error."""


@dataclass(frozen=True)
class Resources:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ArtifactStore


@cache
def _resources_for(pid: int) -> Resources:
    # Keyed by pid: a forked child never reuses its parent's database connections.
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    return Resources(
        settings=settings,
        session_factory=make_session_factory(engine),
        store=make_artifact_store(settings),
    )


def worker_resources() -> Resources:
    """This process's database sessions, artifact store and settings."""
    return _resources_for(os.getpid())


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_job(*, resources: Resources, job_id: uuid.UUID, worker: str) -> Job | None:
    """Mark the job running for ``worker`` if nobody live holds it; None means do nothing."""
    settings = resources.settings
    now = utcnow()
    with resources.session_factory() as session:
        claimed = rows_matched(
            session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.cancel_requested.is_(False),
                    Job.attempts < settings.max_attempts,
                    or_(
                        Job.status == JobStatus.QUEUED,
                        (Job.status == JobStatus.RUNNING) & (Job.lease_expires_at < now),
                    ),
                )
                .values(
                    status=JobStatus.RUNNING,
                    attempts=Job.attempts + 1,
                    worker=worker,
                    lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
                    phase="starting",
                    updated_at=now,
                )
            )
        )
        if claimed:  # job.running (again, with its attempts, when a new worker takes over)
            record_job_event(session, job_id)
        session.commit()
        job = session.get(Job, job_id)
        if job is None:
            logger.warning("job %s does not exist; dropping its message", job_id)
            return None
        if claimed:
            if job.started_at is None:
                job.started_at = now
                session.commit()
            return job
        settled = _settle_unclaimable(session=session, job=job, settings=settings, now=now)
    _drop_dataset_files(resources.store, settled)
    return None


def _settle_unclaimable(
    *, session: Session, job: Job, settings: Settings, now: datetime
) -> list[uuid.UUID]:
    """A job we may not run: finish it if its last worker died and it cannot go on. Returns
    the datasets that failed with it (see ``_finish``)."""
    lease_over = job.lease_expires_at is not None and _as_utc(job.lease_expires_at) < now
    if job.status == JobStatus.RUNNING and lease_over and job.cancel_requested:
        return _finish(
            session,
            job.id,
            JobStatus.CANCELLED,
            phase="cancelled",
            message="cancelled (its worker had stopped)",
        )
    if job.status == JobStatus.QUEUED and job.cancel_requested:
        return _finish(session, job.id, JobStatus.CANCELLED, phase="cancelled", message="cancelled")
    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING) and (
        job.attempts >= settings.max_attempts and (job.status == JobStatus.QUEUED or lease_over)
    ):
        return _finish(
            session,
            job.id,
            JobStatus.FAILED,
            phase=job.phase,
            error=f"the job stopped its worker {job.attempts} times (last phase: {job.phase}); "
            "it may need more memory than a worker has: try a smaller batch_size or model",
        )
    logger.info("job %s is %s and held elsewhere or finished: no-op", job.id, job.status)
    return []


def _as_utc(value: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; every stored timestamp is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _finish(
    session: Session,
    job_id: uuid.UUID,
    status: JobStatus,
    *,
    phase: str,
    message: str = "",
    error: str | None = None,
    **values: object,
) -> list[uuid.UUID]:
    """Record the job's end; a failed or cancelled job fails the pending dataset it was
    reading, in the same transaction. Returns the ids of the datasets failed so."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status=status,
            phase=phase,
            message=message,
            error=error,
            finished_at=now,
            updated_at=now,
            lease_expires_at=None,
            eta_seconds=None,
            **values,
        )
    )
    record_job_event(session, job_id)  # job.failed or job.cancelled, with the update
    failed: list[uuid.UUID] = []
    if status in (JobStatus.FAILED, JobStatus.CANCELLED):
        reason = error or f"its dataset job ended {status.value}: {message or phase}"
        failed = _fail_pending_datasets(session, job_id, reason)
    session.commit()
    return failed


def _fail_pending_datasets(session: Session, job_id: uuid.UUID, reason: str) -> list[uuid.UUID]:
    """Mark failed, with ``reason``, the pending datasets whose dataset job is ``job_id`` (a
    dataset's job only ever reads that dataset; other kinds of job match none)."""
    pending = (TenantDataset.job_id == job_id) & (TenantDataset.status == DatasetStatus.PENDING)
    ids = list(session.scalars(select(TenantDataset.id).where(pending)))
    if ids:
        session.execute(
            update(TenantDataset)
            .where(pending, TenantDataset.id.in_(ids))
            .values(status=DatasetStatus.FAILED, error=reason, data_key=None)
        )
    return ids


def _drop_dataset_files(store: ArtifactStore, dataset_ids: list[uuid.UUID]) -> None:
    """A failed dataset keeps no file: its upload, and an npz a dead worker may have left."""
    for dataset_id in dataset_ids:
        store.delete(dataset_upload_key(dataset_id))
        store.delete(dataset_data_key(dataset_id))


def finish_job(
    *,
    resources: Resources,
    job_id: uuid.UUID,
    status: JobStatus,
    phase: str,
    message: str = "",
    error: str | None = None,
    **values: object,
) -> None:
    with resources.session_factory() as session:
        failed = _finish(
            session, job_id, status, phase=phase, message=message, error=error, **values
        )
    _drop_dataset_files(resources.store, failed)


def failure_message(error: Exception) -> tuple[str, bool]:
    """The job's error for the user, and whether it is internal (the traceback is logged).

    Decided by the error's class, never its name: a :class:`core.errors.BulwarkError` (bad
    data, bad checkpoint, diverged training) or a :class:`JobFailedError` carries a message
    the user can act on; out of memory says how to ask for less; anything else is ours.
    """
    if isinstance(error, BulwarkError):
        return error.user_message, False
    if isinstance(error, JobFailedError):
        return str(error), False
    if is_out_of_memory(error):
        return f"out of memory ({error}); resubmit with a smaller batch_size or model", False
    name = type(error).__name__
    return f"internal error ({name}: {error}); the operators have the traceback in the logs", True


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or other accelerator) allocation failure, or the host running out of memory."""
    import torch  # the task body has loaded it already; the parent never does

    return isinstance(error, torch.OutOfMemoryError | MemoryError)


def release_lease(*, resources: Resources, job_id: uuid.UUID) -> None:
    """Let another delivery take the job over at once (used before a retry)."""
    with resources.session_factory() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
        session.commit()


class Heartbeat:
    """A thread that renews the job's lease and notices cancellation requests."""

    def __init__(self, *, resources: Resources, job_id: uuid.UUID, worker: str) -> None:
        self.resources, self.job_id, self.worker = resources, job_id, worker
        self.cancelled = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def beat(self) -> None:
        lease = self.resources.settings.lease_seconds
        with self.resources.session_factory() as session:
            cancel = session.scalar(
                update(Job)
                .where(Job.id == self.job_id, Job.worker == self.worker)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease))
                .returning(Job.cancel_requested)
            )
            session.commit()
        if cancel:
            self.cancelled.set()

    def _run(self) -> None:
        interval = self.resources.settings.lease_seconds / 3
        while not self._stop.wait(interval):
            try:
                self.beat()
            except Exception:  # the database may blip; the lease has slack for that
                logger.exception("heartbeat of job %s failed", self.job_id)


class ProgressWriter:
    """The core's progress callback: writes the job row at most once per interval (and on
    every phase change), and raises :class:`JobCancelledError` once a cancel was requested."""

    def __init__(self, *, resources: Resources, job_id: uuid.UUID, heartbeat: Heartbeat) -> None:
        self.resources, self.job_id, self.heartbeat = resources, job_id, heartbeat
        self.interval = resources.settings.progress_interval_seconds
        self._last_write = -float("inf")
        self._last_phase: str | None = None

    def __call__(self, report: Progress) -> None:
        if self.heartbeat.cancelled.is_set():
            raise JobCancelledError
        now = time.monotonic()
        if report.phase == self._last_phase and now - self._last_write < self.interval:
            return
        self._last_write, self._last_phase = now, report.phase
        with self.resources.session_factory() as session:
            cancel = session.scalar(
                update(Job)
                .where(Job.id == self.job_id)
                .values(
                    phase=report.phase[:64],
                    progress=min(1.0, max(0.0, report.fraction)),
                    message=describe(report),
                    eta_seconds=report.eta_seconds,
                    updated_at=utcnow(),
                )
                .returning(Job.cancel_requested)
            )
            session.commit()
        if cancel:
            self.heartbeat.cancelled.set()
            raise JobCancelledError


def describe(report: Progress) -> str:
    """One line for a progress report: 'epoch 2/3, step 5/8, loss 0.812 - message'."""
    parts = []
    if report.epoch is not None:
        parts.append(f"epoch {report.epoch}/{report.epochs}")
    if report.step is not None:
        parts.append(f"step {report.step}/{report.steps}")
    if report.loss is not None:
        parts.append(f"loss {report.loss:.4f}")
    if report.accuracy is not None:
        parts.append(f"accuracy {report.accuracy:.4f}")
    text = ", ".join(parts)
    if report.message:
        text = f"{text} - {report.message}" if text else report.message
    return text


def requeue_orphans(*, settings: Settings, celery: Celery) -> int:
    """Re-send every queued job and every running job whose lease ran out.

    Called when a worker starts: it recovers jobs whose worker died (the filesystem broker of
    the embedded mode never redelivers) and jobs whose message was lost between commit and
    send. Duplicates are harmless: the claim lets only one delivery run a job.
    """
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            now = utcnow()
            jobs = session.execute(
                select(Job.id, Job.kind).where(
                    or_(
                        Job.status == JobStatus.QUEUED,
                        (Job.status == JobStatus.RUNNING) & (Job.lease_expires_at < now),
                    )
                )
            ).all()
    finally:
        engine.dispose()
    for job_id, kind in jobs:
        celery.send_task(
            task_name(kind), args=[str(job_id)], task_id=str(job_id), queue=settings.queue
        )
    return len(jobs)
