"""Faults an operator meets, on the real service: workers killed or stopped mid-job, Redis
restarted without persistence (with a live worker and with none), Postgres down. No job is
stuck or lost, a resumed pre-training ends with the weights of an uninterrupted one, a resumed
audit does not craft its finished attacks again and reports the rows of an uninterrupted one,
and the API answers 503, never 500.

Each fault is repeated ``BULWARK_RELIABILITY_REPEATS`` times (1 per commit in CI, 5 under
`make test-reliability`). Every wait is bounded; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
from reliabilitykit import (
    AUDIT_ATTACKS,
    EPOCHS,
    LEASE_SECONDS,
    PRETRAIN,
    SWEEP_SECONDS,
    PostgresCluster,
    RedisServer,
    UninterruptedAudit,
    Worker,
    audit_state_file,
    job_row,
    model_sha256,
    report_rows,
    submit_audit,
    submit_pretrain,
    wait_for,
)
from sqlalchemy import Engine

from common.models import Job, JobStatus
from worker.jobs import REQUEUED_MESSAGE

REPEATS = int(os.environ.get("BULWARK_RELIABILITY_REPEATS", "1"))
repeated = pytest.mark.parametrize("repetition", range(REPEATS))
# The slack, past the lease and a sweep, that a busy 2-core machine needs to poll, re-send,
# deliver and claim.
SLACK_SECONDS = 10.0
SMALL_PRETRAIN = {**PRETRAIN, "epochs": 1}


def wait_past_first_epoch(db: Engine, job_id: str) -> Job:
    """The job once its first epoch is done and checkpointed (the core writes the resumable
    state at the end of each epoch, before reporting the next one)."""
    return wait_for(
        lambda: (row := job_row(db, job_id)).message.startswith(f"epoch 2/{EPOCHS}") and row,
        timeout=180,
        interval=0.05,
        what="the end of the first epoch",
    )


class ResumeWatch:
    """Polls a job until it ends, noting the epochs each attempt reported and when the job was
    first seen claimed again after a fault."""

    def __init__(self, db: Engine, job_id: str) -> None:
        self.db, self.job_id = db, job_id
        self.epochs: dict[int, set[int]] = {}
        self.statuses: list[JobStatus] = []

    def until_finished(
        self, *, timeout: float, claimed: Callable[[Job], bool] = lambda _job: False
    ) -> tuple[Job, float | None]:
        claimed_at: float | None = None

        def poll() -> Job | None:
            nonlocal claimed_at
            job = job_row(self.db, self.job_id)
            self.statuses.append(job.status)
            if claimed_at is None and claimed(job):
                claimed_at = time.monotonic()
            epochs = re.match(rf"epoch (\d+)/{EPOCHS}", job.message)
            if job.status == JobStatus.RUNNING and epochs:
                self.epochs.setdefault(job.attempts, set()).add(int(epochs.group(1)))
            return job if job.status.finished else None

        return wait_for(poll, timeout=timeout, interval=0.05, what="the job to end"), claimed_at


FIRST_PHASE, NEXT_PHASE = (f"craft:{name}" for name in AUDIT_ATTACKS)


def wait_past_first_attack(
    db: Engine, env: dict[str, str], job_id: str
) -> tuple[Job, os.stat_result]:
    """The audit once its first attack is done and kept (its ``AuditState`` file, written
    atomically, exists) while the next one crafts; and that file's identity (inode, mtime)."""
    state = audit_state_file(env, job_id)

    def kept() -> tuple[Job, os.stat_result] | None:
        job = job_row(db, job_id)
        assert not job.status.finished, (job.status, job.error)
        return (job, state.stat()) if state.is_file() else None

    found: tuple[Job, os.stat_result] = wait_for(
        kept, timeout=180, interval=0.05, what="the end of the audit's first attack"
    )
    return found


