"""The FastAPI application: ``uvicorn --factory api.app:create_app``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI

from api.deps import SigningKeySource
from api.errors import install_error_handlers
from api.openapi import TAGS, install_openapi
from api.routes import (
    datasets,
    health,
    jobs,
    models,
    policies,
    report_pages,
    signing,
    webhooks,
)
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="Bulwark",
        version=package_version(),
        description="Robust pre-training and clean-label poisoning audits of feature "
        "extractors. Every /v1 route needs `Authorization: Bearer <key>`. Every error answer "
        "is an RFC 9457 problem (`application/problem+json`, the `Problem` schema).",
        openapi_tags=TAGS,
        lifespan=webhook_lifespan,  # the webhook delivery pump runs while the app serves
    )
    signing_key = SigningKeySource(settings)
    if settings.environment == "production":
        # Fail at startup, not at the first report: production names its key file.
        signing_key.get()
    engine = make_engine(settings.resolved_database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.store = make_artifact_store(settings)
    app.state.celery = make_celery(settings)
    app.state.signing_key = signing_key
    install_error_handlers(app)
    install_openapi(app)
    for router in (
        health.router,
        signing.router,
        models.router,
        datasets.router,
        jobs.router,
        report_pages.router,
        policies.router,
        webhooks.router,
    ):
        app.include_router(router)
    return app
