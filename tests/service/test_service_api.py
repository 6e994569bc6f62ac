"""The HTTP API on the real Postgres and Redis: auth, tenancy, validation, queueing, cancel,
idempotency, pagination and health."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from servicekit import add_model_row, problem, problem_errors
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from catalog import ARCHS, JOB_KINDS
from common.models import Job, JobStatus
from common.queue import task_name

PRETRAIN = {
    "dataset": "digits",
    "arch": "convnet",
    "defense": "none",
    "recipe": "quick",
    "epochs": 1,
}


def queued_task_ids(redis_client: Any, queue: str = "gpu") -> list[str]:
    """Task ids of the messages waiting in the Redis queue (kombu's JSON envelope)."""
    return [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(queue, 0, -1)]


def count(db, model) -> int:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def add_model(db, tenant_id: uuid.UUID) -> uuid.UUID:  # type: ignore[no-untyped-def]
    """A model row, as a finished pre-training job would write it."""
    return add_model_row(db, tenant_id)


ROUTES = [
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{job}"),
    ("DELETE", "/v1/jobs/{job}"),
    ("POST", "/v1/jobs/{job}/cancel"),
    ("GET", "/v1/jobs/{job}/report"),
    ("GET", "/v1/jobs/{job}/report.html"),
    ("GET", "/v1/jobs/{job}/pictures/asr.svg"),
    ("GET", "/v1/jobs/{job}/pictures/fc.png"),
    ("POST", "/v1/jobs/pretrain"),
    ("POST", "/v1/jobs/audit"),
    ("GET", "/v1/models"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("DELETE", "/v1/models/{model}"),
    ("GET", "/v1/models/{model}/weights"),
    ("GET", "/v1/models/{model}/card"),
    ("GET", "/v1/datasets"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/datasets/{model}"),
    ("DELETE", "/v1/datasets/{model}"),
]


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer bwk_wrong"}, {"Authorization": "Basic dXNlcjpwYXNz"}]
)
def test_every_v1_route_needs_a_valid_key(client, make_tenant, headers) -> None:
    tenant = make_tenant("a")
    job = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers).json()["id"]
    for method, path in ROUTES:
        url = path.format(job=job, model=uuid.uuid4())
        response = client.request(method, url, headers=headers, json={})
        assert problem(response, 401)["type"].endswith("/not-authenticated"), (method, url)
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_another_tenants_resources_answer_404(client, make_tenant, clean_db) -> None:
    owner, other = make_tenant("owner"), make_tenant("other")
    model_id = add_model(clean_db, owner.id)
    job = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=owner.headers).json()["id"]
    audit = client.post(
        "/v1/jobs/audit",
        headers=owner.headers,
        json={"model_id": str(model_id), "dataset": "digits", "targets_per_pair": 1},
    )
    assert audit.status_code == 202, audit.text
    for job_id in (job, audit.json()["id"]):
        assert client.get(f"/v1/jobs/{job_id}", headers=owner.headers).status_code == 200
        for method, path in [
            ("GET", "/v1/jobs/{}"),
            ("POST", "/v1/jobs/{}/cancel"),
            ("GET", "/v1/jobs/{}/report"),
        ]:
            response = client.request(method, path.format(job_id), headers=other.headers)
            assert response.status_code == 404, (path, response.text)
    assert client.get(f"/v1/models/{model_id}", headers=owner.headers).status_code == 200
    for path in ("/v1/models/{}", "/v1/models/{}/weights", "/v1/models/{}/card"):
        assert client.get(path.format(model_id), headers=other.headers).status_code == 404
    # Another tenant's model cannot be audited, and the answer lists only the caller's models.
    response = client.post(
        "/v1/jobs/audit",
        headers=other.headers,
        json={"model_id": str(model_id), "dataset": "digits"},
    )
    assert problem(response, 404)["loc"] == ["body", "model_id"]
    assert response.json()["valid_model_ids"] == []
    assert client.get("/v1/jobs", headers=other.headers).json()["total"] == 0
    assert client.get("/v1/models", headers=other.headers).json()["total"] == 0


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({**PRETRAIN, "dataset": "imagenet"}, ["body", "dataset"], "digits"),
        ({**PRETRAIN, "arch": "vgg"}, ["body", "arch"], "resnet18"),
        ({**PRETRAIN, "defense": "magic"}, ["body", "defense"], "at-pcl"),
        ({**PRETRAIN, "epochs": 0}, ["body", "epochs"], "greater than or equal to 1"),
        ({**PRETRAIN, "recipe": "slow"}, ["body", "recipe"], "quick"),
        ({**PRETRAIN, "overrides": {"lr": -1}}, ["body", "overrides", "lr"], "greater than 0"),
        ({**PRETRAIN, "overrides": {"epsilon": 3}}, ["body", "overrides", "epsilon"], "1"),
        ({**PRETRAIN, "overrides": {"milestones": [5]}}, ["body", "overrides", "milestones"], "1"),
        ({**PRETRAIN, "overrides": {"data_dir": "/etc"}}, ["body", "overrides"], "top-level"),
        ({**PRETRAIN, "overrides": {"colour": 1}}, ["body", "overrides", "colour"], "Extra"),
        ({**PRETRAIN, "surprise": 1}, ["body", "surprise"], "Extra"),
    ],
)
def test_bad_fields_get_a_422_naming_them_and_nothing_is_written(
    client, make_tenant, clean_db, clean_redis, body, loc, words
) -> None:
    tenant = make_tenant("a")
    response = client.post("/v1/jobs/pretrain", json=body, headers=tenant.headers)
    assert response.status_code == 422, response.text
    error = problem_errors(response)[0]
    assert error["loc"] == loc
    assert words in error["msg"]
    assert count(clean_db, Job) == 0
    assert queued_task_ids(clean_redis) == []


