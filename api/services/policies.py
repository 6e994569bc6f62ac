"""A tenant's stored audit policies over the API: store a new version, read the one in force,
list and read versions (``common.policies`` does the storing and the versioning)."""

from __future__ import annotations

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.errors import ConflictError, NotFoundError
from api.schemas import UTCDateTime
from catalog.policy import Policy
from common import policies
from common.models import StoredPolicy, Tenant


class PolicyVersionPublic(BaseModel):
    """One stored version of a tenant's policy."""

    version: int
    policy: Policy
    created_at: UTCDateTime


class PolicyInForce(BaseModel):
    """The policy the tenant's next audit verdicts use."""

    version: int | None  # None: the tenant stored none, Bulwark's default policy applies
    policy: Policy
    default: bool  # True when ``policy`` is Bulwark's default (no version stored)


class PolicyVersionsPage(BaseModel):
    items: list[PolicyVersionPublic]  # newest first
    total: int
    limit: int
    offset: int


def version_public(row: StoredPolicy) -> PolicyVersionPublic:
    return PolicyVersionPublic(
        version=row.version, policy=policies.policy_of(row), created_at=row.created_at
    )


def store_policy(*, session: Session, tenant: Tenant, policy: Policy) -> StoredPolicy:
    """Store ``policy`` as the tenant's next version; 409 if concurrent updates kept taking
    the number (the client stores it again)."""
    try:
        return policies.store_policy(session, tenant.id, policy)
    except policies.PolicyVersionConflictError as error:
        raise ConflictError(str(error)) from None


def policy_in_force(*, session: Session, tenant: Tenant) -> PolicyInForce:
    version, policy = policies.current_policy(session, tenant.id)
    return PolicyInForce(version=version, policy=policy, default=version is None)


def list_versions(
    *, session: Session, tenant: Tenant, limit: int, offset: int
) -> tuple[list[StoredPolicy], int]:
    """A page of the tenant's stored versions, newest first, and how many there are."""
    where = StoredPolicy.tenant_id == tenant.id
    total = session.scalar(select(func.count()).select_from(StoredPolicy).where(where)) or 0
    rows = session.scalars(
        select(StoredPolicy)
        .where(where)
        .order_by(StoredPolicy.version.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def get_version(*, session: Session, tenant: Tenant, version: int) -> StoredPolicy:
    """One version of the tenant's policy; 404 if the tenant stored no such version."""
    row = policies.stored_version(session, tenant.id, version)
    if row is None:
        raise NotFoundError(f"no policy version {version}")
    return row
