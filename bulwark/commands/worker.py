"""``bulwark worker``: a Celery worker consuming the GPU queue (one per GPU)."""

from __future__ import annotations

import argparse
import os


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(
        name,
        help=help_text,
        description="Start a Celery worker on BROKER_URL (default: the embedded filesystem "
        "broker). Run one per GPU, each with CUDA_VISIBLE_DEVICES set to its GPU.",
    )
    parser.add_argument(
        "--concurrency", type=int, default=1, help="jobs run at once (default: %(default)s)"
    )
    parser.add_argument(
        "--loglevel", default="INFO", help="Celery's log level (default: %(default)s)"
    )
    parser.add_argument("--hostname", help="the worker's name (default: bulwark-PID@HOST)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from common.settings import get_settings
    from worker.celery_app import app

    settings = get_settings()
    argv = [
        "worker",
        f"--queues={settings.queue}",
        f"--concurrency={args.concurrency}",
        "--pool=prefork",
        f"--loglevel={args.loglevel}",
        "--without-gossip",
        "--without-mingle",
        f"--hostname={args.hostname or f'bulwark-{os.getpid()}@%h'}",
    ]
    app.worker_main(argv)
    return 0
