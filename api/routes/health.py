"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import CeleryDep, SessionDep
from api.errors import UnavailableError, problem_response, problem_responses
from api.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="checkHealth", summary="Liveness")
def healthz() -> HealthPublic:
    """The process is up."""
    return HealthPublic(status="ok")


@router.get(
    "/readyz",
    operation_id="checkReadiness",
    summary="Readiness",
    response_model=HealthPublic,
    responses=problem_responses(503),
)
def readyz(request: Request, session: SessionDep, celery: CeleryDep) -> JSONResponse:
    """The database answers and holds the schema, and the broker accepts connections; else a
    503 problem whose ``checks`` say which is unavailable and why."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1 FROM jobs LIMIT 1"))
        checks["database"] = "ok"
    except Exception as error:  # any driver error means not ready
        checks["database"] = f"unavailable: {type(error).__name__}: {error}"[:300]
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as error:
        checks["broker"] = f"unavailable: {type(error).__name__}: {error}"[:300]
    if all(value == "ok" for value in checks.values()):
        return JSONResponse(HealthPublic(status="ok", checks=checks).model_dump())
    down = [name for name, value in checks.items() if value != "ok"]
    return problem_response(
        request,
        503,
        slug="not-ready",
        title="Not ready",
        detail=f"unavailable: {', '.join(down)}",
        headers=UnavailableError("").headers(),
        checks=checks,
    )
