"""``bulwark demo``: the whole service end to end on the embedded default.

Starts ``bulwark serve`` (API + a real Celery worker on SQLite and a filesystem broker),
creates a tenant, submits a short (6-epoch) ``at-pcl`` pre-training of a ConvNet on scikit-learn's
bundled digits over HTTP, then an audit of the hardened model with FC, CP and BP, shows
progress, prints the ASR table and where to download the checkpoint, and stops the service.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(
        name,
        help=help_text,
        description=__doc__,
    )
    # Defaults are written into each help text (%(default)s): argparse's defaults formatter
    # shows none for options without help and doubles those whose help names its own.
    parser.add_argument(
        "--port", type=int, default=8765, help="the demo service's port (default: %(default)s)"
    )
    parser.add_argument(
        "--defense",
        default="at-pcl",
        choices=("none", "pcl", "at", "at-pcl"),
        help="the pre-training's defense (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int, default=6, help="pre-training epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--targets-per-pair",
        type=int,
        default=2,
        help="audit targets per pair (default: %(default)s)",
    )
    parser.add_argument(
        "--iterations", type=int, default=20, help="attack steps (default: %(default)s)"
    )
    parser.add_argument(
        "--retrain-epochs",
        type=int,
        default=20,
        help="head re-training epochs (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds per job (default: %(default)s)"
    )
    parser.set_defaults(run=run)


class DemoError(RuntimeError):
    pass


def run(args: argparse.Namespace) -> int:
    import httpx

    from common.settings import get_settings

    settings = get_settings()
    base = f"http://127.0.0.1:{args.port}"
    if not settings.embedded:
        print("note: DATABASE_URL/BROKER_URL are set; the demo needs a worker on that broker")
    server = subprocess.Popen(
        [sys.executable, "-m", "bulwark.cli", "serve", "--port", str(args.port)],
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            _wait_ready(client, server)
            key = _create_tenant()
            client.headers["Authorization"] = f"Bearer {key}"
            return _run_jobs(client, args, base, key)
    except DemoError as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def _wait_ready(client: Any, server: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DemoError(f"bulwark serve exited with status {server.returncode}")
        try:
            if client.get("/readyz").status_code == 200:
                print(f"service ready at {client.base_url}")
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise DemoError("the service did not become ready within 90 s")


def _create_tenant() -> str:
    from api.services.tenants import create_tenant
    from common.db import make_engine, make_session_factory
    from common.settings import get_settings

    engine = make_engine(get_settings().resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            name = f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
            created = create_tenant(session=session, name=name)
    finally:
        engine.dispose()
    print(f"tenant {name} created (what `bulwark tenants create {name}` does)")
    return created.api_key


def _run_jobs(client: Any, args: argparse.Namespace, base: str, key: str) -> int:
    from core.report import read_report, render_asr_table

    pretrain_spec = {
        "dataset": "digits",
        "arch": "convnet",
        "defense": args.defense,
        "recipe": "quick",
        "epochs": args.epochs,
        "name": f"digits-convnet-{args.defense}",
    }
    print(f"\n1. pre-training: POST /v1/jobs/pretrain {pretrain_spec}")
    pretrain = _follow(client, _submit(client, "/v1/jobs/pretrain", pretrain_spec), args.timeout)
    model_id = pretrain["result_model_id"]

    audit_spec = {
        "model_id": model_id,
        "dataset": "digits",
        "attacks": ["fc", "cp", "bp"],
        "targets_per_pair": args.targets_per_pair,
        "iterations": args.iterations,
        "overrides": {"retrain_epochs": args.retrain_epochs, "retrain_milestones": []},
    }
    print(f"\n2. audit: POST /v1/jobs/audit {audit_spec}")
    audit = _follow(client, _submit(client, "/v1/jobs/audit", audit_spec), args.timeout)
    report = client.get(audit["report_url"]).json()["body"]

    print(
        f"\nASR of FC, CP and BP against the {args.defense} ConvNet (digits, "
        f"delta {report['config']['delta']:.3f}):\n"
    )
    print(render_asr_table(read_report(report), markdown=True))
    print(f"\nhardened checkpoint: {base}/v1/models/{model_id}/weights")
    print(f"model card:          {base}/v1/models/{model_id}/card")
    print(f"API key of this demo tenant: {key}")
    print(
        f"  curl -H 'Authorization: Bearer {key}' -o model.safetensors "
        f"{base}/v1/models/{model_id}/weights"
    )
    print(f"(the service stops with the demo; `bulwark serve --port {args.port}` serves it again)")
    return 0


def _submit(client: Any, path: str, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=spec)
    if response.status_code != 202:
        raise DemoError(f"{path} answered {response.status_code}: {response.text}")
    return response.json()


def _follow(client: Any, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Poll the job, printing each change of phase and progress, until it finishes."""
    deadline = time.monotonic() + timeout
    shown: tuple[str, str, float] = ("", "", -1.0)
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job['id']}").json()
        status, phase, progress = job["status"], job["phase"], job["progress"]
        # A line per change of status or phase, and per 5% of progress.
        if (status, phase) != shown[:2] or progress >= shown[2] + 0.05:
            eta = f", ETA {job['eta_seconds']:.0f} s" if job["eta_seconds"] else ""
            print(
                f"   [{status}] {100 * progress:5.1f}% {phase}: {job['message']}{eta}", flush=True
            )
            shown = (status, phase, progress)
        if job["status"] == "succeeded":
            return job
        if job["status"] in ("failed", "cancelled"):
            raise DemoError(f"job {job['id']} {job['status']}: {job['error']}")
        time.sleep(1.0)
    raise DemoError(f"job {job['id']} did not finish within {timeout:.0f} s")
