"""Tenants and their API keys (``bulwark tenants create NAME``), and Bearer authentication.

A key is ``bwk_`` + 256 random bits, shown once. The database keeps only
HMAC-SHA256(key secret, key) (``hash_scheme`` ``hmac-sha256``): without the deployment's key
secret (``BULWARK_KEY_SECRET``, or ``<data_dir>/key-secret`` locally) a copy of the database
names no key and cannot check a guess. Keys stored before migration 0007 are plain sha256
(``hash_scheme`` ``sha256``): they still authenticate, and their row is rewritten to the HMAC
the first time they do.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import ConflictError, NotAuthenticatedError, NotFoundError
from common.db import rows_matched
from common.models import ApiKey, Tenant, utcnow
from common.settings import Settings, get_settings

KEY_PREFIX = "bwk_"
HMAC_SCHEME = "hmac-sha256"
LEGACY_SCHEME = "sha256"
KEY_SECRET_FILE = "key-secret"
MIN_SECRET_LENGTH = 32
# last_used_at is written at most this often per key: a poller must not cost a write per read.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class KeySecretError(RuntimeError):
    """The deployment's key secret is missing (production) or too short."""


def load_key_secret(settings: Settings) -> bytes:
    """The server secret the key HMACs are made with.

    ``BULWARK_KEY_SECRET`` when set (at least 32 characters); production refuses to run
    without it. Locally, ``<data_dir>/key-secret``, created on first use (mode 0600) and read
    by every process of the deployment (the API, the CLI) thereafter.
    """
    if settings.key_secret is not None:
        secret = settings.key_secret.get_secret_value()
        if len(secret) < MIN_SECRET_LENGTH:
            raise KeySecretError(
                f"BULWARK_KEY_SECRET must be at least {MIN_SECRET_LENGTH} characters "
                f"(got {len(secret)}); `python -c 'import secrets; "
                "print(secrets.token_urlsafe(48))'` makes one"
            )
        return secret.encode()
    if settings.environment == "production":
        raise KeySecretError(
            "BULWARK_ENVIRONMENT=production needs BULWARK_KEY_SECRET (the server secret API "
            "keys are stored as HMACs of): the same value for every API process and the CLI"
        )
    return _read_or_create_secret_file(settings.data_dir / KEY_SECRET_FILE)


