"""/v1/keys: a tenant rotates its own API key."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel, Field

from api.deps import CurrentTenant, SessionDep
from api.services import tenants as tenant_service

router = APIRouter(prefix="/v1/keys", tags=["keys"])


class NewKeyPublic(BaseModel):
    """A new API key, shown once: only its HMAC is stored."""

    id: uuid.UUID = Field(description="the new key's id (`bulwark tenants revoke --key-id`)")
    key: str = Field(description="the new key: store it now, it is not shown again")
    prefix: str = Field(description="the key's first characters, for telling keys apart")
    created_at: datetime
    revoked_key_id: uuid.UUID = Field(
        description="the key this request came with, revoked by this rotation"
    )


CREATED: dict[int | str, dict[str, Any]] = {
    201: {"description": "The new key (shown once); the key the request came with is revoked"}
}


@router.post(
    "/rotate",
    status_code=status.HTTP_201_CREATED,
    operation_id="rotateKey",
    summary="Rotate this API key",
    responses=CREATED,
)
def rotate_key(
    request: Request, response: Response, session: SessionDep, tenant: CurrentTenant
) -> NewKeyPublic:
    """Make a new key for the tenant and revoke the key this request was sent with, in one
    commit: the old key answers 401 from this answer on (no grace period). Store the new key
    before anything else; an operator can issue another with `bulwark tenants new-key NAME`."""
    current: uuid.UUID = request.state.api_key_id
    created = tenant_service.rotate_key(
        session=session, tenant=tenant, current_key_id=current, secret=request.app.state.key_secret
    )
    request.app.state.key_cache.clear()  # the old key stops here at once, polls too
    response.headers["Cache-Control"] = "no-store"
    return NewKeyPublic(
        id=created.key.id,
        key=created.api_key,
        prefix=created.key.prefix,
        created_at=created.key.created_at,
        revoked_key_id=current,
    )
