"""The worker's Celery app: ``celery -A worker.celery_app worker -Q gpu``."""

from __future__ import annotations

import logging

from celery.signals import worker_ready

from common.queue import make_celery
from common.settings import get_settings

logger = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]


@worker_ready.connect
def _requeue_orphans(**_: object) -> None:
    """A worker that starts re-sends the jobs no live worker holds (see ``requeue_orphans``)."""
    from worker.jobs import requeue_orphans

    try:
        count = requeue_orphans(settings=get_settings(), celery=app)
    except Exception:  # a sweep failure must not stop the worker from consuming
        logger.exception("could not sweep for orphaned jobs")
        return
    if count:
        logger.info("re-sent %d orphaned job(s)", count)
