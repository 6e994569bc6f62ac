"""Helpers of the service tests (no fixtures): database and Redis addresses, settings for child
processes, a worker process handle, polling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from common.db import make_engine
from common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
POSTGRES = os.environ.get(
    "BULWARK_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# One Redis database per test process, since the tests flush theirs: 13 for a plain run, 13,
# 12, ... for pytest-xdist's workers gw0, gw1, ... (make test runs two).
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
REDIS = os.environ.get("BULWARK_TEST_REDIS", f"redis://127.0.0.1:6379/{13 - XDIST_WORKER}")
TABLES = ("reports", "datasets", "jobs", "models", "api_keys", "tenants")


def postgres_unreachable() -> str | None:
    """Why Postgres cannot be used, or None."""
    engine = make_engine(POSTGRES, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        return f"Postgres at {POSTGRES} unreachable: {error}"
    finally:
        engine.dispose()
    return None


def redis_unreachable() -> str | None:
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_timeout=3).ping()
    except Exception as error:
        return f"Redis at {REDIS} unreachable: {error}"
    return None


def schema_url(schema: str) -> str:
    return f"{POSTGRES}?options=-csearch_path%3D{schema}"


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULWARK_")}
    env.pop("DATABASE_URL", None)
    env.pop("BROKER_URL", None)
    values = {
        "BULWARK_DATA_DIR": str(settings.data_dir),
        "BULWARK_LEASE_SECONDS": str(settings.lease_seconds),
        "BULWARK_PROGRESS_INTERVAL_SECONDS": str(settings.progress_interval_seconds),
        "BULWARK_VISIBILITY_TIMEOUT_SECONDS": str(settings.visibility_timeout_seconds),
        "BULWARK_MAX_ATTEMPTS": str(settings.max_attempts),
        "BULWARK_MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
    }
    if settings.database_url:
        values["DATABASE_URL"] = settings.database_url
    if settings.broker_url:
        values["BROKER_URL"] = settings.broker_url
    return {**env, **values, "PYTHONPATH": str(ROOT)}


@dataclass
class Tenant:
    id: uuid.UUID
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


class WorkerProcess:
    """``bulwark worker`` in its own process group (so SIGKILL takes its children too)."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bulwark.cli",
                "worker",
                "--loglevel=INFO",
                f"--hostname=test-{uuid.uuid4().hex[:6]}@%h",
            ],
            cwd=ROOT,
            env=settings_env(settings),
            start_new_session=True,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL the worker and its children: a machine that dies mid-job."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def add_model_row(db: Engine, tenant_id: uuid.UUID, **fields: Any) -> uuid.UUID:
    """A digits ConvNet's model row, as a finished pre-training job writes it (no file behind
    it: for tests of what the API does with rows). ``fields`` override the columns."""
    from sqlalchemy.orm import Session

    from common.models import StoredModel

    columns: dict[str, Any] = {
        "name": "m",
        "source": "pretrain",
        "arch": "convnet",
        "num_classes": 10,
        "in_channels": 1,
        "feature_dim": 128,
        "manifest": {"input_shape": [1, 8, 8]},
        "sha256": "0" * 64,
        "size_bytes": 1,
        "weights_key": "models/x/model.safetensors",
    }
    with Session(db) as session:
        model = StoredModel(tenant_id=tenant_id, **(columns | fields))
        session.add(model)
        session.commit()
        return model.id


def submit_audit_job(db: Engine, client: Any, tenant: Any) -> tuple[uuid.UUID, str]:
    """A model row of ``tenant`` and an audit of it submitted over HTTP (queued, never run):
    (model id, job id), for tests that then store the job's report as a worker would."""
    model_id = add_model_row(db, tenant.id)
    job = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={"model_id": str(model_id), "dataset": "digits"},
    )
    assert job.status_code == 202, job.text
    job_id: str = job.json()["id"]
    return model_id, job_id


def add_report_row(
    db: Engine, tenant_id: uuid.UUID, job_id: str, model_id: uuid.UUID, body: dict[str, Any]
) -> None:
    """The report row a worker writes when the audit ``job_id`` finishes."""
    from sqlalchemy.orm import Session

    from common.models import Report

    with Session(db) as session:
        session.add(
            Report(tenant_id=tenant_id, job_id=uuid.UUID(job_id), model_id=model_id, body=body)
        )
        session.commit()


PROBLEM_MEMBERS = ("type", "title", "status", "detail", "instance")


def problem(response: Any, status: int | None = None) -> dict[str, Any]:
    """The RFC 9457 problem body of an error answer, after checking its media type, its
    standard members (``status`` equal to the HTTP status, ``instance`` the request's path)
    and, given ``status``, the HTTP status itself."""
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text)
    media_type = response.headers.get("content-type", "").split(";")[0]
    assert media_type == "application/problem+json", (media_type, response.text)
    body = response.json()
    missing = [member for member in PROBLEM_MEMBERS if member not in body]
    assert not missing, (missing, body)
    assert body["status"] == response.status_code, body
    assert body["instance"] == response.request.url.path, body
    assert body["type"] == "about:blank" or body["type"].startswith(
        "https://bulwark.dev/problems/"
    ), body
    return body


def problem_errors(response: Any, status: int = 422) -> list[dict[str, Any]]:
    """The ``errors`` (each ``loc``, ``msg``, ``type``) of a validation problem."""
    errors = problem(response, status)["errors"]
    assert errors and all({"loc", "msg", "type"} <= set(error) for error in errors), errors
    return errors
