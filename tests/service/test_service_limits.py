"""Abuse limits and API keys on the real Postgres and Redis: per-tenant rate limits, failed
authentication throttling, the active-jobs and stored-bytes quotas, job size bounds, keys stored
as HMACs (old sha256 keys upgraded on use), revocation from the CLI and rotation over HTTP."""

from __future__ import annotations

import hashlib
import hmac
import io
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr
from servicekit import ROOT, add_model_row, problem, problem_errors, settings_env
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.ratelimit import AuthThrottledError, Limiter, MemoryBuckets, RateLimitedError
from common.models import ApiKey, Tenant
from common.settings import Settings

PRETRAIN = {
    "dataset": "digits",
    "arch": "convnet",
    "defense": "none",
    "recipe": "quick",
    "epochs": 1,
}


@pytest.fixture
def limited_client(settings: Settings, clean_db: Any, clean_redis: Any) -> Callable[..., Any]:
    """A test client of an app whose settings differ from the fixture's by ``overrides``."""
    from fastapi.testclient import TestClient

    from api.app import create_app, dispose_engines

    @contextmanager
    def make(**overrides: Any) -> Iterator[Any]:
        application = create_app(settings.model_copy(update=overrides))
        try:
            with TestClient(application) as client:
                yield client
        finally:
            dispose_engines(application)

    return make


def test_rate_limit_answers_429_with_retry_after_after_the_burst(
    limited_client, make_tenant, clean_redis
) -> None:
    busy, quiet = make_tenant("busy"), make_tenant("quiet")
    with limited_client(rate_limit_per_second=0.2, rate_limit_burst=3) as client:
        for _ in range(3):
            assert client.get("/v1/jobs", headers=busy.headers).status_code == 200
        response = client.get("/v1/jobs", headers=busy.headers)
        body = problem(response, 429)
        assert body["type"].endswith("/rate-limited"), body
        # One token comes back every 5 s.
        assert 1 <= int(response.headers["Retry-After"]) <= 5, response.headers
        # Another tenant has its own bucket.
        assert client.get("/v1/jobs", headers=quiet.headers).status_code == 200
    # The buckets live in Redis (the deployment's broker), shared by every API process.
    keys = {key.decode() for key in clean_redis.keys("bulwark:limits:rate:*")}
    assert keys == {f"bulwark:limits:rate:{busy.id}", f"bulwark:limits:rate:{quiet.id}"}


def test_rate_limit_without_redis_is_kept_in_process() -> None:
    """The embedded deployment (no Redis) has the same buckets, in the API process."""
    settings = Settings(rate_limit_per_second=0.1, rate_limit_burst=2)
    limiter = Limiter(settings, redis_url=None)
    tenant = Tenant(id=uuid.uuid4(), name="embedded")
    limiter.check_rate(tenant)
    limiter.check_rate(tenant)
    with pytest.raises(RateLimitedError) as raised:
        limiter.check_rate(tenant)
    assert raised.value.headers() == {"Retry-After": "10"}
    buckets = MemoryBuckets()
    assert buckets.take("k", rate=1000.0, burst=1) == 0
    assert 0 < buckets.take("k", rate=1000.0, burst=1) <= 0.001


def test_failed_authentication_is_throttled_per_client(limited_client, make_tenant) -> None:
    tenant = make_tenant("victim")
    with limited_client(auth_failure_limit=3, auth_failure_window_seconds=60) as client:
        # A missing key is not a guess: it never counts.
        for _ in range(5):
            problem(client.get("/v1/jobs"), 401)
        for guess in range(3):
            wrong = {"Authorization": f"Bearer bwk_guess{guess}"}
            problem(client.get("/v1/jobs", headers=wrong), 401)
        # From now on this address is refused before any key is looked at, the right one too.
        response = client.get("/v1/jobs", headers=tenant.headers)
        body = problem(response, 429)
        assert body["type"].endswith("/authentication-throttled"), body
        assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_a_poll_with_a_cached_key_is_limited_like_any_request(
    limited_client, make_tenant, clean_redis
) -> None:
    """A status poll whose key this process already knows checks the client's throttle and
    the tenant's rate in one Redis script (``Limiter.admit``): the same 429s, the same bucket."""
    tenant = make_tenant("poller")
    with limited_client(rate_limit_per_second=0.2, rate_limit_burst=3) as client:
        job = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers)
        poll = f"/v1/jobs/{job.json()['id']}"
        assert client.get(poll, headers=tenant.headers).status_code == 200  # looked up
        assert client.get(poll, headers=tenant.headers).status_code == 200  # cached
        body = problem(client.get(poll, headers=tenant.headers), 429)
        assert body["type"].endswith("/rate-limited"), body
    keys = {key.decode() for key in clean_redis.keys("bulwark:limits:rate:*")}
    assert keys == {f"bulwark:limits:rate:{tenant.id}"}
    with limited_client(auth_failure_limit=2, auth_failure_window_seconds=60) as client:
        assert client.get(poll, headers=tenant.headers).status_code == 200
        for guess in range(2):
            wrong = {"Authorization": f"Bearer bwk_guess{guess}"}
            problem(client.get(poll, headers=wrong), 401)
        # The key is cached, but the address is throttled: refused all the same.
        body = problem(client.get(poll, headers=tenant.headers), 429)
        assert body["type"].endswith("/authentication-throttled"), body


