"""The sweep and the give-back, on the suite's Postgres with no processes: several sweepers at
once re-send each job once, a job past its attempts ends failed, cancellation wins over
re-queueing, and a worker whose job was re-queued stops running it."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from reliabilitykit import job_row
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from common.artifacts import make_artifact_store
from common.db import make_session_factory
from common.models import Job, JobStatus, utcnow
from common.settings import Settings
from core.progress import Progress
from worker.jobs import (
    REQUEUED_MESSAGE,
    Heartbeat,
    JobLostError,
    ProgressWriter,
    Resources,
    claim_job,
    give_back_job,
    sweep_jobs,
)


class SentTasks:
    """Records ``send_task`` calls in place of the broker (the claim is what is under test)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self._lock = threading.Lock()

    def send_task(self, name: str, *, args: list[str], **_: Any) -> None:
        with self._lock:
            self.sent.append(args[0])


@pytest.fixture
def resources(db: Engine, tmp_path: Path, quiet_queue: None) -> Resources:
    settings = Settings(
        DATABASE_URL=str(db.url.render_as_string(hide_password=False)),
        BROKER_URL="redis://127.0.0.1:1/0",  # never used: SentTasks stands in for it
        data_dir=tmp_path,
        lease_seconds=30,
        max_attempts=3,
        requeue_queued_after_seconds=60,
    )
    return Resources(
        settings=settings,
        session_factory=make_session_factory(db),
        store=make_artifact_store(settings),
    )


@pytest.fixture
def tenant_id(db: Engine) -> uuid.UUID:
    from api.services.tenants import create_tenant

    with make_session_factory(db)() as session:
        return create_tenant(session=session, name=f"sweep-{uuid.uuid4().hex[:6]}").tenant.id


def add_job(db: Engine, tenant_id: uuid.UUID, **fields: Any) -> uuid.UUID:
    with Session(db) as session:
        job = Job(tenant_id=tenant_id, kind="pretrain", spec={}, **fields)
        session.add(job)
        session.commit()
        return job.id


def test_sweepers_at_once_resend_each_stuck_job_exactly_once(
    db: Engine, resources: Resources, tenant_id: uuid.UUID
) -> None:
    past = utcnow() - timedelta(minutes=5)
    dead = [
        add_job(db, tenant_id, status=JobStatus.RUNNING, attempts=1, lease_expires_at=past)
        for _ in range(10)
    ]
    lost = [add_job(db, tenant_id, status=JobStatus.QUEUED, updated_at=past) for _ in range(10)]
    live = add_job(
        db,
        tenant_id,
        status=JobStatus.RUNNING,
        attempts=1,
        worker="alive:1",
        lease_expires_at=utcnow() + timedelta(minutes=5),
    )
    fresh = add_job(db, tenant_id, status=JobStatus.QUEUED)
    broker = SentTasks()
    sweepers = [
        threading.Thread(
            target=sweep_jobs,
            kwargs={
                "session_factory": resources.session_factory,
                "settings": resources.settings,
                "celery": broker,
            },
        )
        for _ in range(4)
    ]
    for sweeper in sweepers:
        sweeper.start()
    for sweeper in sweepers:
        sweeper.join(timeout=60)
    assert sorted(broker.sent) == sorted(str(job_id) for job_id in [*dead, *lost])
    for job_id in dead:
        job = job_row(db, str(job_id))
        assert job.status == JobStatus.QUEUED and job.worker is None and job.attempts == 1
    assert job_row(db, str(live)).status == JobStatus.RUNNING  # held by a live worker
    assert job_row(db, str(fresh)).status == JobStatus.QUEUED  # its message is still young
    # Re-sent jobs are not re-sent again before requeue_queued_after_seconds.
    again = sweep_jobs(
        session_factory=resources.session_factory, settings=resources.settings, celery=broker
    )
    assert (again.requeued, again.resent) == (0, 0)


def test_a_stuck_job_past_its_attempts_ends_failed_with_a_message(
    db: Engine, resources: Resources, tenant_id: uuid.UUID
) -> None:
    job_id = add_job(
        db,
        tenant_id,
        status=JobStatus.RUNNING,
        attempts=3,
        phase="training",
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )
    broker = SentTasks()
    swept = sweep_jobs(
        session_factory=resources.session_factory, settings=resources.settings, celery=broker
    )
    assert swept.requeued == 1 and broker.sent == [str(job_id)]
    # The re-sent message's delivery: the claim refuses it and ends the loop.
    assert claim_job(resources=resources, job_id=job_id, worker="w") is None
    job = job_row(db, str(job_id))
    assert job.status == JobStatus.FAILED
    assert (
        job.error is not None and "stopped its worker 3 times (last phase: training)" in job.error
    )


def test_give_back_requeues_a_held_job_and_cancellation_wins(
    db: Engine, resources: Resources, tenant_id: uuid.UUID
) -> None:
    broker = SentTasks()
    held = add_job(db, tenant_id)
    assert claim_job(resources=resources, job_id=held, worker="w1") is not None
    status = give_back_job(resources=resources, job_id=held, worker="w1", celery=broker)
    job = job_row(db, str(held))
    assert status == JobStatus.QUEUED and job.status == JobStatus.QUEUED
    assert job.attempts == 0 and job.message == REQUEUED_MESSAGE and job.lease_expires_at is None
    assert broker.sent == [str(held)]

    # Not this worker's job: nothing changes.
    assert claim_job(resources=resources, job_id=held, worker="w2") is not None
    assert give_back_job(resources=resources, job_id=held, worker="w1", celery=broker) is None
    assert job_row(db, str(held)).status == JobStatus.RUNNING

    # A cancel requested meanwhile wins over re-queueing.
    with Session(db) as session:
        session.execute(update(Job).where(Job.id == held).values(cancel_requested=True))
        session.commit()
    status = give_back_job(resources=resources, job_id=held, worker="w2", celery=broker)
    assert status == JobStatus.CANCELLED
    assert job_row(db, str(held)).status == JobStatus.CANCELLED
    assert broker.sent == [str(held)]  # no message for a cancelled job


def test_a_worker_whose_job_was_requeued_stops_running_it(
    db: Engine, resources: Resources, tenant_id: uuid.UUID
) -> None:
    job_id = add_job(db, tenant_id)
    assert claim_job(resources=resources, job_id=job_id, worker="slow") is not None
    heartbeat = Heartbeat(resources=resources, job_id=job_id, worker="slow")
    progress = ProgressWriter(resources=resources, job_id=job_id, heartbeat=heartbeat)
    heartbeat.beat()
    progress(Progress(phase="training", fraction=0.1))  # still ours: no error
    # Its lease ran out (a long stall) and a sweep re-queued it; another worker took it.
    with Session(db) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(1))
        )
        session.commit()
    sweep_jobs(
        session_factory=resources.session_factory,
        settings=resources.settings,
        celery=SentTasks(),
    )
    assert claim_job(resources=resources, job_id=job_id, worker="other") is not None
    heartbeat.beat()
    assert heartbeat.lost.is_set()
    with pytest.raises(JobLostError):
        progress(Progress(phase="training", fraction=0.2))
    assert job_row(db, str(job_id)).worker == "other"
