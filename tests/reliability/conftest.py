"""Fixtures of the reliability suite: its own Postgres cluster and Redis server on free loopback
ports (started and stopped here, by pid), `bulwark serve` and `bulwark worker` as real
processes against them, a tenant, and one uninterrupted pre-training and audit to compare
with.

Every test here is marked ``reliability`` (and ``e2e``: real processes, so `make test-fast`
leaves them out). ``BULWARK_RELIABILITY_REPEATS`` sets how often each fault is repeated: 1 by
default (what `make test`, so CI, runs per commit), 5 under `make test-reliability`.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliabilitykit import (
    AUDITED_PRETRAIN,
    HOST,
    PostgresCluster,
    RedisServer,
    ServiceProcess,
    UninterruptedAudit,
    Worker,
    free_port,
    job_row,
    model_sha256,
    postgres_bin,
    report_rows,
    service_env,
    submit_audit,
    submit_pretrain,
    wait_for,
)
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from common import migrate
from common.db import make_engine, make_session_factory
from common.models import Job, JobStatus


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability/" in str(item.fspath):
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    if postgres_bin() is None:
        pytest.skip("no PostgreSQL server under /usr/lib/postgresql/*/bin for the suite")
    # Its own folder outside pytest's (whose parents are private to this user): the server
    # may run as the ``postgres`` user, which must reach it.
    folder = Path(tempfile.mkdtemp(prefix="bulwark-reliability-postgres-"))
    try:
        try:
            cluster = PostgresCluster(folder)
        except RuntimeError as error:
            pytest.skip(str(error))
        cluster.start()
        yield cluster
        cluster.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
    except RuntimeError as error:
        pytest.skip(str(error))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def db(postgres: PostgresCluster) -> Iterator[Engine]:
    """The suite's database, migrated to head."""
    engine = make_engine(postgres.url, connect_args={"connect_timeout": 3})
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def env(
    postgres: PostgresCluster, redis_server: RedisServer, db: Engine, tmp_path_factory: Any
) -> dict[str, str]:
    return service_env(
        database_url=postgres.url,
        broker_url=redis_server.url,
        data_dir=tmp_path_factory.mktemp("service-data"),
    )


@pytest.fixture(scope="session")
def api(env: dict[str, str], tmp_path_factory: Any) -> Iterator[str]:
    """`bulwark serve --no-worker` on a free port; its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "serve.log"
    server = ServiceProcess(["serve", "--no-worker", "--host", HOST, "--port", str(port)], env, log)
    base = f"http://{HOST}:{port}"

    def healthy() -> bool:
        if server.process.poll() is not None:
            raise AssertionError(f"bulwark serve exited: {server.output()[-3000:]}")
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=60, what="bulwark serve")
    yield base
    server.stop()


@pytest.fixture(scope="session")
def client(api: str, db: Engine, env: dict[str, str]) -> Iterator[httpx.Client]:
    """An HTTP client of the API with a tenant's key."""
    from api.services.tenants import create_tenant
    from common.settings import Settings

    # The key's HMAC is made with the served API's key secret (in its data dir).
    served = Settings(data_dir=Path(env["BULWARK_DATA_DIR"]))
    with make_session_factory(db)() as session:
        name = f"reliability-{uuid.uuid4().hex[:6]}"
        key = create_tenant(session=session, name=name, settings=served).api_key
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
        yield http


@pytest.fixture
def quiet_queue(db: Engine, redis_server: RedisServer) -> None:
    """No job of an earlier (failed) test is left to run: each test sees only its own."""
    import redis

    with Session(db) as session:
        session.execute(
            update(Job)
            .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
            .values(status=JobStatus.FAILED, error="left over by an earlier test")
        )
        session.commit()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()


@pytest.fixture
def start_worker(
    env: dict[str, str], tmp_path: Path, quiet_queue: None
) -> Iterator[Callable[[], Worker]]:
    """``start_worker()``: a `bulwark worker` process, waited for until ready; all are stopped
    (by their process group) at the end of the test."""
    workers: list[Worker] = []

    def start(wait: bool = True) -> Worker:
        worker = Worker(env, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        if wait:
            wait_for(worker.ready, timeout=90, what="the worker to be ready")
        return worker

    yield start
    for worker in workers:
        worker.kill()


@pytest.fixture(scope="session")
def reference_sha256(
    client: httpx.Client, db: Engine, env: dict[str, str], tmp_path_factory: Any
) -> str:
    """The weights' sha256 of an uninterrupted run of :data:`PRETRAIN` on this service."""
    worker = Worker(env, tmp_path_factory.mktemp("reference") / "worker.log")
    try:
        job_id = submit_pretrain(client, name="uninterrupted")
        job = wait_for(
            lambda: (row := job_row(db, job_id)).status.finished and row,
            timeout=240,
            interval=0.5,
            what="the uninterrupted pre-training",
        )
        assert job.status == JobStatus.SUCCEEDED, (job.error, worker.output()[-3000:])
        assert job.attempts == 1
        return model_sha256(db, job)
    finally:
        worker.kill()


@pytest.fixture(scope="session")
def uninterrupted_audit(
    client: httpx.Client, db: Engine, env: dict[str, str], tmp_path_factory: Any
) -> UninterruptedAudit:
    """The model the audit faults audit (a short pre-training on this service) and the rows of
    :data:`reliabilitykit.AUDIT` on it, run once without a fault."""
    worker = Worker(env, tmp_path_factory.mktemp("reference-audit") / "worker.log")

    def finished(job_id: str, what: str) -> Job:
        job: Job = wait_for(
            lambda: (row := job_row(db, job_id)).status.finished and row,
            timeout=240,
            interval=0.5,
            what=what,
        )
        assert job.status == JobStatus.SUCCEEDED, (job.error, worker.output()[-3000:])
        assert job.attempts == 1
        return job

    try:
        pretrain_id = submit_pretrain(client, **AUDITED_PRETRAIN, name="audited")
        model_id = str(finished(pretrain_id, "the audited model's pre-training").result_model_id)
        audit_id = submit_audit(client, model_id)
        finished(audit_id, "the uninterrupted audit")
        return UninterruptedAudit(model_id=model_id, rows=report_rows(client, audit_id))
    finally:
        worker.kill()
