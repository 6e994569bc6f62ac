"""``bulwark demo``: what the product is for, end to end on the embedded service.

Starts ``bulwark serve`` (API + a real Celery worker on SQLite and a filesystem broker),
creates a tenant and, over HTTP, pre-trains two ConvNets on real Fashion-MNIST with the same
recipe and seed: one undefended, one hardened (``at-pcl``). It audits both on the same
instances, over the class pairs the clean model confuses most plus random ones, with FC, CP,
BP and gradient matching and their union (an instance lost to any attack); the hardened
model's audit names the undefended one as its reference. It prints, side by side, each
model's ASR with its 95% interval and their difference, both verdicts under the default
policy, and where the HTML report and the hardened checkpoint were saved, then stops the
service. ``--quick`` runs the same on scikit-learn's bundled 8x8 digits in seconds (too
small to show much: the mechanics only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
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
        "--quick",
        action="store_true",
        help="scikit-learn's 8x8 digits instead of Fashion-MNIST: seconds, mechanics only",
    )
    parser.add_argument(
        "--out",
        default="runs/demo",
        help="where the HTML report and the hardened checkpoint are saved (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int, help="pre-training epochs (default: 4 Fashion-MNIST, 6 --quick)"
    )
    parser.add_argument(
        "--targets-per-pair", type=int, help="audit targets per pair (default: 5; 2 --quick)"
    )
    parser.add_argument("--iterations", type=int, help="attack steps (default: 150; 20 --quick)")
    parser.add_argument(
        "--retrain-epochs", type=int, help="head re-training epochs (default: 40; 20 --quick)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        # An hour: adversarial pre-training on a slow or busy 2-core CPU has taken over 15
        # minutes; the demo shows each job's progress while it waits.
        default=3600,
        help="seconds per job (default: %(default)s)",
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


# (dataset, per-class split, epochs, audit targets per pair, iterations): a few minutes on 2
# cores for Fashion-MNIST; seconds for the digits. 1000 pre-training images per class and 6
# epochs give an undefended ConvNet that BP beats on its closest pairs (tests/
# test_real_data_verdict.py uses the same sizes).
PRESETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {
        "split": {"pretrain": 1000, "retrain": 30, "pool": 30},
        "pretrain": {"pgd_steps": 3},  # adversarial training's PGD: the costly part
        "epochs": 6,
        "targets_per_pair": 10,
        "iterations": 150,
        "retrain_epochs": 40,
    },
    "digits": {
        "split": {"pretrain": 100, "retrain": 10, "pool": 25},
        "pretrain": {},
        "epochs": 6,
        "targets_per_pair": 2,
        "iterations": 20,
        "retrain_epochs": 20,
    },
}


def _run_jobs(client: Any, args: argparse.Namespace, base: str, key: str) -> int:
    from core.report import interval_cell, rate_cell, read_report

    dataset = "digits" if args.quick else "fashion-mnist"
    preset = PRESETS[dataset]
    epochs = args.epochs or preset["epochs"]
    models = {}
    for step, defense in enumerate(("none", args.defense), start=1):
        spec = {
            "dataset": dataset,
            "arch": "convnet",
            "defense": defense,
            "recipe": "quick" if args.quick else "paper",
            "epochs": epochs,
            "seed": 0,
            "name": f"{dataset}-convnet-{defense}",
            "overrides": {"split": preset["split"], **preset["pretrain"]},
        }
        print(f"\n{step}. pre-training ({defense}): POST /v1/jobs/pretrain {spec}")
        done = _follow(client, _submit(client, "/v1/jobs/pretrain", spec), args.timeout)
        models[defense] = done["result_model_id"]

    overrides: dict[str, Any] = {
        "split": preset["split"],
        "retrain_epochs": args.retrain_epochs or preset["retrain_epochs"],
    }
    reports = {}
    base_spec = {
        "dataset": dataset,
        "attacks": ["fc", "cp", "bp", "gm"],
        "targets_per_pair": args.targets_per_pair or preset["targets_per_pair"],
        "iterations": args.iterations or preset["iterations"],
        "overrides": overrides,
    }
    # The undefended model first, on the pairs its clean model confuses most (3) and a random
    # one; then the hardened model on exactly those pairs (so the same instances), with the
    # undefended model as its reference.
    spec = {
        **base_spec,
        "model_id": models["none"],
        "closest_pairs": 3,
        "random_pairs": 1,
        "reference": "none",
    }
    print(f"\n3. audit (none): POST /v1/jobs/audit {spec}")
    audit = _follow(client, _submit(client, "/v1/jobs/audit", spec), args.timeout)
    reports["none"] = (audit, read_report(client.get(audit["report_url"]).json()["body"]))
    pairs = [[c.target_class, c.poison_class] for c in reports["none"][1].pair_choices]
    spec = {
        **base_spec,
        "model_id": models[args.defense],
        "pairs": pairs,
        "reference": models["none"],
    }
    print(f"\n4. audit ({args.defense}): POST /v1/jobs/audit {spec}")
    audit = _follow(client, _submit(client, "/v1/jobs/audit", spec), args.timeout)
    reports[args.defense] = (audit, read_report(client.get(audit["report_url"]).json()["body"]))

    undefended, hardened = reports["none"][1], reports[args.defense][1]
    print(
        f"\nASR on the same {len(hardened.instances)} instances of {dataset} (headline: targets "
        f"the clean model classifies correctly; delta {hardened.config['delta']:.3f}):\n"
    )
    print(f"| attack | undefended | 95% CI | {args.defense} | 95% CI | difference [95% CI] |")
    print("|---|---|---|---|---|---|")
    for name, comparison in hardened.comparison.items():
        print(
            f"| {name.upper()} | {rate_cell(comparison.reference)} | "
            f"{interval_cell(comparison.reference.wilson95)} | {rate_cell(comparison.model)} | "
            f"{interval_cell(comparison.model.wilson95)} | "
            f"{100 * comparison.difference:+.1f} pp {interval_cell(comparison.difference95)} |"
        )
    print()
    for defense, report in (("undefended", undefended), (args.defense, hardened)):
        verdict = report.verdict
        if verdict is not None:
            print(f"verdict ({defense}): {verdict.outcome.upper()}. {verdict.reason}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    audit_id = reports[args.defense][0]["id"]
    page = out / "report.html"
    page.write_bytes(_download(client, f"/v1/jobs/{audit_id}/report.html"))
    weights = out / f"{dataset}-convnet-{args.defense}.safetensors"
    weights.write_bytes(_download(client, f"/v1/models/{models[args.defense]}/weights"))
    print(f"\nHTML report ({args.defense} against the undefended model): {page}")
    print(f"hardened checkpoint: {weights}")
    print(f"  (served at {base}/v1/models/{models[args.defense]}/weights while the demo runs)")
    print(f"API key of this demo tenant: {key}")
    print(f"(the service stops with the demo; `bulwark serve --port {args.port}` serves it again)")
    return 0


def _download(client: Any, path: str) -> bytes:
    response = client.get(path)
    if response.status_code != 200:
        raise DemoError(f"GET {path} answered {response.status_code}: {response.text[:300]}")
    return bytes(response.content)


def _submit(client: Any, path: str, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=spec)
    if response.status_code != 202:
        raise DemoError(f"{path} answered {response.status_code}: {response.text}")
    return response.json()


def _follow(client: Any, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Poll the job, printing each change of phase and progress, until it finishes."""
    try:
        return _poll_until_finished(client, job, timeout)
    except (DemoError, KeyboardInterrupt):
        # The demo's data dir outlives it: a job left running would be resumed, ahead of the
        # next demo's jobs, by the next worker on it. A cancel wins over that resumption (a
        # job that already ended answers 409, which changes nothing).
        with contextlib.suppress(Exception):
            client.post(f"/v1/jobs/{job['id']}/cancel")
        raise


def _poll_until_finished(client: Any, job: dict[str, Any], timeout: float) -> dict[str, Any]:
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
