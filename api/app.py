"""The FastAPI application: ``uvicorn --factory api.app:create_app``."""

from __future__ import annotations

from fastapi import FastAPI

import bulwark
from api.errors import install_error_handlers
from api.routes import health, jobs, models
from common.artifacts import LocalArtifactStore
from common.db import make_engine, make_session_factory
from common.queue import make_celery
from common.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="Bulwark",
        version=bulwark.__version__,
        description="Robust pre-training and clean-label poisoning audits of feature "
        "extractors. Every /v1 route needs `Authorization: Bearer <key>`.",
    )
    engine = make_engine(settings.resolved_database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.store = LocalArtifactStore(settings.resolved_artifact_dir)
    app.state.celery = make_celery(settings)
    install_error_handlers(app)
    for router in (health.router, models.router, jobs.router):
        app.include_router(router)
    return app
