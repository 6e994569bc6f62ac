"""Task names, and the Celery app both the API (to send) and the worker (to run) build from
the settings. The API sends tasks by name (``catalog.JOB_KINDS``), so it never imports the
worker's code."""

from __future__ import annotations

from celery import Celery

from catalog import JOB_KINDS
from common.settings import Settings


def task_name(kind: str) -> str:
    """The Celery task that runs jobs of ``kind`` (a name of ``catalog.JOB_KINDS``)."""
    return JOB_KINDS.get(kind).task


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured broker (Redis), or on a filesystem broker (embedded)."""
    app = Celery("bulwark", broker=settings.resolved_broker_url)
    transport_options: dict[str, object] = {
        "visibility_timeout": settings.visibility_timeout_seconds
    }
    if settings.resolved_broker_url.startswith("filesystem"):
        queue_dir = settings.broker_dir / "queue"
        queue_dir.mkdir(parents=True, exist_ok=True)
        transport_options.update(
            data_folder_in=str(queue_dir), data_folder_out=str(queue_dir), store_processed=False
        )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # job state lives in the database
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A fresh child process per job: the GPU memory of one job is freed before the next,
        # and CUDA is never initialized in the parent that forks.
        worker_max_tasks_per_child=1,
        task_default_queue=settings.queue,
        task_routes={spec.task: {"queue": settings.queue} for spec in JOB_KINDS.entries()},
        task_soft_time_limit=settings.task_soft_time_limit_seconds,
        task_time_limit=settings.task_time_limit_seconds,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Remote control needs a fanout exchange the filesystem broker lacks; cancellation
        # goes through the database anyway.
        worker_enable_remote_control=not settings.resolved_broker_url.startswith("filesystem"),
    )
    return app
