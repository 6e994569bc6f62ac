"""Tenant webhooks: registering endpoints (the secret is made here and shown once), listing,
deleting them, and reading their delivery log. Events are recorded by ``common.webhooks`` and
sent by ``api.webhook_pump``."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.errors import ConflictError, InvalidFieldError, NotFoundError
from common.models import Tenant, Webhook, WebhookDelivery, utcnow
from common.settings import Settings
from common.webhooks import DeliveryStatus, WebhookTargetError, check_target, new_secret

MAX_WEBHOOKS_PER_TENANT = 20


def create_webhook(
    *,
    session: Session,
    settings: Settings,
    tenant: Tenant,
    url: str,
    events: list[str] | None,
) -> Webhook:
    """Check the target (a 422 on ``url`` names why it is refused) and store the webhook
    with a fresh secret; the returned row carries the secret, which no later read shows."""
    url = url.strip()
    try:
        check_target(url, allow_private=settings.webhook_allow_private_targets)
    except WebhookTargetError as error:
        raise InvalidFieldError.at(("body", "url"), str(error)) from None
    live = session.scalar(
        select(func.count())
        .select_from(Webhook)
        .where(Webhook.tenant_id == tenant.id, Webhook.deleted_at.is_(None))
    )
    if (live or 0) >= MAX_WEBHOOKS_PER_TENANT:
        raise ConflictError(
            f"a tenant may have at most {MAX_WEBHOOKS_PER_TENANT} webhooks; delete one first"
        )
    webhook = Webhook(
        id=uuid.uuid4(),
        tenant_id=tenant.id,
        url=url,
        secret=new_secret(),
        # Kept in the order of the request, without repeats; None means every event.
        events=list(dict.fromkeys(events)) if events is not None else None,
        created_at=utcnow(),
    )
    session.add(webhook)
    session.commit()
    return webhook


def get_webhook(*, session: Session, tenant: Tenant, webhook_id: uuid.UUID) -> Webhook:
    """The tenant's live webhook; a deleted one, another tenant's or a missing one is a 404."""
    webhook = session.get(Webhook, webhook_id)
    if webhook is None or webhook.tenant_id != tenant.id or webhook.deleted_at is not None:
        raise NotFoundError(f"no webhook {webhook_id}")
    return webhook


def list_webhooks(
    *, session: Session, tenant: Tenant, limit: int, offset: int
) -> tuple[list[Webhook], int]:
    query = select(Webhook).where(Webhook.tenant_id == tenant.id, Webhook.deleted_at.is_(None))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    webhooks = session.scalars(
        query.order_by(Webhook.created_at.desc(), Webhook.id).limit(limit).offset(offset)
    ).all()
    return list(webhooks), total


def delete_webhook(*, session: Session, tenant: Tenant, webhook_id: uuid.UUID) -> None:
    """Soft-delete the webhook; its pending deliveries end ``failed`` (nothing more is sent,
    nothing new is recorded). Deleting it again changes nothing."""
    webhook = session.get(Webhook, webhook_id, with_for_update=True)
    if webhook is None or webhook.tenant_id != tenant.id:
        raise NotFoundError(f"no webhook {webhook_id}")
    if webhook.deleted_at is not None:
        return
    now = utcnow()
    webhook.deleted_at = now
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.webhook_id == webhook.id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
        )
        .values(
            status=DeliveryStatus.FAILED,
            error="not sent: the webhook was deleted",
            next_attempt_at=None,
            updated_at=now,
        )
    )
    session.commit()


def list_deliveries(
    *,
    session: Session,
    tenant: Tenant,
    webhook_id: uuid.UUID,
    status: str | None,
    limit: int,
    offset: int,
) -> tuple[list[WebhookDelivery], int]:
    """The webhook's delivery log, newest first."""
    webhook = get_webhook(session=session, tenant=tenant, webhook_id=webhook_id)
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook.id)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    deliveries = session.scalars(
        query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(deliveries), total
