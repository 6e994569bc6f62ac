"""Layer contracts: which package may load which (docs/architecture.md, STYLE.md).

- ``catalog`` is torch-free and service-free: every layer reads it.
- ``api`` and ``common`` never load torch (nor numpy): the API image ships without them.
- ``core`` loads no web framework, queue or database.
- Only ``bulwark`` (the CLI) imports ``bulwark``.

Two checks per rule where they differ: a fresh interpreter imports every module of a package
and reports ``sys.modules`` (what really gets loaded, through any chain of imports), and an
``ast`` scan of the package's files finds the imports that run only inside a function.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB_QUEUE_DB = frozenset(
    {"fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "celery", "kombu"}
)
TORCH = frozenset({"torch", "torchvision", "numpy"})
# The core's torch-free modules (docs/architecture.md): the API may import these.
TORCH_FREE_CORE = (
    "core",
    "core.config",
    "core.report",
    "core.errors",
    "core.progress",
    "core.archives",
    "core.verdict",
    "core.report_page",
    "core.badge",
)


def modules_of(package: str) -> list[str]:
    """Every module of ``package`` (a folder of the repository), as dotted names."""
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_roots(package: str) -> Iterator[tuple[str, str]]:
    """(file, top-level module) of every absolute import in ``package``'s files, at any depth."""
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                yield f"{path.relative_to(ROOT)}:{node.lineno}", name.split(".")[0]


# What each probe runs in a fresh interpreter; it then reports the top-level loaded modules.
PROBES = {
    "api": "\n".join(
        [f"import {m}" for m in modules_of("api")]
        + ["from api.app import create_app", "assert create_app().openapi()['paths']"]
    ),
    "common": "\n".join(f"import {m}" for m in modules_of("common")),
    "catalog": "\n".join(f"import {m}" for m in modules_of("catalog")),
    "core": "\n".join(f"import {m}" for m in modules_of("core")),
    "core-torch-free": "\n".join(f"import {m}" for m in TORCH_FREE_CORE),
    "cli-serve": "\n".join(
        [
            "import bulwark.commands.serve, bulwark.commands.tenants, bulwark.commands.db",
            "import bulwark.commands.verify, common.signing",
            "from bulwark.cli import main",
            "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass",
        ]
    ),
}
REPORT = "import json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Probe name -> top-level modules in ``sys.modules`` after it ran (all probes at once)."""
    data_dir = tmp_path_factory.mktemp("layers")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "BULWARK_DATA_DIR": str(data_dir)}
    running = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"{code}\n{REPORT}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, code in PROBES.items()
    }
    found = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"probe {name} failed:\n{err}"
        found[name] = set(json.loads(out.strip().splitlines()[-1]))
    return found


@pytest.mark.slow  # seconds of CPU or a subprocess: out of make test-fast
def test_api_never_loads_torch(loaded: dict[str, set[str]]) -> None:
    assert "fastapi" in loaded["api"]  # the probe really built the app
    assert not loaded["api"] & TORCH, loaded["api"] & TORCH
    lazy = [(where, name) for where, name in imported_roots("api") if name in TORCH]
    assert not lazy, lazy


def test_common_never_loads_torch(loaded: dict[str, set[str]]) -> None:
    assert "common" in loaded["common"]
    assert not loaded["common"] & TORCH, loaded["common"] & TORCH
    lazy = [(where, name) for where, name in imported_roots("common") if name in TORCH]
    assert not lazy, lazy


def test_catalog_loads_neither_torch_nor_the_service(loaded: dict[str, set[str]]) -> None:
    assert "pydantic" in loaded["catalog"]
    heavy = loaded["catalog"] & (TORCH | WEB_QUEUE_DB)
    assert not heavy, heavy
    outside = {"api", "common", "core", "worker", "bulwark"} | TORCH | WEB_QUEUE_DB
    wrong = [(where, name) for where, name in imported_roots("catalog") if name in outside]
    assert not wrong, wrong


def test_core_loads_no_web_queue_or_database(loaded: dict[str, set[str]]) -> None:
    assert "torch" in loaded["core"] and "core" in loaded["core"]
    assert not loaded["core"] & WEB_QUEUE_DB, loaded["core"] & WEB_QUEUE_DB
    service = {"api", "common", "worker", "bulwark", "migrations"} | WEB_QUEUE_DB
    wrong = [(where, name) for where, name in imported_roots("core") if name in service]
    assert not wrong, wrong


def test_the_torch_free_core_modules_load_no_torch(loaded: dict[str, set[str]]) -> None:
    assert "core" in loaded["core-torch-free"]
    assert not loaded["core-torch-free"] & TORCH, loaded["core-torch-free"] & TORCH
    paths = [ROOT / (m.replace(".", "/") + ".py") for m in TORCH_FREE_CORE if m != "core"]
    lazy = [
        (where, name)
        for where, name in imported_roots("core")
        if name in TORCH and ROOT / where.split(":")[0] in paths
    ]
    assert not lazy, lazy


def test_serve_and_tenant_commands_never_load_torch(loaded: dict[str, set[str]]) -> None:
    assert "bulwark" in loaded["cli-serve"]
    assert "torch" not in loaded["cli-serve"]


@pytest.mark.parametrize(
    "package", ["catalog", "core", "common", "api", "worker", "migrations", "bench"]
)
def test_only_the_cli_imports_the_cli_package(package: str) -> None:
    wrong = [where for where, name in imported_roots(package) if name == "bulwark"]
    assert not wrong, f"{package} imports bulwark at {wrong}"


def test_no_layer_loads_the_cli_package(loaded: dict[str, set[str]]) -> None:
    # The API takes its version from the installed distribution's metadata, not from bulwark.
    assert not [
        probe for probe in ("api", "common", "catalog", "core") if "bulwark" in loaded[probe]
    ]