def test_admission_in_process_checks_the_throttle_then_the_rate() -> None:
    settings = Settings(rate_limit_per_second=0.1, rate_limit_burst=1, auth_failure_limit=1)
    limiter = Limiter(settings, redis_url=None)
    tenant = Tenant(id=uuid.uuid4(), name="embedded")
    limiter.admit("10.0.0.1", tenant)
    with pytest.raises(RateLimitedError):
        limiter.admit("10.0.0.1", tenant)
    limiter.record_failure("10.0.0.2")
    with pytest.raises(AuthThrottledError):
        limiter.admit("10.0.0.2", Tenant(id=uuid.uuid4(), name="other"))


def npz_bytes() -> bytes:
    """A tiny, well-formed npz dataset (3 classes of 4 8x8 images)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 4).astype(np.int64)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        x_train=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        y_train=labels,
        x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
        y_test=labels,
    )
    return buffer.getvalue()


def test_active_jobs_quota_answers_429_naming_the_quota(
    limited_client, make_tenant, settings
) -> None:
    tenant, other = make_tenant("a"), make_tenant("b")
    stored = settings.resolved_artifact_dir
    with limited_client(max_active_jobs=2) as client:
        first = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers)
        second = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers)
        assert first.status_code == second.status_code == 202, (first.text, second.text)
        response = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers)
        body = problem(response, 429)
        assert body["quota"] == "max_active_jobs" and body["limit"] == 2 and body["used"] == 2
        assert response.headers["Retry-After"] == "30"
        # A retried request (same Idempotency-Key) finds its job: no new job, no quota.
        again = {**tenant.headers, "Idempotency-Key": "k1"}
        client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=tenant.headers)
        keyed = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=again)
        assert keyed.status_code == 202, keyed.text
        assert client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=again).status_code == 202
        # A dataset upload queues a job too: refused at the quota, leaving no file or row.
        response = client.post(
            "/v1/datasets",
            headers=tenant.headers,
            files={"file": ("tiny.npz", npz_bytes(), "application/octet-stream")},
        )
        assert problem(response, 429)["quota"] == "max_active_jobs"
        assert client.get("/v1/datasets", headers=tenant.headers).json()["total"] == 0
        assert not [path for path in stored.rglob("*") if path.is_file()]
        # The quota is per tenant.
        assert (
            client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=other.headers).status_code
            == 202
        )


def test_stored_bytes_quota_answers_413_naming_the_quota(
    limited_client, make_tenant, clean_db
) -> None:
    tenant = make_tenant("full")
    add_model_row(clean_db, tenant.id, size_bytes=900)
    deleted = add_model_row(clean_db, tenant.id, size_bytes=10_000)
    with Session(clean_db) as session:  # a deleted model no longer counts
        from common.models import StoredModel, utcnow

        row = session.get(StoredModel, deleted)
        assert row is not None
        row.deleted_at = utcnow()
        session.commit()
    with limited_client(max_stored_bytes=1000) as client:

        def send(size: int) -> Any:
            return client.post(
                "/v1/models",
                headers=tenant.headers,
                data={"arch": "convnet"},
                files={"file": ("m.safetensors", b"x" * size, "application/octet-stream")},
            )

        # 100 bytes fit: the upload is then judged on its content (not a safetensors file).
        problem(send(100), 422)
        response = send(101)
        body = problem(response, 413)
        assert body["type"].endswith("/storage-quota-exceeded"), body
        assert (body["quota"], body["limit"], body["used"], body["requested"]) == (
            "max_stored_bytes",
            1000,
            900,
            101,
        )


def test_job_sizes_past_the_settings_get_a_422_naming_the_field(
    limited_client, make_tenant, clean_db
) -> None:
    tenant = make_tenant("big")
    model_id = add_model_row(clean_db, tenant.id)
    with limited_client(max_audit_work=10_000, max_pretrain_work=100_000) as client:
        audit = {"model_id": str(model_id), "dataset": "digits", "pairs": [[0, 1]]}
        small = {**audit, "iterations": 10, "targets_per_pair": 2}
        assert client.post("/v1/jobs/audit", json=small, headers=tenant.headers).status_code == 202
        big = {**audit, "iterations": 5000, "targets_per_pair": 2}
        errors = problem_errors(client.post("/v1/jobs/audit", json=big, headers=tenant.headers))
        assert [error["loc"] for error in errors] == [["body", "iterations"]], errors
        assert "BULWARK_MAX_AUDIT_WORK" in errors[0]["msg"], errors
        many = {**audit, "iterations": 10, "targets_per_pair": 2000}
        errors = problem_errors(client.post("/v1/jobs/audit", json=many, headers=tenant.headers))
        assert [error["loc"] for error in errors] == [["body", "targets_per_pair"]], errors
        # digits' quick split: the epochs are what is too big here.
        long = {**PRETRAIN, "epochs": 5000}
        errors = problem_errors(client.post("/v1/jobs/pretrain", json=long, headers=tenant.headers))
        assert [error["loc"] for error in errors] == [["body", "epochs"]], errors
        assert "epochs 5000" in errors[0]["msg"], errors


def key_rows(db: Any, tenant_id: uuid.UUID) -> list[ApiKey]:
    with Session(db) as session:
        return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id)))


def test_keys_are_stored_as_hmacs_with_the_server_secret(
    client, make_tenant, clean_db, settings
) -> None:
    tenant = make_tenant("stored")
    secret_file = settings.data_dir / "key-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    [row] = key_rows(clean_db, tenant.id)
    plain = hashlib.sha256(tenant.key.encode()).hexdigest()
    assert row.key_hash != plain and row.hash_scheme == "hmac-sha256"
    secret = secret_file.read_bytes().strip()
    assert row.key_hash == hmac.new(secret, tenant.key.encode(), hashlib.sha256).hexdigest()
    with Session(clean_db) as session:  # no column of any key row holds the plain digest
        assert session.scalar(select(ApiKey).where(ApiKey.key_hash == plain)) is None
    assert client.get("/v1/jobs", headers=tenant.headers).status_code == 200
    assert key_rows(clean_db, tenant.id)[0].last_used_at is not None


def test_an_old_sha256_key_still_works_and_is_upgraded_on_use(client, clean_db) -> None:
    key = "bwk_" + uuid.uuid4().hex + uuid.uuid4().hex
    with Session(clean_db) as session:
        tenant = Tenant(name="legacy")
        session.add(tenant)
        session.flush()
        session.add(
            ApiKey(
                tenant_id=tenant.id,
                key_hash=hashlib.sha256(key.encode()).hexdigest(),
                hash_scheme="sha256",
                prefix=key[:10],
            )
        )
        session.commit()
        tenant_id = tenant.id
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    [row] = key_rows(clean_db, tenant_id)
    assert row.hash_scheme == "hmac-sha256"
    assert row.key_hash != hashlib.sha256(key.encode()).hexdigest()
    assert client.get("/v1/jobs", headers=headers).status_code == 200  # by its HMAC now


def tenants_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bulwark.cli", "tenants", *args],
        cwd=ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow  # seconds of CPU or a subprocess: out of make test-fast
def test_keys_are_revoked_with_the_cli(client, make_tenant, clean_db, settings) -> None:
    tenant, bystander = make_tenant("leaky"), make_tenant("bystander")
    made = tenants_cli(settings, "new-key", "leaky")
    assert made.returncode == 0, made.stderr
    second_key = made.stdout.strip().rsplit(" ", 1)[-1]
    second = {"Authorization": f"Bearer {second_key}"}
    assert client.get("/v1/jobs", headers=second).status_code == 200
    first_id = next(r.id for r in key_rows(clean_db, tenant.id) if r.prefix == tenant.key[:10])
    # One key by id: the other stays valid.
    one = tenants_cli(settings, "revoke", "leaky", "--key-id", str(first_id))
    assert one.returncode == 0 and f"revoked {first_id}" in one.stdout, one.stderr
    problem(client.get("/v1/jobs", headers=tenant.headers), 401)
    assert client.get("/v1/jobs", headers=second).status_code == 200
    listed = tenants_cli(settings, "keys", "leaky")
    assert listed.returncode == 0 and "revoked" in listed.stdout and "active" in listed.stdout
    # Every key of the tenant; other tenants untouched.
    every = tenants_cli(settings, "revoke", "leaky")
    assert every.returncode == 0, every.stderr
    problem(client.get("/v1/jobs", headers=second), 401)
    assert client.get("/v1/jobs", headers=bystander.headers).status_code == 200
    unknown = tenants_cli(settings, "revoke", "nobody")
    assert unknown.returncode == 1 and "no tenant named 'nobody'" in unknown.stderr


@pytest.mark.slow  # seconds of CPU or a subprocess: out of make test-fast
def test_a_poll_trusts_a_key_it_authenticated_for_auth_cache_seconds_only(
    make_tenant, clean_db, settings, clean_redis
) -> None:
    """A status poll reads its key from the API process's KeyCache: a key revoked elsewhere
    (the CLI) still polls for at most auth_cache_seconds; every other route stops at once."""
    import time

    from fastapi.testclient import TestClient

    from api.app import create_app, dispose_engines

    tenant = make_tenant("polling")
    cached = settings.model_copy(update={"auth_cache_seconds": 1.0})
    app = create_app(cached)
    with TestClient(app) as client:
        job = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers).json()["id"]
        assert client.get(f"/v1/jobs/{job}", headers=tenant.headers).status_code == 200
        revoked_at = time.monotonic()
        assert tenants_cli(cached, "revoke", "polling").returncode == 0
        problem(client.get("/v1/jobs", headers=tenant.headers), 401)
        deadline = revoked_at + 30
        while client.get(f"/v1/jobs/{job}", headers=tenant.headers).status_code == 200:
            assert time.monotonic() < deadline, "the revoked key kept polling"
            time.sleep(0.05)
        # The CLI starts a Python process: the poll stopped at most a second after it ended.
        problem(client.get(f"/v1/jobs/{job}", headers=tenant.headers), 401)
        # A wrong key is never cached: it counts as a failure every time.
        wrong = {"Authorization": "Bearer bwk_" + "x" * 43}
        problem(client.get(f"/v1/jobs/{job}", headers=wrong), 401)
    dispose_engines(app)
    # Without the cache (0) a revoked key stops polling at once.
    other = make_tenant("uncached")
    app = create_app(settings.model_copy(update={"auth_cache_seconds": 0.0}))
    with TestClient(app) as client:
        job = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=other.headers).json()["id"]
        assert client.get(f"/v1/jobs/{job}", headers=other.headers).status_code == 200
        assert tenants_cli(settings, "revoke", "uncached").returncode == 0
        problem(client.get(f"/v1/jobs/{job}", headers=other.headers), 401)
    dispose_engines(app)


def test_a_tenant_rotates_its_own_key(client, make_tenant) -> None:
    tenant, other = make_tenant("rotating"), make_tenant("other")
    job = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers).json()["id"]
    response = client.post("/v1/keys/rotate", headers=tenant.headers)
    assert response.status_code == 201, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    new = {"Authorization": f"Bearer {body['key']}"}
    assert body["key"].startswith("bwk_") and body["prefix"] == body["key"][:10]
    # The old key is dead at once; the new one sees the same tenant's jobs, and only them.
    problem(client.get(f"/v1/jobs/{job}", headers=tenant.headers), 401)
    problem(client.post("/v1/keys/rotate", headers=tenant.headers), 401)
    assert client.get(f"/v1/jobs/{job}", headers=new).status_code == 200
    problem(client.get(f"/v1/jobs/{job}", headers=other.headers), 404)
    assert client.get("/v1/jobs", headers=other.headers).json()["total"] == 0


def test_openapi_declares_429_where_it_can_answer(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in [
        ("/v1/jobs", "get"),
        ("/v1/jobs/pretrain", "post"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/keys/rotate", "post"),
        ("/v1/models", "post"),
    ]:
        answer = paths[path][method]["responses"]["429"]
        assert "Retry-After" in answer["headers"], (path, answer)
    assert "429" not in paths["/healthz"]["get"]["responses"]
    assert "201" in paths["/v1/keys/rotate"]["post"]["responses"]


def test_production_needs_a_key_secret(settings, tmp_path) -> None:
    from api.app import create_app
    from api.services.tenants import KeySecretError, load_key_secret

    pem = tmp_path / "signing.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    production = settings.model_copy(update={"environment": "production", "signing_key_file": pem})
    with pytest.raises(KeySecretError, match="BULWARK_KEY_SECRET"):
        create_app(production)
    with pytest.raises(KeySecretError, match="at least 32"):
        load_key_secret(settings.model_copy(update={"key_secret": SecretStr("short")}))
    assert not (production.data_dir / "key-secret").exists()
