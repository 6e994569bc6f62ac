"""The embedded default: no DATABASE_URL and no broker. ``bulwark serve`` migrates a SQLite
file, starts a real Celery worker process on a filesystem broker, and runs a job."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from servicekit import ROOT, wait_for


def bulwark(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bulwark.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def embedded_env(data_dir: Path) -> dict[str, str]:
    """This process's environment with no service configured: the embedded default."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BULWARK_") and k not in ("DATABASE_URL", "BROKER_URL")
    }
    env.update(
        BULWARK_DATA_DIR=str(data_dir),
        PYTHONPATH=str(ROOT),
        BULWARK_PROGRESS_INTERVAL_SECONDS="0.5",
    )
    return env


def test_serve_runs_api_and_worker_on_sqlite_and_a_filesystem_broker(tmp_path: Path) -> None:
    env = embedded_env(tmp_path / "data")
    assert "upgrade done" in bulwark(env, "db", "upgrade")
    key = re.search(
        r"API key \(shown once, store it now\): (\S+)", bulwark(env, "tenants", "create", "acme")
    ).group(1)
    assert "acme" in bulwark(env, "tenants", "list")
    assert key not in bulwark(env, "tenants", "list")

    port = free_port()
    log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "bulwark.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    worker_pid = None
    try:
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=60, what="bulwark serve to be ready")
        worker_pid = int(re.search(r"worker process (\d+)", log.read_text()).group(1))
        assert (tmp_path / "data" / "bulwark.sqlite3").is_file()
        job = httpx.post(
            f"{base}/v1/jobs/pretrain",
            headers=headers,
            json={
                "dataset": "digits",
                "arch": "convnet",
                "defense": "none",
                "recipe": "quick",
                "epochs": 1,
            },
        )
        assert job.status_code == 202, job.text

        def finished() -> dict | None:
            body = httpx.get(f"{base}/v1/jobs/{job.json()['id']}", headers=headers).json()
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None

        done = wait_for(finished, timeout=150, interval=0.5, what="the embedded job")
        assert done["status"] == "succeeded", (done["error"], log.read_text()[-3000:])
        weights = httpx.get(f"{base}/v1/models/{done['result_model_id']}/weights", headers=headers)
        assert weights.status_code == 200 and len(weights.content) > 1000
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    # The worker went down with the service: nothing is left running.
    assert worker_pid is not None
    wait_for(lambda: not alive(worker_pid), timeout=20, what="the worker to stop")


def test_demo_runs_pretraining_and_audit_over_http_and_exits_zero(tmp_path: Path) -> None:
    """``bulwark demo --quick`` (the README's first command, on the digits and made smaller):
    a service it starts itself, two pre-trainings and two audits over HTTP, the side-by-side
    table, both verdicts, the HTML report and checkpoint saved, and the service stopped."""
    env = embedded_env(tmp_path / "data")
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bulwark.cli",
            "demo",
            "--quick",
            "--port",
            str(free_port()),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--iterations",
            "3",
            "--retrain-epochs",
            "3",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = result.stdout
    assert text.count("[succeeded] 100.0% done") == 4
    for attack in ("FC", "CP", "BP", "GM", "UNION"):
        assert re.search(
            rf"^\| {attack} \| \d+\.\d% \(\d+/\d+\) \| \[[\d.]+, [\d.]+\] \| \d+\.\d% ",
            text,
            re.MULTILINE,
        ), text
    assert re.search(r"^verdict \(undefended\): (PASS|FAIL|INCONCLUSIVE)\.", text, re.MULTILINE)
    assert re.search(r"^verdict \(at-pcl\): (PASS|FAIL|INCONCLUSIVE)\.", text, re.MULTILINE)
    page = out / "report.html"
    assert page.read_text().startswith("<!DOCTYPE html>") or "<html" in page.read_text()
    assert (out / "digits-convnet-at-pcl.safetensors").stat().st_size > 10_000
    model_url = re.search(r"served at (http://\S+/weights)", text)
    assert model_url, text
    # The service went down with the demo: its port answers nothing any more.
    with pytest.raises(httpx.TransportError):
        httpx.get(model_url.group(1).split("/v1/")[0] + "/healthz", timeout=2)
