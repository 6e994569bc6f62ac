"""The FastAPI application: ``uvicorn --factory api.app:create_app``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI

from api.deps import SigningKeySource
from api.errors import install_error_handlers
from api.limits import BodyLimitMiddleware
from api.openapi import TAGS, install_openapi
from api.ratelimit import Limiter
from api.routes import (
    datasets,
    health,
    jobs,
    keys,
    models,
    policies,
    report_pages,
    signing,
    webhooks,
)
from api.services.jobs import JobBodyCache
from api.services.tenants import KeyCache, load_key_secret
from api.webhook_pump import webhook_lifespan
from common.artifacts import make_artifact_store
from common.db import make_engine, make_session_factory
from common.queue import make_celery
from common.settings import Settings, get_settings


def package_version() -> str:
    """The installed distribution's version (the API imports nothing of the CLI package)."""
    try:
        return version("bulwark")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """While the app serves, the webhook delivery pump runs; after, its pools are closed."""
    async with webhook_lifespan(app):
        yield
    dispose_engines(app)


def dispose_engines(app: FastAPI) -> None:
    """Close the database connections of ``app``'s pools (its lifespan's end does it too)."""
    app.state.engine.dispose()
    app.state.read_engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="Bulwark",
        version=package_version(),
        description="Robust pre-training and clean-label poisoning audits of feature "
        "extractors. Every /v1 route needs `Authorization: Bearer <key>`. Every error answer "
        "is an RFC 9457 problem (`application/problem+json`, the `Problem` schema).",
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    signing_key = SigningKeySource(settings)
    if settings.environment == "production":
        # Fail at startup, not at the first report: production names its key file.
        signing_key.get()
    # Production refuses to start without BULWARK_KEY_SECRET; locally it is made on first use.
    key_secret = load_key_secret(settings)
    # Pool + overflow cover the threadpool's 40 threads: a request never waits for a
    # connection while a thread is free (a waiting one gives up after the pool timeout: 503).
    engine_options: dict[str, Any] = (
        {}
        if settings.database_url is None
        else {
            "pool_size": settings.db_pool_size,
            "max_overflow": settings.db_max_overflow,
            "pool_timeout": settings.db_pool_timeout_seconds,
        }
    )
    engine = make_engine(settings.resolved_database_url, **engine_options)
    app.state.key_secret = key_secret
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    app.state.job_bodies = JobBodyCache()
    app.state.limiter = Limiter.from_settings(settings)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    # Status polls (api.routes.jobs.get_job) read through an engine of their own: autocommit
    # (no BEGIN and ROLLBACK around a read) and no ping at checkout (a round trip per poll).
    # After a database restart a pooled connection's first poll answers 503 (a client
    # retries) and SQLAlchemy drops every connection the pool made before. The two pools
    # together hold no more connections in use than the threadpool has threads.
    app.state.read_engine = make_engine(
        settings.resolved_database_url,
        pre_ping=False,
        isolation_level="AUTOCOMMIT",
        **engine_options,
    )
    app.state.read_session_factory = make_session_factory(app.state.read_engine)
    app.state.store = make_artifact_store(settings)
    app.state.celery = make_celery(settings)
    app.state.signing_key = signing_key
    install_error_handlers(app)
    # Bodies are capped before authentication and parsing (api/limits.py).
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    install_openapi(app)
    for router in (
        health.router,
        signing.router,
        models.router,
        datasets.router,
        jobs.router,
        keys.router,
        report_pages.router,
        policies.router,
        webhooks.router,
    ):
        app.include_router(router)
    return app
