"""/v1/webhooks: register endpoints for job state changes, list, read, delete them, and read
their delivery log (docs/webhooks.md)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.errors import problem_responses
from api.schemas import MAX_OFFSET, UTCDateTime
from api.services import webhooks as webhook_service
from common.models import Webhook
from common.webhooks import EventName

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

DeliveryStatusName = Literal["pending", "delivered", "failed"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=2000,
        description="an http(s) URL on a public address; events are POSTed to it",
    )
    events: list[EventName] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="the events to send; omitted or null: every event",
    )


class WebhookPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    url: str
    events: list[EventName] | None  # None: every event
    created_at: UTCDateTime


class WebhookCreated(WebhookPublic):
    secret: str = Field(
        description="signs every delivery (HMAC-SHA256, the Bulwark-Signature header); "
        "shown only in this answer: keep it"
    )


class WebhooksPage(BaseModel):
    items: list[WebhookPublic]
    total: int
    limit: int
    offset: int


class WebhookDeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID  # also the Bulwark-Delivery header and the payload's delivery_id
    event: EventName
    job_id: uuid.UUID | None
    status: DeliveryStatusName
    attempts: int
    response_status: int | None  # the receiver's HTTP status at the last attempt
    error: str | None  # why the last attempt failed
    payload: dict[str, Any]  # the body sent
    created_at: UTCDateTime
    updated_at: UTCDateTime
    next_attempt_at: UTCDateTime | None  # when a pending delivery is tried next
    delivered_at: UTCDateTime | None


class WebhookDeliveriesPage(BaseModel):
    items: list[WebhookDeliveryPublic]
    total: int
    limit: int
    offset: int


def webhook_public(webhook: Webhook) -> WebhookPublic:
    return WebhookPublic.model_validate(webhook)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    operation_id="createWebhook",
    summary="Register a webhook endpoint",
    responses={
        201: {
            "description": "The endpoint, with its secret (shown only here)",
            "headers": {
                "Location": {"description": "the webhook's URL", "schema": {"type": "string"}}
            },
        },
        **problem_responses(409),
    },
)
def create_webhook(
    body: WebhookCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
) -> WebhookCreated:
    """Register an endpoint: 201 with its ``secret``, the only time the secret is shown.

    The URL must be http(s) and its host must resolve to public addresses (loopback, private,
    link-local and multicast ones are refused with a 422 on ``url``)."""
    webhook = webhook_service.create_webhook(
        session=session,
        settings=settings,
        tenant=tenant,
        url=body.url,
        events=list(body.events) if body.events is not None else None,
    )
    response.headers["Location"] = f"/v1/webhooks/{webhook.id}"
    return WebhookCreated.model_validate(webhook)


@router.get("", operation_id="listWebhooks", summary="List webhook endpoints")
def list_webhooks(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> WebhooksPage:
    webhooks, total = webhook_service.list_webhooks(
        session=session, tenant=tenant, limit=limit, offset=offset
    )
    return WebhooksPage(
        items=[webhook_public(w) for w in webhooks], total=total, limit=limit, offset=offset
    )


@router.get("/{webhook_id}", operation_id="getWebhook", summary="Read a webhook endpoint")
def get_webhook(webhook_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> WebhookPublic:
    return webhook_public(
        webhook_service.get_webhook(session=session, tenant=tenant, webhook_id=webhook_id)
    )


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteWebhook",
    summary="Delete a webhook endpoint",
)
def delete_webhook(webhook_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> Response:
    """Stop sending to the endpoint: its pending deliveries end ``failed``; a repeated DELETE
    is 204 too."""
    webhook_service.delete_webhook(session=session, tenant=tenant, webhook_id=webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{webhook_id}/deliveries",
    operation_id="listWebhookDeliveries",
    summary="A webhook endpoint's delivery log",
)
def list_deliveries(
    webhook_id: uuid.UUID,
    session: SessionDep,
    tenant: CurrentTenant,
    status: DeliveryStatusName | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> WebhookDeliveriesPage:
    """The delivery log, newest first: each event sent (or being sent) to this endpoint, its
    attempts, the receiver's last status and the last error."""
    deliveries, total = webhook_service.list_deliveries(
        session=session,
        tenant=tenant,
        webhook_id=webhook_id,
        status=status,
        limit=limit,
        offset=offset,
    )
    return WebhookDeliveriesPage(
        items=[WebhookDeliveryPublic.model_validate(d) for d in deliveries],
        total=total,
        limit=limit,
        offset=offset,
    )