class AuditWatch:
    """Polls an audit until it ends, noting the phases each run (a pool child: the job's
    ``worker``) reported, and whether the first attack's state file was still the one written
    before the fault when a run after it reached the next attack."""

    def __init__(self, db: Engine, env: dict[str, str], job_id: str, *, stopped_run: str) -> None:
        self.db, self.job_id, self.stopped_run = db, job_id, stopped_run
        self.state = audit_state_file(env, job_id)
        self.phases: dict[str, set[str]] = {}
        self.statuses: list[JobStatus] = []
        self.kept_on_resume: tuple[int, int] | None = None  # (inode, mtime ns) then

    def until_finished(self, *, timeout: float) -> Job:
        def poll() -> Job | None:
            job = job_row(self.db, self.job_id)
            self.statuses.append(job.status)
            if job.status == JobStatus.RUNNING and job.worker:
                self.phases.setdefault(job.worker, set()).add(job.phase)
                resumed = job.worker != self.stopped_run and job.phase == NEXT_PHASE
                if resumed and self.kept_on_resume is None:
                    kept = self.state.stat()  # a resumed run crafts with the file in place
                    self.kept_on_resume = (kept.st_ino, kept.st_mtime_ns)
            return job if job.status.finished else None

        job: Job = wait_for(poll, timeout=timeout, interval=0.05, what="the audit to end")
        return job

    def assert_resumed(self, kept: os.stat_result) -> None:
        """One run after the fault, which never crafted the first attack again: it reached the
        next attack with the first one's file as it was before the fault."""
        resumed = {run: phases for run, phases in self.phases.items() if run != self.stopped_run}
        assert len(resumed) == 1, self.phases
        (phases,) = resumed.values()
        assert NEXT_PHASE in phases and FIRST_PHASE not in phases, self.phases
        assert self.kept_on_resume == (kept.st_ino, kept.st_mtime_ns)


def start_workers(start_worker: Callable[..., Worker], count: int) -> list[Worker]:
    """``count`` workers booting side by side (a boot is mostly imports)."""
    workers = [start_worker(wait=False) for _ in range(count)]
    for worker in workers:
        wait_for(worker.ready, timeout=90, what="the worker to be ready")
    return workers


@repeated
def test_a_worker_killed_mid_pretraining_is_taken_over_by_a_live_worker(
    repetition: int,
    client: httpx.Client,
    db: Engine,
    start_worker: Callable[..., Worker],
    reference_sha256: str,
) -> None:
    """SIGKILL (a machine dying) after epoch 1: the other, live worker takes the job over
    within the lease and a sweep, resumes it from its last epoch, and the model equals an
    uninterrupted run's bit for bit."""
    workers = start_workers(start_worker, 2)
    job_id = submit_pretrain(client, name=f"killed-{repetition}")
    job = wait_past_first_epoch(db, job_id)
    holder = next(worker for worker in workers if worker.holds(job.worker))
    survivor = next(worker for worker in workers if worker is not holder)
    holder.kill()
    killed_at = time.monotonic()
    assert job_row(db, job_id).status == JobStatus.RUNNING

    watch = ResumeWatch(db, job_id)
    job, claimed_at = watch.until_finished(
        timeout=240, claimed=lambda row: row.status == JobStatus.RUNNING and row.attempts == 2
    )
    assert job.status == JobStatus.SUCCEEDED, (job.error, survivor.output()[-3000:])
    assert job.attempts == 2
    assert survivor.holds(job.worker) or job.worker is None
    assert claimed_at is not None
    assert claimed_at - killed_at < LEASE_SECONDS + SWEEP_SECONDS + SLACK_SECONDS, (
        f"taken over after {claimed_at - killed_at:.1f} s"
    )
    assert JobStatus.QUEUED in watch.statuses  # the sweep put it back in the queue
    resumed = watch.epochs.get(2, set())
    assert resumed and min(resumed) >= 2, watch.epochs  # resumed from epoch 2, not restarted
    assert model_sha256(db, job) == reference_sha256


def stop_and_see_it_given_back(worker: Worker, target: str, db: Engine, job_id: str) -> None:
    """SIGTERM to the worker's process group or its main process: the job must be queued
    again within the lease, unattributed and with the attempt not counted (being stopped is not
    a crash), and the worker's warm shutdown must end once it is given back."""
    if target == "group":
        worker.signal_group(signal.SIGTERM)
    else:
        worker.process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    given = wait_for(
        lambda: (row := job_row(db, job_id)).status == JobStatus.QUEUED and row,
        timeout=LEASE_SECONDS,
        interval=0.05,
        what="the job to be given back",
    )
    assert time.monotonic() - stopped_at < LEASE_SECONDS
    assert given.message == REQUEUED_MESSAGE and given.worker is None and given.attempts == 0
    worker.process.wait(timeout=60)


# SIGTERM to the main process only (``docker stop``) runs in the full set; per commit, the group.
SIGTERM_TARGETS = ["group", "main"] if REPEATS > 1 else ["group"]


