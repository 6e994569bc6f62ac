"""Webhooks of job state changes: the outbox rows, the payload, the signature and the target check.

When a job changes state, :func:`record_job_event` writes one ``WebhookDelivery`` per live,
matching webhook of the job's tenant, in the transaction that changes the state (the caller
commits), so an event is recorded exactly when its state change is. The API's delivery pump
(``api/webhook_pump.py``) sends them. Everything here is standard library and SQLAlchemy, so
the worker records events without loading an HTTP client.

A delivery is signed as ``Bulwark-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<raw body>")>``; :func:`verify_signature` is what a receiver runs (docs/webhooks.md).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
import uuid
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from catalog import JOB_KINDS
from common.models import Job, JobStatus, Webhook, WebhookDelivery, utcnow

# One event per job status: "job.<status>" (tests/test_webhook_signing.py checks the match).
EventName = Literal["job.queued", "job.running", "job.succeeded", "job.failed", "job.cancelled"]
EVENTS: tuple[str, ...] = get_args(EventName)
SIGNATURE_HEADER = "Bulwark-Signature"
EVENT_HEADER = "Bulwark-Event"
DELIVERY_HEADER = "Bulwark-Delivery"
SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_SECONDS = 300


class DeliveryStatus:
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def new_secret() -> str:
    """A webhook's signing secret: ``whsec_`` and 32 random bytes, URL-safe base64."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def event_for(status: JobStatus) -> str:
    return f"job.{status.value}"


# ---- the outbox ------------------------------------------------------------------------------


def record_job_event(session: Session, job_id: uuid.UUID) -> list[WebhookDelivery]:
    """Queue the job's current status as an event to every live webhook of its tenant that
    subscribed to it; the caller commits, so the rows land with the state change or not at all.

    Call it after the statement that changed the job's status: the job is re-read here
    (pending changes are flushed first), so ``UPDATE`` statements and ORM changes both work.
    """
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.parent_id is not None:  # an audit's part is internal: its audit tells
        return []
    event = event_for(job.status)
    webhooks = session.scalars(
        select(Webhook).where(Webhook.tenant_id == job.tenant_id, Webhook.deleted_at.is_(None))
    ).all()
    now = utcnow()
    deliveries = []
    for webhook in webhooks:
        if webhook.events is not None and event not in webhook.events:
            continue
        delivery_id = uuid.uuid4()
        delivery = WebhookDelivery(
            id=delivery_id,
            webhook_id=webhook.id,
            tenant_id=job.tenant_id,
            job_id=job.id,
            event=event,
            payload=job_payload(job, event=event, delivery_id=delivery_id, occurred_at=now),
            status=DeliveryStatus.PENDING,
            attempts=0,
            created_at=now,
            updated_at=now,
            next_attempt_at=now,
        )
        session.add(delivery)
        deliveries.append(delivery)
    return deliveries


def job_payload(
    job: Job, *, event: str, delivery_id: uuid.UUID, occurred_at: Any
) -> dict[str, Any]:
    """The JSON body of an event: what changed, and where to read the rest (paths relative
    to the API's base URL)."""
    links = {"job": f"/v1/jobs/{job.id}"}
    if JOB_KINDS.get(job.kind).has_report and job.status == JobStatus.SUCCEEDED:
        links["report"] = f"/v1/jobs/{job.id}/report"
    return {
        "event": event,
        "delivery_id": str(delivery_id),
        "occurred_at": occurred_at.isoformat(),
        "job": {
            "id": str(job.id),
            "kind": job.kind,
            "status": job.status.value,
            "phase": job.phase,
            "progress": job.progress,
            "message": job.message,
            "error": job.error,
            "attempts": job.attempts,
            "model_id": str(job.model_id) if job.model_id else None,
            "result_model_id": str(job.result_model_id) if job.result_model_id else None,
            "links": links,
        },
    }


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed): compact, key-sorted JSON, the same on every retry."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


# ---- signatures ------------------------------------------------------------------------------


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, *, timestamp: int | None = None) -> str:
    """The ``Bulwark-Signature`` header value of ``body`` at ``timestamp`` (default: now)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_SECONDS,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (a ``Bulwark-Signature`` value) signs ``body`` (the raw request
    bytes, before any JSON parsing) with ``secret``, at a time within ``tolerance_s`` of now.

    The timestamp is signed with the body, so a captured delivery cannot be replayed later
    than the tolerance. Any ``v1`` entry may match (several appear while a secret rotates).
    """
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


# ---- where deliveries may go -----------------------------------------------------------------


class WebhookTargetError(Exception):
    """A URL deliveries may not (``permanent``) or cannot now (DNS) be sent to."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def url_problem(url: str) -> str | None:
    """What is wrong with ``url``'s form (scheme, host, credentials), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as error:
        return f"not a valid URL: {error}"
    if parts.scheme not in ("http", "https"):
        return f"only http and https URLs are allowed, got {parts.scheme or 'no'} scheme"
    if not parts.hostname:
        return "the URL has no host"
    if parts.username is not None or parts.password is not None:
        return "put no credentials in the URL; check the Bulwark-Signature header instead"
    if parts.fragment:
        return "the URL may not have a #fragment"
    return None


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    )


def check_target(url: str, *, allow_private: bool) -> None:
    """Refuse a URL that is not http(s) or whose host resolves to a loopback, private,
    link-local, multicast or reserved address (unless ``allow_private``): a webhook must not
    let a tenant make the service call its own network. Raises :class:`WebhookTargetError`.

    Checked at registration and again before every delivery, since DNS can change.
    """
    problem = url_problem(url)
    if problem:
        raise WebhookTargetError(problem, permanent=True)
    if allow_private:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise WebhookTargetError(
            f"the host {host!r} does not resolve ({error})", permanent=False
        ) from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if _forbidden(address):
            raise WebhookTargetError(
                f"the host {host!r} resolves to {address}, a loopback, private, link-local, "
                "multicast or reserved address; webhooks go to public addresses only",
                permanent=True,
            )