def test_audit_fields_are_checked_against_the_model(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("a")
    model_id = str(add_model(clean_db, tenant.id))
    cases = [
        ({"dataset": "tiny-imagenet"}, ["body", "dataset"]),
        ({"dataset": "digits", "pairs": [[0, 10]]}, ["body", "pairs", 0]),
        ({"dataset": "digits", "pairs": [[3, 3]]}, ["body", "pairs"]),
        ({"dataset": "digits", "attacks": ["fc", "zz"]}, ["body", "attacks", 1]),
        ({"dataset": "digits", "delta": 0}, ["body", "delta"]),
    ]
    for extra, loc in cases:
        response = client.post(
            "/v1/jobs/audit", headers=tenant.headers, json={"model_id": model_id, **extra}
        )
        assert response.status_code == 422, (extra, response.text)
        assert problem_errors(response)[0]["loc"] == loc, response.json()
    assert count(clean_db, Job) == 0


def test_submit_commits_then_enqueues_by_name_with_the_job_id(client, make_tenant, clean_redis):
    tenant = make_tenant("a")
    response = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers)
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "queued" and job["progress"] == 0 and job["attempts"] == 0
    assert queued_task_ids(clean_redis) == [job["id"]]
    message = json.loads(clean_redis.lrange("gpu", 0, -1)[0])
    assert message["headers"]["task"] == task_name("pretrain") == "bulwark.pretrain"
    assert message["content-type"] == "application/json"
    fetched = client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json()
    assert fetched["spec"]["dataset"] == "digits" and fetched["kind"] == "pretrain"


def test_idempotency_key_returns_the_same_job(client, make_tenant, clean_db, clean_redis) -> None:
    tenant = make_tenant("a")
    headers = {**tenant.headers, "Idempotency-Key": "retry-me"}
    first = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=headers)
    second = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert count(clean_db, Job) == 1
    assert queued_task_ids(clean_redis) == [first.json()["id"]]
    changed = client.post("/v1/jobs/pretrain", json={**PRETRAIN, "seed": 7}, headers=headers)
    assert changed.status_code == 409
    # The key is per tenant: another tenant's identical key is another job.
    other = make_tenant("b")
    third = client.post(
        "/v1/jobs/pretrain", json=PRETRAIN, headers={**other.headers, "Idempotency-Key": "retry-me"}
    )
    assert third.status_code == 202 and third.json()["id"] != first.json()["id"]


