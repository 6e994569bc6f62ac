"""Every error answer of the API, in one place: RFC 9457 problem details.

Each 4xx and 5xx answer is ``application/problem+json``::

    {"type": "https://bulwark.dev/problems/not-found", "title": "Not found", "status": 404,
     "detail": "no job 0b7c...", "instance": "/v1/jobs/0b7c...", ...extension members}

A request with invalid fields adds ``errors``, one ``{"loc", "msg", "type"}`` per field. The
domain errors below (raised by the service functions), FastAPI's request validation, Starlette's
HTTP errors (404 for an unknown path, 405), database and broker outages (503 with
``Retry-After``) and unexpected exceptions (500, logged, nothing of the internals shown) all
answer through :func:`problem_response`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://bulwark.dev/problems/"
# How long a client should wait before retrying after a database or broker outage: outages
# that the service rides out (a restart, a failover) last seconds.
RETRY_AFTER_SECONDS = 5


class FieldProblem(BaseModel):
    """One invalid field: where (``loc``: ``["body", "overrides", "lr"]``), what, which kind."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem details object (``application/problem+json``).

    Members beyond these are extensions some problems carry (``valid_model_ids``, ``job_ids``,
    ``job_status``, ``loc``, ...)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        description="a URI naming the kind of problem "
        f"({PROBLEM_TYPE_BASE}<slug>), or about:blank where nothing more specific applies",
        examples=[f"{PROBLEM_TYPE_BASE}not-found"],
    )
    title: str = Field(description="a short summary of the kind of problem")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what went wrong with this request, in words to act on")
    instance: str = Field(description="the request's path")
    errors: list[FieldProblem] | None = Field(
        None, description="every invalid field of the request (validation problems only)"
    )


def problem_type(slug: str | None) -> str:
    return f"{PROBLEM_TYPE_BASE}{slug}" if slug else "about:blank"


class ServiceError(Exception):
    """Base of the errors a client can act on: ``status_code``, the problem's ``slug`` and
    ``title``, and extension members (``extra``) that help the client (ids, states)."""

    status_code = 400
    slug: str | None = "bad-request"
    title = "Bad request"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def headers(self) -> dict[str, str]:
        return {}

    def members(self) -> dict[str, Any]:
        """The problem's members other than type, title, status and instance."""
        return {"detail": self.message, **self.extra}


class NotAuthenticatedError(ServiceError):
    status_code = 401
    slug = "not-authenticated"
    title = "Not authenticated"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFoundError(ServiceError):
    """Missing, or owned by another tenant: both answer 404, so ids leak nothing."""

    status_code = 404
    slug = "not-found"
    title = "Not found"


class ConflictError(ServiceError):
    status_code = 409
    slug = "conflict"
    title = "Conflict with the resource's state"


class InvalidFieldError(ServiceError):
    """Fields that passed their type checks but not the service's: one 422 naming every one.

    ``errors`` are pydantic-style (each a ``loc`` and a ``msg``, optionally a ``type``); the
    problem lists them under ``errors``, as it does FastAPI's own validation errors.
    ``InvalidFieldError.at(loc, message)`` names a single field.
    """

    status_code = 422
    slug = "invalid-fields"
    title = "Invalid fields"

    def __init__(self, errors: Sequence[Mapping[str, Any]], **extra: Any) -> None:
        if not errors:
            raise ValueError("InvalidFieldError needs at least one error")
        self.errors = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e.get("type", "value_error")}
            for e in errors
        ]
        super().__init__(summarize(self.errors), **extra)

    @classmethod
    def at(cls, loc: Sequence[str | int], message: str, **extra: Any) -> InvalidFieldError:
        """The error of one field."""
        return cls([{"loc": loc, "msg": message}], **extra)

    def members(self) -> dict[str, Any]:
        return {"detail": self.message, "errors": self.errors, **self.extra}


class UploadTooLargeError(ServiceError):
    status_code = 413
    slug = "upload-too-large"
    title = "Upload too large"


class UnsupportedUploadError(ServiceError):
    status_code = 415
    slug = "unsupported-upload"
    title = "Unsupported upload"


class UnavailableError(ServiceError):
    """A dependency (the database, the job queue) is down: retry after ``Retry-After`` s."""

    status_code = 503
    slug = "service-unavailable"
    title = "Service unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}


class BrokerUnavailableError(UnavailableError):
    slug = "queue-unavailable"
    title = "Job queue unavailable"


class DatabaseUnavailableError(UnavailableError):
    slug = "database-unavailable"
    title = "Database unavailable"


