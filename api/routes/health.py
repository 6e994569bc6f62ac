"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import CeleryDep, SessionDep
from api.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> HealthPublic:
    """The process is up."""
    return HealthPublic(status="ok")


@router.get("/readyz", responses={503: {"model": HealthPublic}})
def readyz(session: SessionDep, celery: CeleryDep) -> JSONResponse:
    """The database answers and holds the schema, and the broker accepts connections."""
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
    ready = all(value == "ok" for value in checks.values())
    body = HealthPublic(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
