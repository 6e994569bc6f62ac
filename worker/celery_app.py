"""The worker's Celery app: ``celery -A worker.celery_app worker -Q gpu``.

Besides consuming, every worker's main process keeps jobs from getting stuck: it re-sends the
orphaned jobs when it starts, sweeps them periodically (``worker.jobs.Sweeper``), and on a warm
shutdown (SIGTERM) passes the signal on to its pool children, whose running job is then given
back to the queue at its next progress step (``worker.tasks.run_job``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING

from celery.signals import worker_ready, worker_shutting_down

from common.queue import make_celery
from common.settings import get_settings

if TYPE_CHECKING:
    from worker.jobs import Sweeper

logger = logging.getLogger(__name__)

app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]

_sweepers: list[Sweeper] = []  # this process's Sweeper, once the worker is ready


@worker_ready.connect
def _requeue_orphans(**_: object) -> None:
    """A worker that starts re-sends the jobs no live worker holds (see ``requeue_orphans``),
    then sweeps for them every ``sweep_interval_seconds``."""
    from worker.jobs import Sweeper, requeue_orphans

    settings = get_settings()
    try:
        count = requeue_orphans(settings=settings, celery=app)
    except Exception:  # a sweep failure must not stop the worker from consuming
        logger.exception("could not sweep for orphaned jobs")
        count = 0
    if count:
        logger.info("re-sent %d orphaned job(s)", count)
    if not _sweepers:
        _sweepers.append(Sweeper(settings=settings, celery=app).start())


@worker_shutting_down.connect
def _give_back_running_jobs(how: str = "", **_: object) -> None:
    """On a warm shutdown, stop sweeping and ask the pool children to give their jobs back.

    Celery waits for running tasks on a warm shutdown, for days with a long pre-training; and
    where only this process got the SIGTERM (``docker stop``, systemd's main-process kill) the
    children never hear of it. A child running a job turns SIGTERM into "re-queue and return"
    (``worker.jobs.stop_on_sigterm``); an idle child exits, as it would have anyway."""
    from billiard.process import active_children  # type: ignore[import-untyped]

    for sweeper in _sweepers:
        sweeper.stop()
    if how != "Warm":
        return
    for child in active_children():
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                os.kill(child.pid, signal.SIGTERM)
