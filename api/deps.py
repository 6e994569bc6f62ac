"""FastAPI dependencies: settings, database session, artifact store, queue, current tenant."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import NotAuthenticatedError
from api.ratelimit import Limiter
from api.services.tenants import authenticate, bearer_key, key_digest
from common.artifacts import ArtifactStore
from common.models import Tenant
from common.settings import Settings
from common.signing import load_or_create_private_key


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


class SigningKeySource:
    """The deployment's signing key, read (or, embedded, created) once, on first use."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._key: Ed25519PrivateKey | None = None
        self._lock = threading.Lock()

    def get(self) -> Ed25519PrivateKey:
        with self._lock:
            if self._key is None:
                self._key = load_or_create_private_key(self._settings)
            return self._key


def get_signing_key(request: Request) -> Ed25519PrivateKey:
    source: SigningKeySource = request.app.state.signing_key
    return source.get()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
SigningKeyDep = Annotated[Ed25519PrivateKey, Depends(get_signing_key)]


# Declares the bearer scheme in OpenAPI (every /v1 route's security requirement, the
# Authorize button of /docs); the key itself is checked by ``authenticate``, which answers
# every missing or bad key with the same 401 problem.
bearer_scheme = HTTPBearer(
    scheme_name="bearerAuth",
    bearerFormat="API key",
    description="a tenant's API key (`bulwark tenants create NAME` prints one)",
    auto_error=False,
)


# The scheme as a dependency: async and cheap (no thread hop); it only documents the scheme.
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]


READ_METHODS = frozenset({"GET", "HEAD"})


def authenticate_request(request: Request, session: Session, *, cached: bool = False) -> Tenant:
    """The key's tenant, after the abuse limits (``api.ratelimit``): a client IP throttled for
    wrong keys gets 429 before its key is looked at, a wrong key counts against its IP, and
    the tenant's request rate is checked last. ``request.state.api_key_id`` names the key.

    Blocking (Redis and the database): a dependency runs it in the thread pool, and the
    status poll runs it with its own read in one hop there (``api.routes.jobs.get_job``),
    ``cached``: through the process's :class:`~api.services.tenants.KeyCache`."""
    limiter: Limiter = request.app.state.limiter
    client = request.client.host if request.client else "unknown"
    key = bearer_key(request.headers.get("Authorization"))
    if cached and key is not None:
        known = request.app.state.key_cache.get(key_digest(request.app.state.key_secret, key))
        if known is not None:
            # No lookup to protect: the client's throttle and the tenant's rate are checked
            # together, in one Redis round trip.
            limiter.admit(client, known.tenant)
            request.state.api_key_id = known.key_id
            return known.tenant
    limiter.check_client(client)
    try:
        authenticated = authenticate(
            session=session,
            key=key,
            secret=request.app.state.key_secret,
            # A request with a body may be slow to send it: hold no connection meanwhile.
            # A read (a status poll above all) keeps its connection for its own statement.
            release=request.method not in READ_METHODS,
            cache=request.app.state.key_cache if cached else None,
        )
    except NotAuthenticatedError:
        if key is not None:  # a guess; a missing key is a client that forgot
            limiter.record_failure(client)
        raise
    limiter.check_rate(authenticated.tenant)
    request.state.api_key_id = authenticated.key_id
    return authenticated.tenant


def current_tenant(
    request: Request,
    session: SessionDep,
    _: BearerDep,
) -> Tenant:
    """The request's tenant (:func:`authenticate_request`), as a dependency."""
    return authenticate_request(request, session)


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
