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
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache

from celery import Celery
from sqlalchemy import Update, case, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from common.artifacts import (
    ArtifactStore,
    dataset_data_key,
    dataset_upload_key,
    make_artifact_store,
)
from common.audit_parts import WAITING_FOR_PARTS, stop_audit_parts
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


class WorkerStoppingError(Exception):
    """Raised from the progress callback once this worker process was asked to stop (SIGTERM):
    the job is given back (``give_back_job``) and resumes from its checkpoint elsewhere."""


class JobLostError(Exception):
    """Raised from the progress callback once the job is no longer this worker's (its lease ran
    out and another worker claimed it): this run stops without touching the job's row."""


# Set by the SIGTERM handler that ``stop_on_sigterm`` installs for the duration of a job.
stop_requested = threading.Event()


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While a job runs in this process, SIGTERM sets :data:`stop_requested` instead of killing
    the process, so the job can be given back at its next progress step.

    Celery's pool children reset SIGTERM to its default (die at once), which left the job
    ``running`` until its lease ran out. Only the main thread may install handlers: elsewhere
    (an eager or threaded pool) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(_signum: int, _frame: object) -> None:
        stop_requested.set()

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    parent_id = session.scalar(select(Job.parent_id).where(Job.id == job_id))
    if parent_id is not None:  # an audit part: lock its audit first, as a cancel does
        session.execute(select(Job.id).where(Job.id == parent_id).with_for_update())
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
        _end_audit_with_part(session, job_id, status, error or message or phase)
        stop_audit_parts(session, job_id)  # an audit that ended stops its parts
    session.commit()
    return failed


def _end_audit_with_part(
    session: Session, job_id: uuid.UUID, status: JobStatus, reason: str
) -> None:
    """An ``audit-part`` job that failed or was cancelled ends its audit the same way, with
    the part's reason, and stops the audit's other parts; any other job matches nothing."""
    part = session.execute(
        select(Job.parent_id, Job.spec).where(Job.id == job_id, Job.parent_id.is_not(None))
    ).one_or_none()
    if part is None:
        return
    parent_id, name = part.parent_id, part.spec.get("part", "?")
    now = utcnow()
    failed = status == JobStatus.FAILED
    ended = rows_matched(
        session.execute(
            update(Job)
            .where(Job.id == parent_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
            .values(
                status=status,
                phase="failed" if failed else "cancelled",
                message="" if failed else f"cancelled: its part {name} was cancelled",
                error=f"part {name}: {reason}" if failed else None,
                finished_at=now,
                updated_at=now,
                lease_expires_at=None,
                eta_seconds=None,
            )
        )
    )
    if ended:
        record_job_event(session, parent_id)  # job.failed or job.cancelled of the audit
    stop_audit_parts(session, parent_id)


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
        return tenant_safe(error.user_message), False
    if isinstance(error, JobFailedError):
        return tenant_safe(str(error)), False
    if is_database_error(error):  # its text holds SQL and the statement's parameters
        return INTERNAL_ERROR, True
    if is_out_of_memory(error):
        return (
            tenant_safe(f"out of memory ({error}); resubmit with a smaller batch_size or model"),
            False,
        )
    name = type(error).__name__
    return (
        tenant_safe(
            f"internal error ({name}: {error}); the operators have the traceback in the logs"
        ),
        True,
    )


INTERNAL_ERROR = "internal error (logged); the operators have the traceback in the logs"
MAX_ERROR_CHARS = 2000
# Terminal escapes (colours from a library's log line), then any other control character.
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# An absolute server path of two or more parts (/srv/bulwark/work/<job>/x.npz); the API's
# own routes (/v1/..., /.well-known/...) are words a tenant may read.
SERVER_PATH = re.compile(r"(?<![\w.:/~-])(?:~|/(?!v1/|\.well-known/))[\w.@+=-]*(?:/[\w.@+=-]+)+/?")


def tenant_safe(message: str) -> str:
    """``message`` as a tenant may read it: no terminal escapes or control characters, no
    server paths (the work and data directories are nobody's business but the operators'),
    one line of bounded length."""
    text = ANSI_ESCAPE.sub("", message)
    text = CONTROL_CHARACTERS.sub(" ", text).replace("\n", " ").replace("\t", " ")
    text = SERVER_PATH.sub("<server path>", text)
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return text or INTERNAL_ERROR


def is_database_error(error: BaseException) -> bool:
    """A SQLAlchemy or DBAPI (psycopg, sqlite3) error, anywhere in the exception's chain."""
    import sqlite3

    from sqlalchemy.exc import SQLAlchemyError

    kinds: tuple[type[BaseException], ...] = (SQLAlchemyError, sqlite3.Error)
    try:
        import psycopg

        kinds = (*kinds, psycopg.Error)
    except ImportError:  # a deployment on SQLite only
        pass
    seen: BaseException | None = error
    for _ in range(16):  # a bounded walk: chains can loop
        if seen is None:
            return False
        if isinstance(seen, kinds):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
        self.lost = threading.Event()  # the job is no longer this worker's (see beat)
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
                .where(
                    Job.id == self.job_id,
                    Job.worker == self.worker,
                    Job.status == JobStatus.RUNNING,
                )
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease))
                .returning(Job.cancel_requested)
            )
            session.commit()
            if cancel is not None:  # an audit part alive keeps its waiting audit's lease
                # Its own transaction: locks are taken audit before part (as a cancel does).
                session.execute(renew_waiting_audit(self.job_id, self.resources.settings))
                session.commit()
        if cancel is None:  # re-queued by a sweep, or claimed by another worker: not ours
            self.lost.set()
        elif cancel:
            self.cancelled.set()

    def _run(self) -> None:
        interval = self.resources.settings.lease_seconds / 3
        while not self._stop.wait(interval):
            try:
                self.beat()
            except Exception:  # the database may blip; the lease has slack for that
                logger.exception("heartbeat of job %s failed", self.job_id)