def test_cancel_a_queued_job_at_once(client, make_tenant) -> None:
    tenant = make_tenant("a")
    job = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers).json()
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
    assert again.status_code == 409 and "cancelled" in problem(again)["detail"]


def test_cancel_a_running_job_flags_it(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("a")
    job_id = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers).json()["id"]
    with Session(clean_db) as session:
        session.get(Job, uuid.UUID(job_id)).status = JobStatus.RUNNING
        session.commit()
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers).json()
    assert response["status"] == "running" and response["cancel_requested"] is True


def test_report_of_an_unfinished_audit_is_409(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("a")
    model_id = str(add_model(clean_db, tenant.id))
    job = client.post(
        "/v1/jobs/audit", headers=tenant.headers, json={"model_id": model_id, "dataset": "digits"}
    ).json()
    response = client.get(f"/v1/jobs/{job['id']}/report", headers=tenant.headers)
    assert problem(response, 409)["job_status"] == "queued"
    pretrain = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers).json()
    assert (
        client.get(f"/v1/jobs/{pretrain['id']}/report", headers=tenant.headers).status_code == 404
    )


def test_list_jobs_paginates_and_filters(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("a")
    model_id = str(add_model(clean_db, tenant.id))
    ids = [
        client.post(
            "/v1/jobs/pretrain", json={**PRETRAIN, "seed": s}, headers=tenant.headers
        ).json()["id"]
        for s in range(5)
    ]
    audit = client.post(
        "/v1/jobs/audit", headers=tenant.headers, json={"model_id": model_id, "dataset": "digits"}
    ).json()
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=tenant.headers)
    page = client.get("/v1/jobs?limit=4&offset=0", headers=tenant.headers).json()
    rest = client.get("/v1/jobs?limit=4&offset=4", headers=tenant.headers).json()
    assert page["total"] == rest["total"] == 6
    assert len(page["items"]) == 4 and len(rest["items"]) == 2
    assert {j["id"] for j in page["items"] + rest["items"]} == {*ids, audit["id"]}
    audits = client.get("/v1/jobs?kind=audit", headers=tenant.headers).json()
    assert [j["id"] for j in audits["items"]] == [audit["id"]]
    cancelled = client.get("/v1/jobs?status=cancelled", headers=tenant.headers).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    bad = client.get("/v1/jobs?status=sleeping", headers=tenant.headers)
    assert bad.status_code == 422 and problem_errors(bad)[0]["loc"] == ["query", "status"]
    assert client.get("/v1/jobs?limit=0", headers=tenant.headers).status_code == 422
    # Kinds come from the catalog: an unknown one is a 422 listing the valid ones.
    bad = client.get("/v1/jobs?kind=sleep", headers=tenant.headers)
    assert bad.status_code == 422 and problem_errors(bad)[0]["loc"] == ["query", "kind"]
    assert "pretrain, audit, audit-part, import" in problem_errors(bad)[0]["msg"]
    assert client.get("/v1/jobs?kind=import", headers=tenant.headers).json()["total"] == 0


def test_health_and_readiness(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readiness_fails_when_the_database_is_unreachable(settings) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    broken = settings.model_copy(
        update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"}
    )
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
    assert problem(response, 503)["checks"]["database"].startswith("unavailable")
    assert response.headers["Retry-After"]
    assert response.json()["checks"]["broker"] == "ok"


def test_an_unreachable_broker_is_a_503_and_the_job_says_why(settings, make_tenant, clean_db):
    from fastapi.testclient import TestClient

    from api.app import create_app

    tenant = make_tenant("a")
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers)
        assert "queue is unreachable" in problem(response, 503)["detail"]
        assert int(response.headers["Retry-After"]) > 0
        jobs = client.get("/v1/jobs", headers=tenant.headers).json()["items"]
    assert [(j["status"], "submit again" in j["error"]) for j in jobs] == [("failed", True)]