@repeated
@pytest.mark.parametrize("target", SIGTERM_TARGETS)
def test_a_worker_stopped_with_sigterm_gives_its_job_back_at_once(
    repetition: int,
    target: str,
    client: httpx.Client,
    db: Engine,
    start_worker: Callable[..., Worker],
    reference_sha256: str,
) -> None:
    """SIGTERM to the worker's process group (``kill -TERM -PGID``), or to its main process
    only (``docker stop``): the job is back in the queue at once, not after its lease, the
    worker exits, and a restarted worker finishes it from its last epoch."""
    (worker,) = start_workers(start_worker, 1)
    job_id = submit_pretrain(client, name=f"stopped-{target}-{repetition}")
    wait_past_first_epoch(db, job_id)
    stop_and_see_it_given_back(worker, target, db, job_id)

    restarted = start_worker()
    watch = ResumeWatch(db, job_id)
    job, _ = watch.until_finished(timeout=240)
    assert job.status == JobStatus.SUCCEEDED, (job.error, restarted.output()[-3000:])
    assert job.attempts == 1
    resumed = watch.epochs.get(1, set())
    assert resumed and min(resumed) >= 2, watch.epochs
    assert model_sha256(db, job) == reference_sha256


@repeated
def test_a_worker_killed_mid_audit_is_taken_over_and_resumes_after_its_last_attack(
    repetition: int,
    client: httpx.Client,
    db: Engine,
    env: dict[str, str],
    start_worker: Callable[..., Worker],
    uninterrupted_audit: UninterruptedAudit,
) -> None:
    """SIGKILL once an audit (one task) has kept its first attack and crafts the next: the live
    worker takes it over, does not craft the first attack again, and the report's rows equal
    an uninterrupted run's."""
    workers = start_workers(start_worker, 2)
    job_id = submit_audit(client, uninterrupted_audit.model_id)
    job, kept = wait_past_first_attack(db, env, job_id)
    holder = next(worker for worker in workers if worker.holds(job.worker))
    survivor = next(worker for worker in workers if worker is not holder)
    holder.kill()
    assert job_row(db, job_id).status == JobStatus.RUNNING
    assert job.worker is not None
    assert not audit_state_file(env, job_id, f"model-{AUDIT_ATTACKS[1]}-round0.pt").exists()

    watch = AuditWatch(db, env, job_id, stopped_run=job.worker)
    job = watch.until_finished(timeout=240)
    assert job.status == JobStatus.SUCCEEDED, (job.error, survivor.output()[-3000:])
    assert job.attempts == 2
    assert JobStatus.QUEUED in watch.statuses  # the sweep put it back in the queue
    assert survivor.ran(job_id, next(run for run in watch.phases if run != watch.stopped_run))
    watch.assert_resumed(kept)
    assert report_rows(client, job_id) == uninterrupted_audit.rows


@repeated
@pytest.mark.parametrize("target", SIGTERM_TARGETS)
def test_a_worker_stopped_with_sigterm_mid_audit_gives_it_back_and_it_resumes(
    repetition: int,
    target: str,
    client: httpx.Client,
    db: Engine,
    env: dict[str, str],
    start_worker: Callable[..., Worker],
    uninterrupted_audit: UninterruptedAudit,
) -> None:
    """SIGTERM (process group, or main process only) once an audit has kept its first attack:
    the audit is back in the queue at once, a restarted worker resumes it after that attack,
    and the report's rows equal an uninterrupted run's."""
    (worker,) = start_workers(start_worker, 1)
    job_id = submit_audit(client, uninterrupted_audit.model_id)
    job, kept = wait_past_first_attack(db, env, job_id)
    assert job.worker is not None
    stop_and_see_it_given_back(worker, target, db, job_id)

    restarted = start_worker()
    watch = AuditWatch(db, env, job_id, stopped_run=job.worker)
    job = watch.until_finished(timeout=240)
    assert job.status == JobStatus.SUCCEEDED, (job.error, restarted.output()[-3000:])
    assert job.attempts == 1
    assert restarted.ran(job_id, next(run for run in watch.phases if run != watch.stopped_run))
    watch.assert_resumed(kept)
    assert report_rows(client, job_id) == uninterrupted_audit.rows


@repeated
def test_no_queued_job_is_lost_when_redis_restarts_under_a_live_worker(
    repetition: int,
    client: httpx.Client,
    db: Engine,
    start_worker: Callable[..., Worker],
    redis_server: RedisServer,
) -> None:
    """Redis without persistence restarts while a worker runs one job and three wait: their
    messages are gone, the sweep re-sends them, and all four finish."""

    (worker,) = start_workers(start_worker, 1)
    running = submit_pretrain(client, name=f"running-{repetition}", epochs=2)
    wait_for(
        lambda: job_row(db, running).status == JobStatus.RUNNING, timeout=60, what="the first job"
    )
    waiting = [
        submit_pretrain(client, name=f"waiting-{repetition}-{i}", epochs=1) for i in range(3)
    ]
    restart_redis_and_see_the_queue_emptied(redis_server, queued=3)

    jobs = [running, *waiting]
    # Bounded by the jobs' own run time (about 5 epochs in all), the re-send delay and slack.
    wait_until_every_job_succeeded(db, jobs, worker)


