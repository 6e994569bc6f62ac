"""FastAPI dependencies: settings, database session, artifact store, queue, current tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.services.tenants import authenticate
from common.artifacts import ArtifactStore
from common.models import Tenant
from common.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


def current_tenant(request: Request, session: SessionDep) -> Tenant:
    return authenticate(session=session, authorization=request.headers.get("Authorization"))


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
