"""Domain errors raised by the service functions, and their one mapping to HTTP statuses."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class ServiceError(Exception):
    """Base of the errors a client can act on; ``status_code`` is the HTTP answer."""

    status_code = 400

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, **self.extra}


class NotAuthenticatedError(ServiceError):
    status_code = 401


class NotFoundError(ServiceError):
    """Missing, or owned by another tenant: both answer 404, so ids leak nothing."""

    status_code = 404


class ConflictError(ServiceError):
    status_code = 409


class InvalidFieldError(ServiceError):
    """A field that passed its type check but not the service's: a 422 that names it."""

    status_code = 422

    def __init__(self, loc: tuple[str | int, ...], message: str, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.errors = [{"loc": list(loc), "msg": message, "type": "value_error"}]

    def body(self) -> dict[str, Any]:
        return {"detail": self.errors, **self.extra}


class UploadTooLargeError(ServiceError):
    status_code = 413


class UnsupportedUploadError(ServiceError):
    status_code = 415


class BrokerUnavailableError(ServiceError):
    status_code = 503


def install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ServiceError)
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
        return JSONResponse(error.body(), status_code=error.status_code, headers=headers)

    app.add_exception_handler(ServiceError, handle)
