"""Webhooks on the real Postgres and Redis: job state changes recorded with the state change,
delivered by the API's pump to a receiver on 127.0.0.1, signed, retried with backoff, logged;
secrets shown once, tenants isolated, private targets refused unless allowed."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from typing import Any

import pytest
from fastapi.testclient import TestClient
from servicekit import problem_errors, wait_for
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from api.webhook_pump import WebhookPump
from common.artifacts import make_artifact_store
from common.db import make_engine, make_session_factory
from common.models import Job, JobStatus, WebhookDelivery
from common.settings import Settings
from common.webhooks import verify_signature
from worker.jobs import Resources, claim_job, finish_job

PRETRAIN = {"dataset": "digits", "arch": "convnet", "defense": "none", "recipe": "quick"}
MAX_ATTEMPTS = 4
BACKOFF = 0.2


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The service tests' settings, with a receiver on 127.0.0.1 allowed and quick retries."""
    return settings.model_copy(
        update={
            "webhook_allow_private_targets": True,
            "webhook_backoff_seconds": BACKOFF,
            "webhook_max_attempts": MAX_ATTEMPTS,
            "webhook_poll_seconds": 0.1,
            "webhook_timeout_seconds": 3.0,
        }
    )


# ---- a receiver on 127.0.0.1 -----------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Records every POST. ``/status/<code>`` always answers ``<code>``; any other path
    answers 500 to the first ``fail_first`` requests, then 200."""

    url: str
    fail_first: int = 0
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def answer(self, path: str) -> int:
        if path.startswith("/status/"):
            return int(path.rsplit("/", 1)[1])
        with self.lock:
            if self.fail_first > 0:
                self.fail_first -= 1
                return 500
        return 200


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = min(int(self.headers.get("Content-Length", "0")), 1 << 20)
            body = self.rfile.read(length)
            hook = state["receiver"]
            with hook.lock:
                hook.requests.append(
                    Received(self.path, dict(self.headers.items()), body, time.monotonic())
                )
            code = hook.answer(self.path)
            payload = b"nope" if code >= 300 else b"ok"
            self.send_response(code)
            if 300 <= code < 400:
                self.send_header("Location", f"{hook.url}/elsewhere")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state["receiver"] = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    yield state["receiver"]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


# ---- helpers ---------------------------------------------------------------------------------


def register(client: Any, tenant: Any, url: str, events: list[str] | None = None) -> dict:
    body: dict[str, Any] = {"url": url}
    if events is not None:
        body["events"] = events
    response = client.post("/v1/webhooks", headers=tenant.headers, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def submit(client: Any, tenant: Any, **fields: Any) -> str:
    response = client.post(
        "/v1/jobs/pretrain", headers=tenant.headers, json={**PRETRAIN, "epochs": 1, **fields}
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def log(client: Any, tenant: Any, webhook_id: str, **params: Any) -> dict:
    response = client.get(
        f"/v1/webhooks/{webhook_id}/deliveries", headers=tenant.headers, params=params
    )
    assert response.status_code == 200, response.text
    return response.json()


def deliveries(db: Engine) -> list[WebhookDelivery]:
    with Session(db) as session:
        return list(
            session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)).all()
        )


def assert_signed(request: Received, secret: str) -> None:
    header = request.headers["Bulwark-Signature"]
    assert verify_signature(secret, header, request.body), header
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Bulwark-Event"] == request.payload["event"]
    assert request.headers["Bulwark-Delivery"] == request.payload["delivery_id"]


@pytest.fixture
def pumpless(app: Any) -> TestClient:
    """A client of the app whose lifespan (so its delivery pump) never runs: the test drives
    a :class:`WebhookPump` itself."""
    return TestClient(app)


def pump_for(app: Any, **overrides: Any) -> WebhookPump:
    return WebhookPump(
        settings=app.state.settings.model_copy(update=overrides),
        session_factory=app.state.session_factory,
    )


# ---- the tests -------------------------------------------------------------------------------


def test_a_jobs_state_changes_reach_the_receiver_signed(
    client, make_tenant, start_worker, receiver, clean_db
) -> None:
    tenant = make_tenant("a")
    every = register(client, tenant, f"{receiver.url}/all")
    done = register(client, tenant, f"{receiver.url}/done", events=["job.succeeded"])
    assert done["events"] == ["job.succeeded"] and every["events"] is None
    start_worker()
    job_id = submit(client, tenant)

    wait_for(lambda: len(receiver.at("/all")) >= 3, timeout=240, what="three events")
    wait_for(lambda: receiver.at("/done"), timeout=10, what="the succeeded event")
    job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == "succeeded", job

    received = receiver.at("/all")
    assert len(received) == 3
    for request in received:
        assert_signed(request, every["secret"])
        assert not verify_signature(
            done["secret"], request.headers["Bulwark-Signature"], request.body
        )
    by_event = {r.payload["event"]: r.payload for r in received}
    assert set(by_event) == {"job.queued", "job.running", "job.succeeded"}
    for event, payload in by_event.items():
        assert payload["job"]["id"] == job_id
        assert payload["job"]["status"] == event.removeprefix("job.")
        assert payload["job"]["kind"] == "pretrain"
        assert payload["job"]["links"]["job"] == f"/v1/jobs/{job_id}"
    succeeded = by_event["job.succeeded"]["job"]
    assert succeeded["result_model_id"] == job["result_model_id"] and succeeded["progress"] == 1.0
    occurred = [by_event[e]["occurred_at"] for e in ("job.queued", "job.running", "job.succeeded")]
    assert occurred == sorted(occurred)

    [only] = receiver.at("/done")
    assert_signed(only, done["secret"])
    assert only.payload["event"] == "job.succeeded"

    entries = log(client, tenant, every["id"])
    assert entries["total"] == 3
    assert [e["event"] for e in entries["items"]] == ["job.succeeded", "job.running", "job.queued"]
    for entry in entries["items"]:
        assert entry["status"] == "delivered" and entry["attempts"] == 1
        assert entry["response_status"] == 200 and entry["error"] is None
        assert entry["delivered_at"] and entry["job_id"] == job_id
    assert log(client, tenant, done["id"])["total"] == 1


def test_a_failing_receiver_is_retried_with_backoff_and_the_log_shows_it(
    client, make_tenant, receiver
) -> None:
    tenant = make_tenant("a")
    hook = register(client, tenant, f"{receiver.url}/flaky")
    receiver.fail_first = 2
    job_id = submit(client, tenant)  # no worker: the job stays queued

    def delivered() -> dict | None:
        items = log(client, tenant, hook["id"])["items"]
        return items[0] if items and items[0]["status"] == "delivered" else None

    entry = wait_for(delivered, timeout=20, what="the retried delivery")
    assert entry["event"] == "job.queued" and entry["attempts"] == 3
    assert entry["response_status"] == 200 and entry["error"] is None

    attempts = receiver.at("/flaky")
    assert len(attempts) == 3
    assert len({a.headers["Bulwark-Delivery"] for a in attempts}) == 1  # the same delivery
    assert len({a.body for a in attempts}) == 1  # the same bytes
    for attempt in attempts:
        assert_signed(attempt, hook["secret"])
    gaps = [b.at - a.at for a, b in pairwise(attempts)]
    assert gaps[0] >= BACKOFF * 0.9 and gaps[1] >= 2 * BACKOFF * 0.9, gaps  # 0.2 s, then 0.4 s

    # A queued job cancelled at once: its event is recorded with the cancellation.
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers).status_code == 200
    wait_for(lambda: len(receiver.at("/flaky")) == 4, timeout=10, what="the cancelled event")
    assert receiver.at("/flaky")[-1].payload["event"] == "job.cancelled"
    entries = log(client, tenant, hook["id"])
    assert [e["event"] for e in entries["items"]] == ["job.cancelled", "job.queued"]
    assert log(client, tenant, hook["id"], status="pending")["total"] == 0


def test_a_delivery_fails_after_the_last_attempt_and_redirects_are_not_followed(
    client, make_tenant, receiver
) -> None:
    tenant = make_tenant("a")
    down = register(client, tenant, f"{receiver.url}/status/503")
    moved = register(client, tenant, f"{receiver.url}/status/302")
    submit(client, tenant)

    def failed(hook: dict) -> dict | None:
        items = log(client, tenant, hook["id"])["items"]
        return items[0] if items and items[0]["status"] == "failed" else None

    entry = wait_for(lambda: failed(down), timeout=30, what="the last attempt")
    assert entry["attempts"] == MAX_ATTEMPTS and entry["response_status"] == 503
    assert entry["error"].startswith("HTTP 503") and entry["next_attempt_at"] is None
    assert len(receiver.at("/status/503")) == MAX_ATTEMPTS

    entry = wait_for(lambda: failed(moved), timeout=30, what="the redirected attempts")
    assert entry["response_status"] == 302 and "redirects are not followed" in entry["error"]
    assert receiver.at("/elsewhere") == []


def test_the_secret_is_shown_once_and_other_tenants_get_404(
    pumpless, make_tenant, receiver
) -> None:
    client = pumpless
    a, b = make_tenant("a"), make_tenant("b")
    created = register(client, a, f"{receiver.url}/a")
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 40

    one = client.get(f"/v1/webhooks/{created['id']}", headers=a.headers)
    listed = client.get("/v1/webhooks", headers=a.headers)
    assert one.status_code == 200 and "secret" not in one.json()
    assert listed.json()["total"] == 1 and "secret" not in listed.json()["items"][0]
    for response in (one, listed):
        assert created["secret"] not in response.text
    assert one.json() == {k: v for k, v in created.items() if k != "secret"}

    for method, path in (
        ("GET", f"/v1/webhooks/{created['id']}"),
        ("GET", f"/v1/webhooks/{created['id']}/deliveries"),
        ("DELETE", f"/v1/webhooks/{created['id']}"),
        ("GET", f"/v1/webhooks/{uuid.uuid4()}"),
    ):
        response = client.request(method, path, headers=b.headers)
        assert response.status_code == 404, (method, path, response.text)
    assert client.get("/v1/webhooks", headers=b.headers).json()["total"] == 0
    assert client.get(f"/v1/webhooks/{created['id']}", headers=a.headers).status_code == 200
    assert client.get("/v1/webhooks").status_code == 401

    # b's jobs are never sent to a's webhook.
    submit(client, b)
    assert log(client, a, created["id"])["total"] == 0


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"url": "http://x.example", "events": ["job.bogus"]}, ["body", "events", 0], "job."),
        ({"url": "http://x.example", "events": []}, ["body", "events"], "at least 1"),
        ({"url": "ftp://x.example/hook"}, ["body", "url"], "only http and https"),
        ({"url": "https://u:p@x.example/"}, ["body", "url"], "no credentials"),
        ({"url": "http://x.example", "secret": "mine"}, ["body", "secret"], "not permitted"),
        ({}, ["body", "url"], "required"),
    ],
)
def test_bad_registrations_get_a_422_naming_the_field(
    pumpless, make_tenant, clean_db, body, loc, words
) -> None:
    tenant = make_tenant("a")
    response = pumpless.post("/v1/webhooks", headers=tenant.headers, json=body)
    assert response.status_code == 422, response.text
    [error] = problem_errors(response)
    assert error["loc"] == loc and words in error["msg"], error
    assert pumpless.get("/v1/webhooks", headers=tenant.headers).json()["total"] == 0


def test_private_targets_are_refused_unless_allowed(
    app, pumpless, settings, make_tenant, receiver, clean_db
) -> None:
    from api.app import create_app, dispose_engines

    strict = create_app(settings.model_copy(update={"webhook_allow_private_targets": False}))
    try:
        tenant = make_tenant("a")
        strict_client = TestClient(strict)
        for url in (f"{receiver.url}/x", "http://localhost:9/x", "http://169.254.169.254/"):
            response = strict_client.post("/v1/webhooks", headers=tenant.headers, json={"url": url})
            assert response.status_code == 422, response.text
            [error] = problem_errors(response)
            assert error["loc"] == ["body", "url"] and "public addresses only" in error["msg"]
    finally:
        dispose_engines(strict)

    # Registered while allowed, refused at delivery once not: checked again before each send.
    hook = register(pumpless, tenant, f"{receiver.url}/x")
    submit(pumpless, tenant)
    assert pump_for(app, webhook_allow_private_targets=False).run_once() == 1
    [entry] = log(pumpless, tenant, hook["id"])["items"]
    assert entry["status"] == "failed" and entry["attempts"] == 1
    assert entry["error"].startswith("refused:") and "public addresses only" in entry["error"]
    assert receiver.requests == []


def test_deleting_a_webhook_stops_its_pending_deliveries(
    app, pumpless, make_tenant, receiver, clean_db
) -> None:
    client = pumpless
    tenant = make_tenant("a")
    hook = register(client, tenant, f"{receiver.url}/gone")
    kept = register(client, tenant, f"{receiver.url}/kept")
    submit(client, tenant)
    assert [d.status for d in deliveries(clean_db)] == ["pending", "pending"]

    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=tenant.headers).status_code == 204
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=tenant.headers).status_code == 204
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=tenant.headers).status_code == 404
    listed = client.get("/v1/webhooks", headers=tenant.headers).json()
    assert [w["id"] for w in listed["items"]] == [kept["id"]]
    gone = [d for d in deliveries(clean_db) if str(d.webhook_id) == hook["id"]]
    assert [(d.status, d.error) for d in gone] == [("failed", "not sent: the webhook was deleted")]

    submit(client, tenant)  # a new event goes to the live webhook only
    assert len(deliveries(clean_db)) == 3
    pump = pump_for(app)
    assert wait_for(lambda: pump.run_once() == 0 and len(receiver.at("/kept")) == 2, timeout=10)
    assert receiver.at("/gone") == []


def test_worker_state_changes_are_recorded_with_the_state_change(
    app, pumpless, make_tenant, settings, receiver, clean_db
) -> None:
    tenant = make_tenant("a")
    hook = register(pumpless, tenant, f"{receiver.url}/w")
    job_id = uuid.UUID(submit(pumpless, tenant))
    resources = Resources(
        settings=settings,
        session_factory=make_session_factory(clean_db),
        store=make_artifact_store(settings),
    )
    job = claim_job(resources=resources, job_id=job_id, worker="test-worker")
    assert job is not None and job.status == JobStatus.RUNNING
    assert claim_job(resources=resources, job_id=job_id, worker="another") is None  # no event
    finish_job(
        resources=resources,
        job_id=job_id,
        status=JobStatus.FAILED,
        phase="failed",
        error="out of memory; resubmit with a smaller batch_size or model",
    )
    rows = deliveries(clean_db)
    assert [d.event for d in rows] == ["job.queued", "job.running", "job.failed"]
    assert rows[1].payload["job"]["attempts"] == 1
    assert rows[2].payload["job"]["error"].startswith("out of memory")
    with Session(clean_db) as session:
        assert session.get(Job, job_id).status == JobStatus.FAILED  # type: ignore[union-attr]

    pump = pump_for(app)
    wait_for(lambda: pump.run_once() == 0 and len(receiver.at("/w")) == 3, timeout=10)
    for request in receiver.at("/w"):
        assert_signed(request, hook["secret"])


def test_several_pumps_never_send_a_delivery_twice(
    app, pumpless, make_tenant, receiver, clean_db
) -> None:
    tenant = make_tenant("a")
    for index in range(3):
        register(pumpless, tenant, f"{receiver.url}/p{index}")
    for _ in range(4):
        submit(pumpless, tenant)
    assert len(deliveries(clean_db)) == 12

    pumps = [pump_for(app) for _ in range(3)]

    def drain(pump: WebhookPump) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
            d.status == "pending" for d in deliveries(clean_db)
        ):
            pump.run_once()

    threads = [threading.Thread(target=drain, args=(pump,)) for pump in pumps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    ids = [r.headers["Bulwark-Delivery"] for r in receiver.requests]
    assert len(ids) == 12 and len(set(ids)) == 12
    assert all(d.status == "delivered" and d.attempts == 1 for d in deliveries(clean_db))


def test_the_pump_outlives_database_errors_and_stops_cleanly(settings, caplog) -> None:
    unreachable = make_engine(
        "postgresql+psycopg://postgres@127.0.0.1:9/none", connect_args={"connect_timeout": 1}
    )
    pump = WebhookPump(settings=settings, session_factory=make_session_factory(unreachable))
    pump.start()
    try:
        wait_for(
            lambda: "webhook pump round failed" in caplog.text, timeout=10, what="a logged error"
        )
        assert pump._thread is not None and pump._thread.is_alive()
    finally:
        started = time.monotonic()
        pump.stop()
        unreachable.dispose()
    assert not pump._thread.is_alive() and time.monotonic() - started < 5