def restart_redis_and_see_the_queue_emptied(redis_server: RedisServer, *, queued: int) -> None:
    """Restart Redis (no persistence): the ``queued`` messages on the gpu queue are gone."""
    import redis

    broker = redis.Redis.from_url(redis_server.url)
    assert broker.llen("gpu") == queued  # their messages are in the queue...
    broker.close()
    redis_server.stop()
    redis_server.start()
    broker = redis.Redis.from_url(redis_server.url)
    assert broker.llen("gpu") == 0  # ...and gone with the restart
    broker.close()


def wait_until_every_job_succeeded(db: Engine, jobs: list[str], worker: Worker) -> dict[str, Job]:
    """Each job's final row, once all have ended; every one must have succeeded."""
    wait_for(
        lambda: all(job_row(db, job_id).status.finished for job_id in jobs),
        timeout=240,
        interval=0.5,
        what="every job to end",
    )
    ends = {job_id: job_row(db, job_id) for job_id in jobs}
    assert all(job.status == JobStatus.SUCCEEDED for job in ends.values()), (
        {job_id: (job.status, job.error) for job_id, job in ends.items()},
        worker.output()[-3000:],
    )
    return ends


@repeated
def test_no_queued_job_is_lost_when_redis_restarts_with_no_worker_running(
    repetition: int,
    client: httpx.Client,
    db: Engine,
    start_worker: Callable[..., Worker],
    redis_server: RedisServer,
) -> None:
    """Jobs wait with no worker up; Redis without persistence restarts and loses their
    messages; a worker that starts afterwards runs every one of them, each once."""

    jobs = [submit_pretrain(client, name=f"unworked-{repetition}-{i}", epochs=1) for i in range(3)]
    restart_redis_and_see_the_queue_emptied(redis_server, queued=3)
    assert all(job_row(db, job_id).status == JobStatus.QUEUED for job_id in jobs)

    worker = start_worker()
    ends = wait_until_every_job_succeeded(db, jobs, worker)
    assert all(job.attempts == 1 for job in ends.values())  # re-sent, never run twice


@repeated
def test_a_postgres_outage_answers_503_and_the_job_still_finishes(
    repetition: int,
    client: httpx.Client,
    db: Engine,
    start_worker: Callable[..., Worker],
    postgres: PostgresCluster,
    reference_sha256: str,
) -> None:
    """Postgres stops for 10 s while a client polls its job and submits new ones: every answer
    is 2xx or 503 (never 500), and every accepted job finishes once the database is back."""
    (worker,) = start_workers(start_worker, 1)
    job_id = submit_pretrain(client, name=f"outage-{repetition}")
    wait_past_first_epoch(db, job_id)

    answers: Counter[tuple[str, int]] = Counter()
    accepted: list[str] = []
    outage, stop = threading.Event(), threading.Event()

    def submit() -> None:
        response = client.post("/v1/jobs/pretrain", json=SMALL_PRETRAIN)
        answers["POST", response.status_code] += 1
        if response.status_code == 202:
            accepted.append(str(response.json()["id"]))

    def use_the_api() -> None:
        last_submit = 0.0
        for _ in range(2000):  # bounded: 10 per second for at most 200 s
            if stop.is_set():
                return
            answers["GET", client.get(f"/v1/jobs/{job_id}").status_code] += 1
            if outage.is_set() and time.monotonic() - last_submit > 2:
                last_submit = time.monotonic()
                submit()
            time.sleep(0.1)

    user = threading.Thread(target=use_the_api, daemon=True)
    user.start()
    try:
        time.sleep(1)
        outage.set()
        postgres.stop()
        time.sleep(10)
        postgres.start()
        outage.clear()
        time.sleep(3)
    finally:
        stop.set()
        user.join(timeout=30)
    assert not user.is_alive()
    statuses = {status for _method, status in answers}
    assert statuses <= {200, 202, 503}, answers
    assert ("GET", 503) in answers, answers  # the outage was seen, and said so
    submit()  # and once the database is back, submitting works again
    assert answers["POST", 202] >= 1, answers

    wait_for(
        lambda: all(job_row(db, one).status.finished for one in [job_id, *accepted]),
        timeout=240,
        interval=0.5,
        what="the accepted jobs to end",
    )
    for accepted_id in [job_id, *accepted]:
        job = job_row(db, accepted_id)
        assert job.status == JobStatus.SUCCEEDED, (job.error, worker.output()[-3000:])
    assert model_sha256(db, job_row(db, job_id)) == reference_sha256