def test_a_retry_with_the_same_idempotency_key_after_a_broker_outage_submits_anew(
    settings, make_tenant, clean_db, clean_redis
) -> None:
    """The job whose message could not be sent fails and gives up its key: the client's retry
    (same request, same key) once the broker is back is a new, queued job, not the failed
    one."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    tenant = make_tenant("a")
    headers = {**tenant.headers, "Idempotency-Key": "retry-me"}
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        refused = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=headers)
    problem(refused, 503)
    with TestClient(create_app(settings)) as client:
        retried = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=headers)
        assert retried.status_code == 202, retried.text
        again = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=headers)
    assert again.json()["id"] == retried.json()["id"]
    assert retried.json()["status"] == "queued"
    assert queued_task_ids(clean_redis) == [retried.json()["id"]]
    statuses = sorted(status for (status,) in _job_statuses(clean_db))
    assert statuses == ["failed", "queued"]


def _job_statuses(db) -> list[tuple[str]]:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        return [(job.status.value,) for job in session.scalars(select(Job)).all()]


def test_openapi_documents_the_routes(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/v1/models",
        "/v1/jobs/pretrain",
        "/v1/jobs/audit",
        "/v1/jobs/{job_id}/cancel",
        "/v1/models/{model_id}/weights",
        "/healthz",
        "/readyz",
    } <= set(paths)
    form = paths["/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["properties"]["arch"]["enum"] == list(ARCHS.names())
    kind = next(p for p in paths["/v1/jobs"]["get"]["parameters"] if p["name"] == "kind")
    assert json.dumps(list(JOB_KINDS.names())) in json.dumps(kind["schema"])


def test_the_documented_audit_example_is_accepted_with_its_config(client, make_tenant, clean_db):
    """docs/service.md's example: a shorter re-training keeps the paper's schedule shape."""
    tenant = make_tenant("a")
    model_id = str(add_model(clean_db, tenant.id))
    response = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={"model_id": model_id, "dataset": "digits", "overrides": {"retrain_epochs": 20}},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["spec"]["overrides"] == {"retrain_epochs": 20}
    config = job["config"]
    assert (config["retrain_epochs"], config["retrain_milestones"]) == (20, [12, 16])
    assert config["attacks"] == ["fc", "cp", "bp"] and config["attack_settings"]["fc"]["poisons"]
    assert not {"model", "data_dir", "device"} & set(config)  # the worker fills those in
    fetched = client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json()
    assert fetched["config"] == config
    pretrain = client.post("/v1/jobs/pretrain", json=PRETRAIN, headers=tenant.headers).json()
    assert (pretrain["config"]["recipe"], pretrain["config"]["epochs"]) == ("quick", 1)
    assert "data_dir" not in pretrain["config"]
    # A dataset whose classes are known only from its files is checked by the worker.
    folder = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={"model_id": model_id, "dataset": "image-folder", "targets_per_pair": 1},
    )
    assert folder.status_code == 202, folder.text


def test_every_bad_field_is_named_in_one_422(client, make_tenant, clean_db, clean_redis) -> None:
    tenant = make_tenant("a")
    response = client.post(
        "/v1/jobs/pretrain",
        headers=tenant.headers,
        json={**PRETRAIN, "overrides": {"lr": -1, "epsilon": 3}},
    )
    assert response.status_code == 422, response.text
    locs = [error["loc"] for error in problem_errors(response)]
    assert locs == [["body", "overrides", "lr"], ["body", "overrides", "epsilon"]]
    model_id = str(add_model(clean_db, tenant.id))
    response = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={
            "model_id": model_id,
            "dataset": "digits",
            "pairs": [[0, 10], [11, 1]],
            "overrides": {"retrain_lr": -1},
        },
    )
    assert response.status_code == 422, response.text
    detail = problem_errors(response)
    assert [error["loc"] for error in detail] == [
        ["body", "pairs", 0],
        ["body", "pairs", 1],
        ["body", "overrides", "retrain_lr"],
    ]
    assert all(error["msg"] and error["type"] for error in detail)
    assert count(clean_db, Job) == 0
    assert queued_task_ids(clean_redis) == []
