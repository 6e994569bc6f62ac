"""Domain errors raised by the service functions, and their one mapping to HTTP statuses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    """Fields that passed their type checks but not the service's: one 422 naming every one.

    ``errors`` are pydantic-style (each a ``loc`` and a ``msg``, optionally a ``type``); the
    body has FastAPI's own 422 shape, ``{"detail": [{"loc", "msg", "type"}, ...]}``.
    ``InvalidFieldError.at(loc, message)`` names a single field.
    """

    status_code = 422

    def __init__(self, errors: Sequence[Mapping[str, Any]], **extra: Any) -> None:
        if not errors:
            raise ValueError("InvalidFieldError needs at least one error")
        self.errors = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e.get("type", "value_error")}
            for e in errors
        ]
        super().__init__(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in self.errors),
            **extra,
        )

    @classmethod
    def at(cls, loc: Sequence[str | int], message: str, **extra: Any) -> InvalidFieldError:
        """The error of one field."""
        return cls([{"loc": loc, "msg": message}], **extra)

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
