"""Tenants and their API keys (``bulwark tenants create NAME``), and Bearer authentication."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import ConflictError, NotAuthenticatedError
from common.models import ApiKey, Tenant

KEY_PREFIX = "bwk_"


def hash_key(key: str) -> str:
    """sha256 of the key: keys are 256 random bits, so a fast hash cannot be brute-forced."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewTenant:
    tenant: Tenant
    api_key: str  # shown once; only its hash is stored


def create_tenant(*, session: Session, name: str) -> NewTenant:
    """A new tenant with one API key; the key is in the result and nowhere else."""
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise ConflictError(f"a tenant named {name!r} exists") from None
    key = create_api_key(session=session, tenant=tenant)
    session.commit()
    return NewTenant(tenant=tenant, api_key=key)


def create_api_key(*, session: Session, tenant: Tenant) -> str:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10]))
    return key


def authenticate(*, session: Session, authorization: str | None) -> Tenant:
    """The tenant owning the Bearer key in an ``Authorization`` header value."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise NotAuthenticatedError("missing API key: send 'Authorization: Bearer <key>'")
    tenant = session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key.strip()), ApiKey.revoked_at.is_(None))
    )
    if tenant is None:
        raise NotAuthenticatedError("invalid or revoked API key")
    return tenant


def list_tenants(*, session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.created_at)))