def renew_waiting_audit(part_id: uuid.UUID, settings: Settings) -> Update:
    """The statement that renews the lease of the audit ``part_id`` is a part of, while that
    audit waits for its parts (running, held by no worker: ``worker.tasks``). Its lease is
    only the fallback that re-sends it should the last part's message be lost, so it lasts
    ``requeue_queued_after_seconds``; while a part is alive it does not run out."""
    parent = select(Job.parent_id).where(Job.id == part_id).scalar_subquery()
    return (
        update(Job)
        .where(
            Job.id == parent,
            Job.status == JobStatus.RUNNING,
            Job.worker.is_(None),
            # Not once its last part released it (``resume_audit`` changes the phase).
            Job.phase == WAITING_FOR_PARTS,
        )
        .values(
            lease_expires_at=utcnow() + timedelta(seconds=settings.requeue_queued_after_seconds)
        )
    )


class ProgressWriter:
    """The core's progress callback: writes the job row at most once per interval (and on
    every phase change), and raises :class:`JobCancelledError` once a cancel was requested."""

    def __init__(self, *, resources: Resources, job_id: uuid.UUID, heartbeat: Heartbeat) -> None:
        self.resources, self.job_id, self.heartbeat = resources, job_id, heartbeat
        self.interval = resources.settings.progress_interval_seconds
        self._last_write = -float("inf")
        self._last_phase: str | None = None

    def __call__(self, report: Progress) -> None:
        # Cancellation wins over giving the job back; a lost job is left to its new holder.
        if self.heartbeat.cancelled.is_set():
            raise JobCancelledError
        if self.heartbeat.lost.is_set():
            raise JobLostError
        if stop_requested.is_set():
            raise WorkerStoppingError
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
        send_job(celery, settings=settings, job_id=job_id, kind=kind)
    return len(jobs)


REQUEUED_MESSAGE = "re-queued: its worker stopped; it resumes from its last checkpoint"


def send_job(celery: Celery, *, settings: Settings, job_id: uuid.UUID, kind: str) -> None:
    """(Re-)send a job's message. Duplicates are harmless: the claim lets one delivery run it."""
    celery.send_task(task_name(kind), args=[str(job_id)], task_id=str(job_id), queue=settings.queue)


