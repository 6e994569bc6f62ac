"""Real Celery workers on the real Redis and Postgres: runs, redelivery, cancel, crash."""

from __future__ import annotations

import re
import time
import uuid
from datetime import timedelta

from servicekit import wait_for
from sqlalchemy import update
from sqlalchemy.orm import Session

from common.models import Job, JobStatus, utcnow
from worker.jobs import Resources, claim_job

QUICK = {"dataset": "digits", "arch": "convnet", "recipe": "quick"}


def job_row(db, job_id: str) -> Job:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


def finished(db, job_id: str) -> Job | None:  # type: ignore[no-untyped-def]
    job = job_row(db, job_id)
    return job if job.status.finished else None


def test_cancel_stops_a_running_job_at_its_next_progress_step(
    client, make_tenant, start_worker, clean_db
) -> None:
    start_worker()
    tenant = make_tenant("a")
    job_id = client.post(
        "/v1/jobs/pretrain",
        headers=tenant.headers,
        json={**QUICK, "defense": "at-pcl", "epochs": 5},
    ).json()["id"]
    wait_for(
        lambda: job_row(clean_db, job_id).phase == "training", timeout=90, what="training to start"
    )
    asked = time.monotonic()
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers)
    assert response.status_code == 200 and response.json()["cancel_requested"]
    job = wait_for(lambda: finished(clean_db, job_id), timeout=30, what="the cancellation")
    assert job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert time.monotonic() - asked < 30
    assert job.result_model_id is None


def test_a_worker_killed_mid_pretraining_is_resumed_by_a_new_worker(
    client, make_tenant, start_worker, clean_db, settings
) -> None:
    tenant = make_tenant("a")
    first = start_worker()
    job_id = client.post(
        "/v1/jobs/pretrain",
        headers=tenant.headers,
        json={**QUICK, "defense": "at", "epochs": 3, "overrides": {"pgd_steps": 2}},
    ).json()["id"]
    state = settings.resolved_work_dir / job_id / "train_state.pt"
    wait_for(
        lambda: "epoch 2/3" in job_row(clean_db, job_id).message,
        timeout=120,
        interval=0.05,
        what="the first epoch checkpoint",
    )
    assert state.is_file()
    first.kill()
    killed = job_row(clean_db, job_id)
    assert killed.status == JobStatus.RUNNING and killed.attempts == 1

    time.sleep(settings.lease_seconds + 0.5)  # the dead worker's lease runs out
    second = start_worker()
    epochs_seen: set[int] = set()

    def done_watching_epochs() -> Job | None:
        job = job_row(clean_db, job_id)
        if job.attempts == 2:
            epochs_seen.update(int(e) for e in re.findall(r"epoch (\d)/3", job.message))
        return job if job.status.finished else None

    job = wait_for(done_watching_epochs, timeout=150, interval=0.05, what="the resumed job")
    assert job.status == JobStatus.SUCCEEDED, (job.error, second.output()[-3000:])
    assert job.attempts == 2
    assert epochs_seen and min(epochs_seen) >= 2, epochs_seen  # resumed, not restarted
    assert job.result_model_id is not None


def test_a_job_that_keeps_killing_its_worker_fails_with_a_message(clean_db, settings) -> None:
    from api.services.tenants import create_tenant
    from common.artifacts import make_artifact_store
    from common.db import make_session_factory

    resources = Resources(
        settings=settings,
        session_factory=make_session_factory(clean_db),
        store=make_artifact_store(settings),
    )
    with Session(clean_db, expire_on_commit=False) as session:
        tenant = create_tenant(session=session, name="a").tenant
        job = Job(
            tenant_id=tenant.id,
            kind="pretrain",
            spec={},
            status=JobStatus.RUNNING,
            attempts=settings.max_attempts,
            phase="training",
            lease_expires_at=utcnow() - timedelta(seconds=1),
        )
        live = Job(
            tenant_id=tenant.id,
            kind="pretrain",
            spec={},
            status=JobStatus.RUNNING,
            attempts=1,
            lease_expires_at=utcnow() + timedelta(minutes=5),
        )
        session.add_all([job, live])
        session.commit()
    assert claim_job(resources=resources, job_id=job.id, worker="w") is None
    failed = job_row(clean_db, str(job.id))
    assert failed.status == JobStatus.FAILED
    assert f"stopped its worker {settings.max_attempts} times" in failed.error
    assert "training" in failed.error
    # A job another live worker holds is not taken over.
    assert claim_job(resources=resources, job_id=live.id, worker="w") is None
    assert job_row(clean_db, str(live.id)).attempts == 1
    # Once its lease runs out, it is.
    with Session(clean_db) as session:
        session.execute(
            update(Job)
            .where(Job.id == live.id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    claimed = claim_job(resources=resources, job_id=live.id, worker="w2")
    assert claimed is not None and claimed.attempts == 2 and claimed.worker == "w2"


def test_a_failed_job_says_why_by_the_class_of_its_error() -> None:
    import torch

    from core.checkpoint import CheckpointError
    from core.errors import BulwarkError, ErrorKind
    from core.train import TrainingError
    from worker.jobs import JobFailedError, failure_message

    assert CheckpointError.kind == ErrorKind.BAD_CHECKPOINT
    assert TrainingError.kind == ErrorKind.TRAINING_FAILED
    for error in (
        CheckpointError("model.safetensors is not safetensors"),
        TrainingError("the loss diverged at epoch 3; lower lr"),
        JobFailedError("the model to audit was deleted"),
    ):
        assert failure_message(error) == (str(error), False)

    class LookalikeError(Exception):  # the name of a user error no longer makes one
        pass

    LookalikeError.__name__ = "TrainingError"
    message, internal = failure_message(LookalikeError("boom"))
    assert internal and message.startswith("internal error (TrainingError: boom)")
    assert failure_message(ValueError("bad"))[1] is True
    for oom in (torch.OutOfMemoryError("CUDA out of memory"), MemoryError()):
        message, internal = failure_message(oom)
        assert not internal and "smaller batch_size" in message
    assert issubclass(CheckpointError, BulwarkError) and issubclass(TrainingError, BulwarkError)


def test_the_worker_registers_one_task_per_job_kind(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from servicekit import ROOT

    from catalog import JOB_KINDS

    code = (
        "import json, worker.tasks as t\n"
        "print(json.dumps({k: (task.name, sorted(t.app.tasks)) for k, task in t.TASKS.items()}))"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "BULWARK_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout
    registered = json.loads(out.strip().splitlines()[-1])
    assert set(registered) == set(JOB_KINDS.names())
    for kind, (name, all_tasks) in registered.items():
        assert name == JOB_KINDS.get(kind).task and name in all_tasks
