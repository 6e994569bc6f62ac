"""Request bodies are bounded before anything trusts or parses them.

FastAPI reads a request's body before it resolves the route's dependencies, so before the
API key is checked: without a bound, anyone could make the API hold a 100 MiB JSON body in
memory just to answer 401. :class:`BodyLimitMiddleware` (pure ASGI, outermost but for
Starlette's error middleware) caps every body by its kind:

- ``multipart/form-data`` (uploads): the upload limit plus the form's other fields
  (``api.uploads.FORM_OVERHEAD_BYTES``);
- anything else (JSON): ``BULWARK_MAX_JSON_BODY_BYTES`` (1 MiB).

A ``Content-Length`` over the cap answers 413 at once, nothing read. A body without one
(chunked) is counted as it streams, and the read that passes the cap raises a 413
``HTTPException`` into whatever was reading it (FastAPI's body reader and the upload parser
both let it through), so at most the cap plus one chunk is ever read.
"""

from __future__ import annotations

from fastapi import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import UploadTooLargeError, problem_response
from api.uploads import FORM_OVERHEAD_BYTES
from common.settings import Settings


def body_cap(settings: Settings, content_type: str) -> tuple[int, str]:
    """The most bytes a body of ``content_type`` may hold, and what to call that limit."""
    if content_type.split(";", 1)[0].strip().lower() == "multipart/form-data":
        return settings.max_upload_bytes + FORM_OVERHEAD_BYTES, "upload"
    return settings.max_json_body_bytes, "request body"


def too_large_detail(kind: str, cap: int, declared: int | None = None) -> str:
    sent = f"declares {declared} bytes" if declared is not None else "is longer"
    return f"the {kind} {sent}; this deployment accepts at most {cap} bytes"


class BodyLimitMiddleware:
    """Cap request bodies (see the module): 413 before the route reads past the cap."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        cap, kind = body_cap(self.settings, content_type)
        declared_header = headers.get(b"content-length")
        if declared_header is not None:
            declared = _declared_length(declared_header)
            if declared is None or declared > cap:
                request = Request(scope)
                if declared is None:
                    response = problem_response(
                        request,
                        400,
                        slug="bad-request",
                        title="Bad request",
                        detail="the Content-Length header is not a byte count",
                    )
                else:
                    response = problem_response(
                        request,
                        413,
                        slug=UploadTooLargeError.slug,
                        title=UploadTooLargeError.title,
                        detail=too_large_detail(kind, cap, declared),
                        limit_bytes=cap,
                    )
                # Close the connection: the body the client is still sending is never read.
                response.headers["Connection"] = "close"
                await response(scope, receive, send)
                return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise HTTPException(
                        status_code=413,
                        detail=too_large_detail(kind, cap),
                        headers={"Connection": "close"},
                    )
            return message

        await self.app(scope, counted_receive, send)


def _declared_length(raw: bytes) -> int | None:
    text = raw.decode("latin-1").strip()
    # At most 19 digits: anything longer is past any cap and not worth converting.
    if not text.isdigit() or len(text) > 19:
        return None if not text.isdigit() else 1 << 63
    return int(text)