def give_back_job(
    *, resources: Resources, job_id: uuid.UUID, worker: str, celery: Celery
) -> JobStatus | None:
    """Put a job this worker holds back in the queue at once and re-send it (the worker was
    asked to stop: SIGTERM). The attempt is not counted: the job did not crash its worker.

    Cancellation wins: a job whose cancel was requested ends ``cancelled`` instead. Returns the
    job's new status, or None where it was no longer this worker's (nothing changed)."""
    settings = resources.settings
    now = utcnow()
    with resources.session_factory() as session:
        ours = (Job.id == job_id) & (Job.worker == worker) & (Job.status == JobStatus.RUNNING)
        requeued = rows_matched(
            session.execute(
                update(Job)
                .where(ours, Job.cancel_requested.is_(False))
                .values(
                    status=JobStatus.QUEUED,
                    worker=None,
                    lease_expires_at=None,
                    attempts=case((Job.attempts > 0, Job.attempts - 1), else_=0),
                    message=REQUEUED_MESSAGE,
                    eta_seconds=None,
                    updated_at=now,
                )
            )
        )
        if requeued:
            record_job_event(session, job_id)  # job.queued
            session.commit()
            kind = session.scalar(select(Job.kind).where(Job.id == job_id))
        else:
            session.rollback()
            still_ours = session.scalar(select(Job.id).where(ours))
            if still_ours is None:
                return None
    if not requeued:  # ours, with a cancel requested
        finish_job(
            resources=resources,
            job_id=job_id,
            status=JobStatus.CANCELLED,
            phase="cancelled",
            message="cancelled while its worker was stopping",
        )
        return JobStatus.CANCELLED
    try:
        assert kind is not None
        send_job(celery, settings=settings, job_id=job_id, kind=kind)
    except Exception:  # the broker is down: the sweep re-sends stale queued jobs
        logger.exception("job %s re-queued but its message could not be sent", job_id)
    return JobStatus.QUEUED


@dataclass(frozen=True)
class SweepResult:
    requeued: int  # running jobs whose lease ran out, put back in the queue
    resent: int  # queued jobs not touched for requeue_queued_after_seconds, re-sent


def sweep_jobs(
    *, session_factory: sessionmaker[Session], settings: Settings, celery: Celery
) -> SweepResult:
    """One pass of the periodic sweep that every worker runs (``Sweeper``): no job stays stuck.

    - A running job whose lease ran out (its worker died) goes back to ``queued`` and is re-sent.
      Its attempts stay counted: a job past ``max_attempts`` is failed, with a message, by the
      claim of that message (``_settle_unclaimable``), so a job that kills workers ends.
    - A queued job not updated for ``requeue_queued_after_seconds`` may have lost its message
      (Redis restarted without persistence, a send that failed): it is re-sent, and its
      ``updated_at`` bumped, so it is re-sent at most once per that period.

    Each job is picked by a conditional UPDATE, so of several workers sweeping at once only one
    re-sends it; the messages are sent before the commit, so a broker that is down leaves the
    rows for the next pass. A duplicate message is harmless: the claim lets one delivery run a
    job, and a job another worker holds is a no-op.
    """
    now = utcnow()
    stale = now - timedelta(seconds=settings.requeue_queued_after_seconds)
    with session_factory() as session:
        expired = session.execute(
            update(Job)
            .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
            .values(
                status=JobStatus.QUEUED,
                worker=None,
                lease_expires_at=None,
                message="re-queued: its worker stopped responding",
                eta_seconds=None,
                updated_at=now,
            )
            .returning(Job.id, Job.kind)
        ).all()
        for job_id, _kind in expired:
            record_job_event(session, job_id)  # job.queued
        waiting = session.execute(
            update(Job)
            .where(Job.status == JobStatus.QUEUED, Job.updated_at < stale)
            .values(updated_at=now)
            .returning(Job.id, Job.kind)
        ).all()
        try:
            for job_id, kind in [*expired, *waiting]:
                send_job(celery, settings=settings, job_id=job_id, kind=kind)
        except BaseException:
            session.rollback()
            raise
        session.commit()
    for job_id, _kind in expired:
        logger.info("job %s: its worker's lease ran out; re-queued", job_id)
    for job_id, _kind in waiting:
        logger.info("job %s: queued with no sign of its message; re-sent", job_id)
    return SweepResult(requeued=len(expired), resent=len(waiting))


class Sweeper:
    """A daemon thread in the worker's main process running ``sweep_jobs`` every
    ``sweep_interval_seconds``: a dead worker's job is taken over within about
    ``lease_seconds + sweep_interval_seconds`` by any live worker, not only when one starts.

    The database engine lives for one pass only: the main process forks a pool child after
    every job, and a child must not inherit an open connection."""

    def __init__(self, *, settings: Settings, celery: Celery) -> None:
        self.settings, self.celery = settings, celery
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bulwark-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def sweep_once(self) -> SweepResult:
        engine = make_engine(self.settings.resolved_database_url)
        try:
            return sweep_jobs(
                session_factory=make_session_factory(engine),
                settings=self.settings,
                celery=self.celery,
            )
        finally:
            engine.dispose()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval_seconds):
            try:
                self.sweep_once()
            except Exception as error:  # the database or broker may be down: try next time
                logger.warning("job sweep failed: %s: %s", type(error).__name__, error)
