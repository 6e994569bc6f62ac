"""Every error answer is an RFC 9457 problem (application/problem+json) from api/errors.py,
outages are 503 with Retry-After, and /openapi.json is fit for client generators."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from typing import Any

import pytest
from servicekit import problem, problem_errors
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.deps import CurrentTenant
from common.models import Job

PRETRAIN = {"dataset": "digits", "arch": "convnet", "defense": "none", "recipe": "quick"}


def test_framework_errors_are_problems(client, make_tenant) -> None:
    tenant = make_tenant("a")
    missing = problem(client.get("/v1/nothing-here", headers=tenant.headers), 404)
    assert missing["type"] == "https://bulwark.dev/problems/not-found"
    assert "/v1/nothing-here" in missing["detail"]
    wrong_method = client.put("/v1/jobs", headers=tenant.headers)
    body = problem(wrong_method, 405)
    assert body["type"].endswith("/method-not-allowed") and "PUT" in body["detail"]
    assert "GET" in wrong_method.headers["Allow"]  # Starlette's header survives
    # FastAPI's validation: every invalid field, each with loc, msg and type.
    invalid = client.get("/v1/jobs?limit=0&offset=-1&status=sleeping", headers=tenant.headers)
    errors = problem_errors(invalid)
    assert {tuple(e["loc"]) for e in errors} == {
        ("query", "limit"),
        ("query", "offset"),
        ("query", "status"),
    }
    assert all(e["type"] and e["msg"] for e in errors)
    body = invalid.json()
    assert body["type"].endswith("/invalid-fields") and "query.limit" in body["detail"]
    assert "input" not in errors[0] and "ctx" not in errors[0]  # nothing the client sent back
    bad_id = problem_errors(client.get("/v1/jobs/not-a-uuid", headers=tenant.headers))
    assert bad_id[0]["loc"] == ["path", "job_id"]
    bad_json = client.post(
        "/v1/jobs/pretrain",
        headers={**tenant.headers, "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert problem_errors(bad_json)[0]["loc"][0] == "body"


def test_service_errors_are_problems_with_their_extension_members(client, make_tenant) -> None:
    tenant = make_tenant("a")
    unauthenticated = problem(client.get("/v1/models"), 401)
    assert unauthenticated["type"].endswith("/not-authenticated")
    assert "Authorization: Bearer" in unauthenticated["detail"]
    no_job = problem(client.get(f"/v1/jobs/{uuid.uuid4()}", headers=tenant.headers), 404)
    assert no_job["title"] == "Not found" and no_job["detail"].startswith("no job ")
    audit = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={"model_id": str(uuid.uuid4()), "dataset": "digits"},
    )
    body = problem(audit, 404)
    assert body["valid_model_ids"] == [] and body["loc"] == ["body", "model_id"]
    job = client.post("/v1/jobs/pretrain", headers=tenant.headers, json=PRETRAIN).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
    again = problem(client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers), 409)
    assert again["type"].endswith("/conflict") and "nothing to cancel" in again["detail"]
    # The service's own 422s list their fields exactly as FastAPI's do.
    overrides = {"lr": -1, "epsilon": 3}
    refused = client.post(
        "/v1/jobs/pretrain", headers=tenant.headers, json={**PRETRAIN, "overrides": overrides}
    )
    locs = [e["loc"] for e in problem_errors(refused)]
    assert locs == [["body", "overrides", "lr"], ["body", "overrides", "epsilon"]]
    assert refused.json()["type"].endswith("/invalid-fields")


def test_an_unreachable_database_is_a_503_problem_with_retry_after(settings, make_tenant):
    from fastapi.testclient import TestClient

    from api.app import create_app

    tenant = make_tenant("a")
    broken = settings.model_copy(
        update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"}
    )
    with TestClient(create_app(broken)) as client:
        for method, path, body in [
            ("GET", "/v1/jobs", None),
            ("GET", f"/v1/models/{uuid.uuid4()}", None),
            ("POST", "/v1/jobs/pretrain", PRETRAIN),
        ]:
            response = client.request(method, path, headers=tenant.headers, json=body)
            answer = problem(response, 503)
            assert answer["type"].endswith("/database-unavailable"), answer
            assert int(response.headers["Retry-After"]) > 0
            assert "127.0.0.1:1" not in response.text  # no connection details


def test_database_and_broker_errors_anywhere_in_a_request_are_503(
    app, client, make_tenant, clean_db, monkeypatch
) -> None:
    """A connection lost in the middle of a request (after authentication) and a broker
    error raised outside the enqueue path both answer 503, not 500."""
    import kombu.exceptions
    from sqlalchemy.exc import OperationalError

    from api.services import jobs as job_service

    tenant = make_tenant("a")

    def lost_connection(**_: Any) -> Any:
        raise OperationalError("SELECT ...", {}, Exception("server closed the connection"))

    monkeypatch.setattr(job_service, "list_jobs", lost_connection)
    response = client.get("/v1/jobs", headers=tenant.headers)
    assert problem(response, 503)["type"].endswith("/database-unavailable")
    assert response.headers["Retry-After"]

    def broker_down(**_: Any) -> Any:
        raise kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6379")

    monkeypatch.setattr(job_service, "job_body", broker_down)
    response = client.get(f"/v1/jobs/{uuid.uuid4()}", headers=tenant.headers)
    assert problem(response, 503)["type"].endswith("/queue-unavailable")
    assert "6379" not in response.text and response.headers["Retry-After"]


def test_an_unreachable_broker_leaves_no_job_queued(settings, make_tenant, clean_db) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    tenant = make_tenant("a")
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = client.post("/v1/jobs/pretrain", headers=tenant.headers, json=PRETRAIN)
    assert problem(response, 503)["type"].endswith("/queue-unavailable")
    assert response.headers["Retry-After"]
    with Session(clean_db) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1
        job = session.scalars(select(Job)).one()
    assert job.status.value == "failed" and job.finished_at is not None


def test_an_unhandled_exception_is_a_logged_500_problem_without_internals(
    app, make_tenant, caplog
) -> None:
    from fastapi.testclient import TestClient

    def explode(tenant: CurrentTenant) -> None:
        raise RuntimeError("secret internals: /srv/bulwark/keys")

    app.add_api_route("/v1/explode", explode, methods=["GET"])
    tenant = make_tenant("a")
    with (
        caplog.at_level(logging.ERROR, logger="api.errors"),
        TestClient(app, raise_server_exceptions=False) as client,
    ):
        response = client.get("/v1/explode", headers=tenant.headers)
    body = problem(response, 500)
    assert body["type"].endswith("/internal-error")
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert any("secret internals" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


# --- OpenAPI ---------------------------------------------------------------------------------

METHODS = ("get", "put", "post", "delete", "patch")
PROBLEM_REF = "#/components/schemas/Problem"


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, item[method])
        for path, item in spec["paths"].items()
        for method in METHODS
        if method in item
    ]


def problem_answer(operation: dict[str, Any], status: str) -> bool:
    content = operation["responses"].get(status, {}).get("content", {})
    return content.get("application/problem+json", {}).get("schema") == {"$ref": PROBLEM_REF}


def test_openapi_is_fit_for_client_generation(client) -> None:
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes == {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "API key",
            "description": schemes["bearerAuth"]["description"],
        }
    }
    problem_schema = spec["components"]["schemas"]["Problem"]
    assert set(problem_schema["required"]) == {"type", "title", "status", "detail", "instance"}
    assert "errors" in problem_schema["properties"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    ids = Counter(op.get("operationId") for _, _, op in operations(spec))
    assert None not in ids and all(count == 1 for count in ids.values()), ids
    for method, path, operation in operations(spec):
        where = f"{method.upper()} {path}"
        assert operation["operationId"][0].islower() and "_" not in operation["operationId"]
        assert operation.get("summary") and operation.get("tags"), where
        responses = operation["responses"]
        successes = [status for status in responses if status.startswith("2")]
        assert successes, where
        for status in successes:
            content = responses[status].get("content")
            assert status == "204" or (content and all(content.values())), (where, status)
        for status, answer in responses.items():
            if int(status) >= 400:
                assert problem_answer(operation, status), (where, status, answer)
        if not path.startswith("/v1/"):
            continue
        assert operation.get("security") == [{"bearerAuth": []}], where
        for status in ("401", "503"):
            assert problem_answer(operation, status), (where, status)
        if "{" in path:
            assert problem_answer(operation, "404"), where
        if operation.get("parameters") or operation.get("requestBody"):
            assert problem_answer(operation, "422"), where
    assert {op["operationId"] for _, _, op in operations(spec)} >= {
        "createPretrainJob",
        "createAuditJob",
        "getJob",
        "listJobs",
        "cancelJob",
        "deleteJob",
        "getReport",
        "uploadModel",
        "listModels",
        "getModel",
        "deleteModel",
        "getModelCard",
        "getModelBadge",
        "uploadDataset",
        "listDatasets",
        "getDataset",
        "deleteDataset",
        "putPolicy",
        "getPolicy",
        "createWebhook",
    }


@pytest.mark.parametrize(
    ("path", "method", "status", "media_type"),
    [
        ("/v1/models/{model_id}/card", "get", "200", "text/markdown"),
        ("/v1/models/{model_id}/badge.svg", "get", "200", "image/svg+xml"),
        ("/v1/models/{model_id}/weights", "get", "200", "application/octet-stream"),
        ("/v1/jobs/{job_id}/report.html", "get", "200", "text/html"),
        ("/v1/jobs/{job_id}/pictures/asr.svg", "get", "200", "image/svg+xml"),
        ("/v1/jobs/{job_id}/pictures/budget.svg", "get", "200", "image/svg+xml"),
        ("/v1/jobs/{job_id}/pictures/{attack}.png", "get", "200", "image/png"),
        ("/v1/models", "post", "201", "application/json"),
        ("/v1/models", "post", "202", "application/json"),
    ],
)
def test_openapi_declares_the_media_types_served(client, path, method, status, media_type):
    spec = client.get("/openapi.json").json()
    content = spec["paths"][path][method]["responses"][status]["content"]
    assert list(content) == [media_type], content


def test_openapi_types_the_answers(client) -> None:
    spec = client.get("/openapi.json").json()
    upload = spec["paths"]["/v1/models"]["post"]["responses"]
    schema_of = {s: upload[s]["content"]["application/json"]["schema"] for s in ("201", "202")}
    assert schema_of == {
        "201": {"$ref": "#/components/schemas/ModelPublic"},
        "202": {"$ref": "#/components/schemas/JobPublic"},
    }
    assert {"413", "415", "422"} <= set(upload)
    assert all("Location" in upload[s]["headers"] for s in ("201", "202"))
    # The audit report is typed by core.report.AuditReport's own schema.
    report = spec["components"]["schemas"]["ReportPublic"]["properties"]["body"]
    assert report == {"$ref": "#/components/schemas/AuditReport"}
    assert "attacks" in spec["components"]["schemas"]["AuditReport"]["properties"]
    get_job = spec["paths"]["/v1/jobs/{job_id}"]["get"]
    assert "304" in get_job["responses"] and "ETag" in get_job["responses"]["200"]["headers"]
    assert any(p["name"] == "if-none-match" for p in get_job["parameters"])