def _read_or_create_secret_file(path: Path) -> bytes:
    """The secret in ``path``; created atomically when missing, so that two processes that
    start together (``bulwark serve`` and ``bulwark tenants create``) agree on one."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(48) + "\n")
        # Fails if another process made it first: theirs is read below.
        with contextlib.suppress(FileExistsError):
            os.link(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return path.read_bytes().strip()


def key_digest(secret: bytes, key: str) -> str:
    """HMAC-SHA256 of the key under the deployment's secret (hex, 64 characters)."""
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def legacy_digest(key: str) -> str:
    """The plain sha256 keys were stored as before migration 0007."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class NewTenant:
    tenant: Tenant
    api_key: str  # shown once; only its HMAC is stored


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    api_key: str  # shown once


@dataclass(frozen=True)
class Authenticated:
    tenant: Tenant
    key_id: uuid.UUID


def create_tenant(*, session: Session, name: str, settings: Settings | None = None) -> NewTenant:
    """A new tenant with one API key; the key is in the result and nowhere else.

    ``settings`` names the key secret (default: the process's settings, as the CLI has)."""
    secret = load_key_secret(settings or get_settings())
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise ConflictError(f"a tenant named {name!r} exists") from None
    created = create_api_key(session=session, tenant=tenant, secret=secret)
    session.commit()
    return NewTenant(tenant=tenant, api_key=created.api_key)


def create_api_key(*, session: Session, tenant: Tenant, secret: bytes) -> NewKey:
    """A new key of ``tenant`` (the caller commits)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=uuid.uuid4(),
        tenant_id=tenant.id,
        key_hash=key_digest(secret, key),
        hash_scheme=HMAC_SCHEME,
        prefix=key[:10],
        created_at=utcnow(),
    )
    session.add(row)
    return NewKey(key=row, api_key=key)


class KeyCache:
    """Keys recently authenticated by this API process, by their HMAC, for ``ttl`` seconds.

    Only the status poll reads it (``api.routes.jobs.get_job``): pollers are most of the
    traffic, and the key and tenant lookup was half of a poll's cost. A key revoked elsewhere
    (``bulwark tenants revoke``, or a rotation in another API process) still reads job states
    here for at most ``ttl`` seconds; every other route, and every write, looks the key up.
    Entries hold the tenant as read (detached); the poll uses its id alone.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: dict[str, tuple[float, Authenticated]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> Authenticated | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None or entry[0] < time.monotonic():
                return None
            return entry[1]

    def put(self, digest: str, authenticated: Authenticated) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:  # expired first, then the oldest
                now = time.monotonic()
                self._entries = {d: e for d, e in self._entries.items() if e[0] >= now}
                while len(self._entries) >= self.max_entries:
                    del self._entries[next(iter(self._entries))]
            self._entries[digest] = (time.monotonic() + self.ttl, authenticated)

    def clear(self) -> None:
        """Forget every key (a rotation in this process: the old key must stop at once)."""
        with self._lock:
            self._entries.clear()


def bearer_key(authorization: str | None) -> str | None:
    """The key of a ``Bearer`` Authorization header value, or None without one."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


# One statement for a request's key and its tenant, built once: the key by its HMAC, or by the
# plain sha256 of a row from before migration 0007.
KEY_AND_TENANT = (
    select(ApiKey, Tenant)
    .join(Tenant, Tenant.id == ApiKey.tenant_id)
    .where(
        or_(
            (ApiKey.key_hash == bindparam("digest")) & (ApiKey.hash_scheme == HMAC_SCHEME),
            (ApiKey.key_hash == bindparam("legacy")) & (ApiKey.hash_scheme == LEGACY_SCHEME),
        ),
        ApiKey.revoked_at.is_(None),
    )
)


def authenticate(
    *,
    session: Session,
    key: str | None,
    secret: bytes,
    release: bool = True,
    cache: KeyCache | None = None,
) -> Authenticated:
    """The tenant owning an unrevoked ``key``; 401 otherwise (the same answer for a missing,
    unknown or revoked key). Commits when it writes: an old sha256 row is upgraded to the
    HMAC, and ``last_used_at`` is refreshed at most once a minute. Otherwise ``release`` ends
    the read transaction (giving the connection back to the pool); without it the route's
    statements run on the same connection (one checkout for a status poll).

    The row is found by its digest (an index lookup on a keyed hash, which tells an attacker
    nothing about near misses) and then compared again with ``hmac.compare_digest``. With a
    ``cache`` (:class:`KeyCache`) the key found is kept there; the status poll looks there
    first (``api.deps.authenticate_request``).
    """
    if key is None:
        raise NotAuthenticatedError("missing API key: send 'Authorization: Bearer <key>'")
    digest, legacy = key_digest(secret, key), legacy_digest(key)
    found = session.execute(KEY_AND_TENANT, {"digest": digest, "legacy": legacy}).first()
    row, tenant = found if found is not None else (None, None)
    expected = digest if row is None or row.hash_scheme == HMAC_SCHEME else legacy
    if row is None or tenant is None or not hmac.compare_digest(row.key_hash, expected):
        session.rollback()
        raise NotAuthenticatedError("invalid or revoked API key")
    now = utcnow()
    last_used = row.last_used_at
    if last_used is not None and last_used.tzinfo is None:  # SQLite drops the zone; UTC
        last_used = last_used.replace(tzinfo=UTC)
    wrote = True
    if row.hash_scheme == LEGACY_SCHEME:
        row.key_hash, row.hash_scheme, row.last_used_at = digest, HMAC_SCHEME, now
    elif last_used is None or last_used < now - LAST_USED_RESOLUTION:
        session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == row.id,
                or_(
                    ApiKey.last_used_at.is_(None),
                    ApiKey.last_used_at < now - LAST_USED_RESOLUTION,
                ),
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
    else:
        wrote = False
    if wrote or release:
        # Ends the transaction: the connection goes back to the pool until the route's own
        # first statement, so a request that then waits (for a body upload) holds none
        # meanwhile. A commit, not a rollback: a rollback would expire the tenant just read.
        session.commit()
    authenticated = Authenticated(tenant=tenant, key_id=row.id)
    if cache is not None:
        cache.put(digest, authenticated)
    return authenticated


def rotate_key(
    *, session: Session, tenant: Tenant, current_key_id: uuid.UUID, secret: bytes
) -> NewKey:
    """A new key for ``tenant``; the key the request came with is revoked in the same commit
    (at once: no grace period, so a leaked key is dead when the rotation answers)."""
    revoked = session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == current_key_id,
            ApiKey.tenant_id == tenant.id,
            ApiKey.revoked_at.is_(None),
        )
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if not rows_matched(revoked):
        # Revoked by a concurrent rotation or by the operator since this request was let in.
        session.rollback()
        raise NotAuthenticatedError("invalid or revoked API key")
    created = create_api_key(session=session, tenant=tenant, secret=secret)
    session.commit()
    return created


def tenant_by_name(*, session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFoundError(f"no tenant named {name!r} (bulwark tenants list)")
    return tenant


def list_keys(*, session: Session, tenant: Tenant) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)
        )
    )


def revoke_keys(*, session: Session, name: str, key_id: uuid.UUID | None = None) -> list[ApiKey]:
    """Revoke the tenant's unrevoked keys (only ``key_id`` when given); the revoked rows.
    A request authenticated after the commit answers 401."""
    tenant = tenant_by_name(session=session, name=name)
    query = select(ApiKey).where(ApiKey.tenant_id == tenant.id, ApiKey.revoked_at.is_(None))
    if key_id is not None:
        if (
            session.scalar(
                select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.tenant_id == tenant.id)
            )
            is None
        ):
            raise NotFoundError(f"tenant {name!r} has no key {key_id} (bulwark tenants keys)")
        query = query.where(ApiKey.id == key_id)
    keys = list(session.scalars(query.with_for_update()))
    now = utcnow()
    for key in keys:
        key.revoked_at = now
    session.commit()
    return keys


def new_key_for(*, session: Session, name: str, settings: Settings | None = None) -> NewKey:
    """One more key for the tenant ``name`` (an operator's way back in after a revocation)."""
    tenant = tenant_by_name(session=session, name=name)
    created = create_api_key(
        session=session, tenant=tenant, secret=load_key_secret(settings or get_settings())
    )
    session.commit()
    return created


def list_tenants(*, session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.created_at)))
