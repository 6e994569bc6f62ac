"""Import boundaries: the API never loads torch; the core never loads the web, queue or DB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from servicekit import ROOT

WEB_QUEUE_DB = ("fastapi", "starlette", "sqlalchemy", "celery", "kombu", "alembic", "uvicorn")


def loaded_after(code: str, data_dir: Path) -> set[str]:
    """Top-level modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    report = "import sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "BULWARK_DATA_DIR": str(data_dir)}
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\n{report}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_api_app_and_its_routes_never_import_torch(tmp_path: Path) -> None:
    modules = loaded_after(
        "import api, api.app, api.deps, api.routes.jobs, api.routes.models, api.services.models\n"
        "import common.specs, common.queue, common.models\n"
        "from fastapi.testclient import TestClient\n"
        "client = TestClient(api.app.create_app())\n"
        "assert client.get('/healthz').status_code == 200\n"
        "assert client.get('/openapi.json').status_code == 200",
        tmp_path,
    )
    assert "fastapi" in modules  # the probe really built the app
    assert "torch" not in modules
    assert "numpy" not in modules


def test_serve_and_tenant_commands_never_import_torch(tmp_path: Path) -> None:
    modules = loaded_after(
        "import bulwark.commands.serve, bulwark.commands.tenants, bulwark.commands.db\n"
        "from bulwark.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass",
        tmp_path,
    )
    assert "torch" not in modules


def test_core_imports_no_web_queue_or_database(tmp_path: Path) -> None:
    import importlib.util

    core_modules = [
        "core.config", "core.progress", "core.models", "core.data", "core.checkpoint",
        "core.train", "core.losses", "core.attacks", "core.audit",
    ]  # fmt: skip
    present = [m for m in core_modules if importlib.util.find_spec(m) is not None]
    modules = loaded_after("\n".join(f"import {m}" for m in present), tmp_path)
    assert "torch" in modules and "core" in modules
    assert not modules & set(WEB_QUEUE_DB), modules & set(WEB_QUEUE_DB)
