"""``bulwark serve``: the HTTP API, and on the embedded default a worker process beside it."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(
        name,
        help=help_text,
        description="Serve the API. With no DATABASE_URL and no BROKER_URL (the embedded "
        "default) it migrates the SQLite database under BULWARK_DATA_DIR and starts a real "
        "Celery worker process on a filesystem broker beside the API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    parser.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    parser.add_argument(
        "--worker",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start a worker process too (default: only on the embedded default)",
    )
    parser.set_defaults(run=run)


def start_worker() -> subprocess.Popen[bytes]:
    """``bulwark worker`` as a child process in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "bulwark.cli", "worker", "--loglevel=WARNING"],
        start_new_session=True,
    )


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    """Cold shutdown: a running job's lease runs out and the next worker resumes it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGQUIT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _exit_on_signal(signum: int, _frame: object) -> None:
    # uvicorn re-raises the SIGTERM it caught once it has shut down; turning it into
    # SystemExit lets the ``finally`` below stop the worker instead of orphaning it.
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from common import migrate
    from common.db import make_engine
    from common.settings import get_settings

    settings = get_settings()
    if settings.embedded:
        engine = make_engine(settings.resolved_database_url)
        migrate.upgrade(engine)
        engine.dispose()
        print(f"embedded mode: data in {settings.data_dir}", flush=True)
    with_worker = settings.embedded if args.worker is None else args.worker
    signal.signal(signal.SIGTERM, _exit_on_signal)
    worker = start_worker() if with_worker else None
    if worker is not None:
        print(f"worker process {worker.pid} started", flush=True)
    print(f"serving on http://{args.host}:{args.port} (OpenAPI at /docs)", flush=True)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    finally:
        if worker is not None:
            stop_worker(worker)
    return 0
