"""Fixtures of the service tests: a fresh Postgres schema per session (migrated by Alembic),
a dedicated Redis database, tenants with keys, and real worker processes.

Postgres (127.0.0.1:5432, database ``test``) and Redis (127.0.0.1:6379) are used for real;
tests that need one skip with the reason when it is unreachable. Override with
``BULWARK_TEST_POSTGRES`` and ``BULWARK_TEST_REDIS``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from servicekit import (
    POSTGRES,
    REDIS,
    TABLES,
    Tenant,
    WorkerProcess,
    postgres_unreachable,
    redis_unreachable,
    schema_url,
)
from sqlalchemy import Engine, text

from common import migrate
from common.db import make_engine, make_session_factory
from common.settings import Settings


def pytest_configure(config: pytest.Config) -> None:
    # FastAPI's TestClient still rides on httpx; Starlette's nudge to httpx2 is noise here.
    config.addinivalue_line(
        "filterwarnings", "ignore:Using `httpx` with `starlette.testclient`:UserWarning"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/service/" in str(item.fspath):
            item.add_marker(pytest.mark.service)


@pytest.fixture(scope="session")
def postgres_schema() -> Iterator[str]:
    """A fresh, empty schema; dropped at the end."""
    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    schema = f"bulwark_test_{uuid.uuid4().hex[:10]}"
    admin = make_engine(POSTGRES)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield schema
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(scope="session")
def database_url(postgres_schema: str) -> Iterator[str]:
    """The session's schema, migrated to head."""
    url = schema_url(postgres_schema)
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    yield url


@pytest.fixture(scope="session")
def db_engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clean_db(db_engine: Engine) -> Engine:
    with db_engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    return db_engine


@pytest.fixture(scope="session")
def redis_url() -> str:
    reason = redis_unreachable()
    if reason:
        pytest.skip(reason)
    return REDIS


@pytest.fixture
def clean_redis(redis_url: str) -> Any:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # this test process's own database (servicekit.REDIS)
    yield client
    client.close()


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        DATABASE_URL=database_url,
        BROKER_URL=redis_url,
        data_dir=tmp_path / "data",
        lease_seconds=3,
        progress_interval_seconds=0,
        visibility_timeout_seconds=5,
        max_attempts=3,
    )


@pytest.fixture
def make_tenant(clean_db: Engine, settings: Settings) -> Callable[[str], Tenant]:
    from api.services.tenants import create_tenant

    def make(name: str) -> Tenant:
        with make_session_factory(clean_db)() as session:
            # The key's HMAC is made with the test deployment's key secret (its data dir's).
            created = create_tenant(session=session, name=name, settings=settings)
            return Tenant(id=created.tenant.id, key=created.api_key)

    return make


@pytest.fixture
def app(settings: Settings, clean_db: Engine, clean_redis: Any) -> Iterator[Any]:
    from api.app import create_app, dispose_engines

    application = create_app(settings)
    yield application
    dispose_engines(application)


@pytest.fixture
def client(app: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[[], WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