def summarize(errors: Iterable[Mapping[str, Any]]) -> str:
    """One line naming every invalid field: ``body.overrides.lr: ...; query.limit: ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)


def problem_response(
    request: Request,
    status_code: int,
    *,
    slug: str | None,
    title: str | None = None,
    detail: str | None = None,
    headers: Mapping[str, str] | None = None,
    **members: Any,
) -> JSONResponse:
    """The one way an error answer is written. Extension members never override the
    standard ones."""
    phrase = _phrase(status_code)
    body = {
        **members,
        "type": problem_type(slug),
        "title": title or phrase,
        "status": status_code,
        "detail": detail or phrase,
        "instance": request.url.path,
    }
    return JSONResponse(
        body, status_code=status_code, headers=dict(headers or {}), media_type=PROBLEM_MEDIA_TYPE
    )


def _phrase(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "Error"


# The problem kinds of Starlette's and FastAPI's own HTTP errors, by status; any other
# status is about:blank with the status's phrase as its title.
HTTP_PROBLEMS: dict[int, tuple[str, str]] = {
    400: ("bad-request", "Bad request"),
    401: (NotAuthenticatedError.slug or "", NotAuthenticatedError.title),
    404: (NotFoundError.slug or "", NotFoundError.title),
    405: ("method-not-allowed", "Method not allowed"),
    413: (UploadTooLargeError.slug or "", UploadTooLargeError.title),
    415: (UnsupportedUploadError.slug or "", UnsupportedUploadError.title),
    429: ("too-many-requests", "Too many requests"),
}


def field_problems(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's errors as problem ``errors``: only loc, msg and type (``input`` and ``ctx``
    may hold what the client sent, or objects JSON cannot carry)."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type"))}
        for e in errors
    ]


def database_outage(error: BaseException) -> bool:
    """Whether a SQLAlchemy error means the database could not be reached or used (a 503),
    not that a statement was wrong (a 500)."""
    from sqlalchemy import exc

    if isinstance(
        error, exc.OperationalError | exc.InterfaceError | exc.TimeoutError | exc.DisconnectionError
    ):
        return True
    return isinstance(error, exc.DBAPIError) and error.connection_invalidated


def broker_error_types() -> tuple[type[Exception], ...]:
    """The errors kombu and redis-py raise when the broker cannot be reached."""
    import kombu.exceptions
    import redis.exceptions

    return (
        kombu.exceptions.OperationalError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every error of a request through :func:`problem_response`."""
    from sqlalchemy.exc import SQLAlchemyError

    async def service_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ServiceError)
        if isinstance(error, UnavailableError):
            logger.warning("%s %s: %s", request.method, request.url.path, error.message)
        return problem_response(
            request,
            error.status_code,
            slug=error.slug,
            title=error.title,
            headers=error.headers(),
            **error.members(),
        )

    async def validation_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        errors = field_problems(error.errors())
        return problem_response(
            request,
            422,
            slug=InvalidFieldError.slug,
            title=InvalidFieldError.title,
            detail=summarize(errors) or "the request is invalid",
            errors=errors,
        )

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        slug, title = HTTP_PROBLEMS.get(error.status_code, (None, None))
        detail = error.detail if isinstance(error.detail, str) else None
        if detail in (None, _phrase(error.status_code)):
            detail = _http_detail(request, error.status_code)
        return problem_response(
            request,
            error.status_code,
            slug=slug,
            title=title,
            detail=detail,
            headers=error.headers,
        )

    async def database_error(request: Request, error: Exception) -> JSONResponse:
        if not database_outage(error):
            return await unexpected_error(request, error)
        logger.warning("%s %s: database unavailable: %s", request.method, request.url.path, error)
        unavailable = DatabaseUnavailableError("the database is unavailable; retry later")
        return await service_error(request, unavailable)

    async def broker_error(request: Request, error: Exception) -> JSONResponse:
        logger.warning("%s %s: job queue unavailable: %s", request.method, request.url.path, error)
        unavailable = BrokerUnavailableError("the job queue is unreachable; retry later")
        return await service_error(request, unavailable)

    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the log, never to the client.
        logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=error)
        return problem_response(
            request,
            500,
            slug="internal-error",
            title="Internal error",
            detail="the service failed to answer this request; it is logged, and retrying "
            "may not help",
        )

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(SQLAlchemyError, database_error)
    for broker_type in broker_error_types():
        app.add_exception_handler(broker_type, broker_error)
    # Starlette answers this one from its outermost middleware, then re-raises the exception
    # for the server to log (a test client raises it unless told not to).
    app.add_exception_handler(Exception, unexpected_error)


def _http_detail(request: Request, status_code: int) -> str:
    """Words for Starlette's own errors, which carry only the status phrase."""
    if status_code == 404:
        return f"nothing at {request.url.path} (see /docs for the routes)"
    if status_code == 405:
        return f"{request.method} is not allowed on {request.url.path}"
    return _phrase(status_code)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, each a Problem."""
    return {status: problem_response_spec(status) for status in statuses}


PROBLEM_SCHEMA_REF = "#/components/schemas/Problem"


def problem_response_spec(status: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "description": PROBLEM_DESCRIPTIONS.get(status, _phrase(status)),
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": PROBLEM_SCHEMA_REF}}},
    }
    if status in (429, 503):
        spec["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "schema": {"type": "integer"},
            }
        }
    if status == 401:
        spec["headers"] = {
            "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}
        }
    return spec


PROBLEM_DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing, invalid or revoked API key",
    404: "No such resource for this tenant (another tenant's answers the same)",
    405: "Method not allowed",
    409: "Conflict with the resource's state",
    413: "Upload larger than the deployment's limit",
    415: "Upload in a format this deployment does not take",
    422: "Invalid fields, every one listed in `errors`",
    429: "Over the tenant's rate limit or active-jobs quota, or too many wrong keys from "
    "this address: retry after `Retry-After` seconds",
    500: "Internal error (logged)",
    503: "The database or the job queue is unavailable: retry after `Retry-After` seconds",
}
