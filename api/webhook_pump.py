"""The webhook delivery pump: a daemon thread of each API process that sends due deliveries.

Deliveries do not ride the Celery ``gpu`` queue: a worker busy with a two-hour job would hold
them back. Every ``webhook_poll_seconds`` the pump claims a few due ``pending`` rows with
``SELECT ... FOR UPDATE SKIP LOCKED`` (so several API processes never take the same row), moves
their ``next_attempt_at`` past the send (a claim that dies with its process is retried then),
counts the attempt and commits; then it POSTs them (short timeout, redirects not followed) and
records each outcome: 2xx is ``delivered``; anything else is retried with exponential backoff,
and ``failed`` after ``webhook_max_attempts``. A database error is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from common.models import Webhook, WebhookDelivery, utcnow
from common.settings import Settings
from common.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    DeliveryStatus,
    WebhookTargetError,
    body_bytes,
    check_target,
    sign,
)

logger = logging.getLogger(__name__)

CONCURRENCY = 4  # deliveries sent at once (and claimed per round) by one process
MAX_ERROR_CHARS = 500
MAX_IDLE_AFTER_ERRORS_SECONDS = 10.0


@dataclass(frozen=True)
class Claimed:
    """A delivery this process claimed: everything needed to send it, read in the claim."""

    id: uuid.UUID
    url: str
    secret: str
    event: str
    payload: dict[str, Any]
    attempts: int  # including this one


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    response_status: int | None
    error: str | None
    permanent: bool = False  # no point retrying (a refused target)


def backoff_seconds(settings: Settings, attempts: int) -> float:
    """The wait before the next attempt after ``attempts`` failed ones: base * 2**(n-1), capped."""
    exponent = min(max(attempts - 1, 0), 30)  # 2**30 s is past any cap; keeps the float finite
    return min(settings.webhook_backoff_seconds * 2**exponent, settings.webhook_backoff_max_seconds)


class WebhookPump:
    """Claims, sends and records webhook deliveries; :meth:`run_once` is one round."""

    def __init__(
        self,
        *,
        settings: Settings,
        session_factory: sessionmaker[Session],
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.client = httpx.Client(
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            transport=transport,
            headers={"User-Agent": "Bulwark-Webhooks/1"},
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._senders = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="webhook-send")

    # ---- the thread --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook-pump", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop after the round in progress (at most one send timeout away)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        self._senders.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def _run(self) -> None:
        errors_in_a_row = 0
        while not self._stop.is_set():
            try:
                sent = self.run_once()
                errors_in_a_row = 0
            except Exception:  # the database may be down: log, wait, go on
                logger.exception("webhook pump round failed")
                errors_in_a_row += 1
                sent = 0
            if sent == CONCURRENCY:
                continue  # more may be due: no wait
            wait = self.settings.webhook_poll_seconds
            if errors_in_a_row:  # back off while the database is away, up to a bound
                wait = min(wait * 2 ** min(errors_in_a_row, 10), MAX_IDLE_AFTER_ERRORS_SECONDS)
            self._stop.wait(wait)

    # ---- one round ---------------------------------------------------------------------------

    def run_once(self) -> int:
        """Claim up to ``CONCURRENCY`` due deliveries, send them, record how each went;
        returns how many were sent."""
        claimed = self.claim()
        if not claimed:
            return 0
        outcomes = list(self._senders.map(self.send, claimed))
        for delivery, outcome in zip(claimed, outcomes, strict=True):
            self.record(delivery, outcome)
        return len(claimed)

    def claim(self) -> list[Claimed]:
        now = utcnow()
        # A claim holds the row until the send is surely over (a timeout, plus slack).
        held_until = now + timedelta(seconds=2 * self.settings.webhook_timeout_seconds + 30)
        with self.session_factory() as session:
            rows = session.execute(
                select(WebhookDelivery, Webhook)
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .where(
                    WebhookDelivery.status == DeliveryStatus.PENDING,
                    WebhookDelivery.next_attempt_at <= now,
                    Webhook.deleted_at.is_(None),
                )
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.created_at)
                .limit(CONCURRENCY)
                .with_for_update(skip_locked=True, of=WebhookDelivery)
            ).all()
            claimed = []
            for delivery, webhook in rows:
                # Counted at the claim: a delivery that kills its process still runs out.
                delivery.attempts += 1
                delivery.next_attempt_at = held_until
                delivery.updated_at = now
                claimed.append(
                    Claimed(
                        id=delivery.id,
                        url=webhook.url,
                        secret=webhook.secret,
                        event=delivery.event,
                        payload=delivery.payload,
                        attempts=delivery.attempts,
                    )
                )
            session.commit()
        return claimed

    def send(self, delivery: Claimed) -> Outcome:
        """POST one delivery; never raises."""
        try:
            check_target(delivery.url, allow_private=self.settings.webhook_allow_private_targets)
        except WebhookTargetError as error:
            return Outcome(False, None, f"refused: {error}", permanent=error.permanent)
        body = body_bytes(delivery.payload)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(delivery.secret, body),
            EVENT_HEADER: delivery.event,
            DELIVERY_HEADER: str(delivery.id),
        }
        try:
            response = self.client.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as error:
            return Outcome(False, None, _clip(f"{type(error).__name__}: {error}"))
        except Exception as error:  # anything else from the network stack: a failed attempt
            logger.exception("webhook delivery %s raised", delivery.id)
            return Outcome(False, None, _clip(f"{type(error).__name__}: {error}"))
        if 200 <= response.status_code < 300:
            return Outcome(True, response.status_code, None)
        detail = f"HTTP {response.status_code}"
        if response.is_redirect:
            detail += " (redirects are not followed; register the final URL)"
        text = response.text.strip()
        return Outcome(False, response.status_code, _clip(f"{detail}: {text}" if text else detail))

    def record(self, delivery: Claimed, outcome: Outcome) -> None:
        now = utcnow()
        values: dict[str, Any] = {
            "response_status": outcome.response_status,
            "error": outcome.error,
            "updated_at": now,
        }
        if outcome.delivered:
            values |= {"status": DeliveryStatus.DELIVERED, "delivered_at": now}
            values["next_attempt_at"] = None
        elif outcome.permanent or delivery.attempts >= self.settings.webhook_max_attempts:
            values |= {"status": DeliveryStatus.FAILED, "next_attempt_at": None}
        else:
            wait = backoff_seconds(self.settings, delivery.attempts)
            values["next_attempt_at"] = now + timedelta(seconds=wait)
        with self.session_factory() as session:
            session.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == delivery.id).values(**values)
            )
            session.commit()
        logger.info(
            "webhook delivery %s (%s) attempt %d: %s",
            delivery.id,
            delivery.event,
            delivery.attempts,
            "delivered" if outcome.delivered else outcome.error,
        )


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


@asynccontextmanager
async def webhook_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The FastAPI lifespan that runs the pump while the app serves, and stops it after."""
    pump = WebhookPump(settings=app.state.settings, session_factory=app.state.session_factory)
    app.state.webhook_pump = pump
    pump.start()
    try:
        yield
    finally:
        await run_in_threadpool(pump.stop)
