"""The OpenAPI document, finished for client generators: the Problem schema every error answer
uses, and the answers every ``/v1`` route shares (401, 404 on a resource, 422 on bad input,
429 over a rate limit or quota, 503 on an outage) declared with it, in place of FastAPI's own
422 schema.

The security scheme comes from the bearer dependency (``api.deps``), the operation ids,
summaries and route-specific answers from each route's decorator.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from api.errors import Problem, problem_response_spec

TAGS = [
    {
        "name": "models",
        "description": "Upload extractors, list, read, download, delete them; "
        "their model cards and verdict badges.",
    },
    {"name": "datasets", "description": "A tenant's own image sets: upload, list, read, delete."},
    {
        "name": "jobs",
        "description": "Pre-training and audit jobs: submit, watch, cancel, "
        "delete; audit reports as JSON, HTML and pictures.",
    },
    {"name": "policy", "description": "The tenant's audit policy, stored and versioned."},
    {"name": "webhooks", "description": "Endpoints that receive job state changes."},
    {"name": "keys", "description": "The tenant's own API key: rotate it."},
    {"name": "signing", "description": "The public key that checks report signatures."},
    {"name": "health", "description": "Liveness and readiness probes."},
]

# FastAPI's own validation-error schemas, replaced by Problem.
FASTAPI_ERROR_SCHEMAS = ("HTTPValidationError", "ValidationError")
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def install_openapi(app: FastAPI) -> None:
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()  # FastAPI's document (also cached on the app: finished in place)
        finish(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def finish(schema: dict[str, Any]) -> None:
    """Add the Problem schema and the shared error answers to FastAPI's document."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in problem.pop("$defs", {}).items():
        schemas[name] = definition
    schemas["Problem"] = problem  # FieldProblem came with it, from its $defs
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if "422" in responses:  # FastAPI's HTTPValidationError, or a route's own
                responses["422"] = problem_response_spec(422)
            if "requestBody" in operation:
                # Wherever a body is sent: one that does not parse (400), or one past its cap
                # before anything read it (413, api.limits).
                responses.setdefault("400", problem_response_spec(400))
                responses.setdefault("413", problem_response_spec(413))
            if path.startswith("/v1/"):
                responses.setdefault("401", problem_response_spec(401))
                responses.setdefault("503", problem_response_spec(503))
                if "{" in path:  # a resource by id: a missing one, or another tenant's
                    responses.setdefault("404", problem_response_spec(404))
            if operation.get("security"):
                # Every authenticated route: the tenant's rate limit, or its IP throttled for
                # wrong keys (api.ratelimit); the job routes add the active-jobs quota.
                responses.setdefault("429", problem_response_spec(429))
            operation["responses"] = dict(sorted(responses.items()))
    text = json.dumps(schema["paths"])
    for name in FASTAPI_ERROR_SCHEMAS:
        if f"#/components/schemas/{name}" not in text:
            schemas.pop(name, None)
