"""A tenant's stored audit policies: versioned, the newest in force (torch-free).

Every ``PUT /v1/policy`` stores a new version (1, 2, ...) of the tenant's
``catalog.policy.Policy`` in the ``policies`` table; older versions stay, so a report's
verdict can name the version that decided it. A tenant that stored none is held to
``catalog.policy.DEFAULT_POLICY``. The API stores and reads policies; the worker calls
:func:`current_policy` when an audit finishes and records the verdict with its version.
"""

from __future__ import annotations

import random
import time
import uuid

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from catalog.policy import DEFAULT_POLICY, Policy
from common.models import StoredPolicy, Tenant, utcnow

# Tries of store_policy when another writer took the version it computed. On Postgres the
# tenant's row lock serializes writers and the first try succeeds; where the lock is a no-op
# (SQLite, embedded) the primary key refuses the second writer and it takes the next number,
# after a short random pause so that the writers that collided do not collide again.
STORE_ATTEMPTS = 10
RETRY_PAUSE_SECONDS = 0.02


class PolicyVersionConflictError(Exception):
    """Every try of :func:`store_policy` lost the race for a version number."""


def policy_of(row: StoredPolicy) -> Policy:
    """The policy a stored row holds."""
    return Policy.model_validate(row.body)


def current_policy(session: Session, tenant_id: uuid.UUID) -> tuple[int | None, Policy]:
    """The tenant's policy in force and its version: the newest stored one, or
    ``(None, DEFAULT_POLICY)`` when the tenant stored none."""
    row = session.scalars(
        select(StoredPolicy)
        .where(StoredPolicy.tenant_id == tenant_id)
        .order_by(StoredPolicy.version.desc())
        .limit(1)
    ).first()
    if row is None:
        return None, DEFAULT_POLICY
    return row.version, policy_of(row)


def stored_version(session: Session, tenant_id: uuid.UUID, version: int) -> StoredPolicy | None:
    """The row of one version of the tenant's policy, or None."""
    return session.get(StoredPolicy, (tenant_id, version))


def policy_version(session: Session, tenant_id: uuid.UUID, version: int) -> Policy | None:
    """One version of the tenant's policy, or None if the tenant has no such version."""
    row = stored_version(session, tenant_id, version)
    return None if row is None else policy_of(row)


def stored_versions(session: Session, tenant_id: uuid.UUID) -> list[StoredPolicy]:
    """Every stored version of the tenant's policy, newest first."""
    return list(
        session.scalars(
            select(StoredPolicy)
            .where(StoredPolicy.tenant_id == tenant_id)
            .order_by(StoredPolicy.version.desc())
        )
    )


def store_policy(
    session: Session, tenant_id: uuid.UUID, policy: Policy, *, attempts: int = STORE_ATTEMPTS
) -> StoredPolicy:
    """Store ``policy`` as the tenant's next version and commit; the stored row.

    Two concurrent calls never get the same version: on Postgres the tenant's row is locked
    (``FOR NO KEY UPDATE``, which does not block inserts that reference it) while the next
    number is read and written; elsewhere the primary key (tenant, version) refuses the
    second writer, whose transaction is rolled back and tried again with the next number.
    Each try commits or rolls back the whole session. Raises ``LookupError`` for an unknown
    tenant and :class:`PolicyVersionConflictError` when every try lost the race.
    """
    # The attacks' entries are written without their unset fields (Policy's serializer), so
    # the stored body reads back with the same meaning.
    body = policy.model_dump(mode="json")
    for attempt in range(attempts):
        locked = session.scalar(
            select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True)
        )
        if locked is None:
            session.rollback()
            raise LookupError(f"no tenant {tenant_id}")
        newest = session.scalar(
            select(func.max(StoredPolicy.version)).where(StoredPolicy.tenant_id == tenant_id)
        )
        row = StoredPolicy(
            tenant_id=tenant_id, version=(newest or 0) + 1, body=body, created_at=utcnow()
        )
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            # Another writer stored this version first; the next try reads the new newest.
            session.rollback()
            time.sleep(random.uniform(0, RETRY_PAUSE_SECONDS * (attempt + 1)))
            continue
        return row
    raise PolicyVersionConflictError(
        f"{attempts} concurrent policy updates took every version number tried; store it again"
    )
