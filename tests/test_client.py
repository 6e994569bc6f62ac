"""``bulwark.client``: torch-free, retries with one Idempotency-Key, problem details as
exceptions (unit tests on an ``httpx.MockTransport``), and the hub flow against the embedded
service (``bulwark serve`` on 127.0.0.1 with SQLite, a filesystem broker and a real worker):
pre-train, download the weights (sha256-checked), upload them as a model, upload a dataset,
audit, read the verdict and report, fetch the card. A client generated from ``/openapi.json``
by openapi-python-client runs a pre-training job too.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bulwark.client import (
    BulwarkClient,
    BulwarkError,
    ChecksumMismatch,
    Conflict,
    ConnectionFailed,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
    error_from_response,
    retry_after_seconds,
)

ROOT = Path(__file__).resolve().parents[1]
JOB = {
    "id": "6f1c1f51-4a59-4b43-8d43-0a2b8d0d7a11",
    "kind": "pretrain",
    "status": "queued",
    "phase": "queued",
    "progress": 0.0,
    "message": "",
    "error": None,
}
PRETRAIN = {"dataset": "digits", "arch": "convnet", "defense": "none", "recipe": "quick"}


# ------------------------------------------------------------------------------ layering


def test_the_client_and_the_remote_command_load_neither_torch_nor_the_service() -> None:
    """A fresh interpreter imports the client and builds ``bulwark remote``'s parser: no
    torch, numpy, core, API or service stack gets loaded (what a hub's CI installs)."""
    code = "\n".join(
        [
            "import sys, json",
            "import bulwark.client, bulwark.commands.remote",
            "from bulwark.cli import main",
            "try:\n    main(['remote', 'submit', 'audit', '--help'])\nexcept SystemExit:\n    pass",
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))",
        ]
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert {"bulwark", "httpx", "pydantic", "catalog"} <= loaded
    heavy = {"torch", "torchvision", "numpy", "core", "api", "common", "worker"}
    heavy |= {"fastapi", "starlette", "sqlalchemy", "celery", "kombu", "alembic", "psycopg"}
    assert not loaded & heavy, loaded & heavy
    # Nor inside a function: the client's and the command's own imports, at any depth.
    allowed = {"bulwark", "catalog", "httpx", "pydantic", "tqdm"}
    for path in (ROOT / "bulwark" / "client.py", ROOT / "bulwark" / "commands" / "remote.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            elif isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            else:
                continue
            outside = {r for r in roots - allowed if r not in sys.stdlib_module_names}
            assert not outside, f"{path.name}:{node.lineno} imports {outside}"


# --------------------------------------------------------------------- unit: MockTransport


def mock_client(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> Any:
    client = BulwarkClient(
        "http://bulwark.test", "bwk_test", transport=httpx.MockTransport(handler), **options
    )
    client.sleeps = []
    client.sleep = client.sleeps.append  # record the backoff instead of sleeping
    return client


def test_a_503_is_retried_with_the_same_idempotency_key_after_retry_after() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            problem = {"type": "about:blank", "title": "Service Unavailable", "status": 503}
            return httpx.Response(503, json=problem, headers={"Retry-After": "7"})
        return httpx.Response(202, json=JOB)

    client = mock_client(handler)
    job = client.submit_pretrain(PRETRAIN)
    assert job.id == JOB["id"] and job.status == "queued"
    assert len(seen) == 2
    keys = [request.headers["Idempotency-Key"] for request in seen]
    assert keys[0] == keys[1] and uuid.UUID(keys[0]).version == 4
    assert client.sleeps == [7.0]  # the server's Retry-After, not the backoff
    assert seen[0].headers["Authorization"] == "Bearer bwk_test"
    # Only the fields given are sent: the server's defaults apply to the rest.
    assert json.loads(seen[0].content) == PRETRAIN
    # A second logical submit is a new key.
    client.submit_pretrain(PRETRAIN)
    assert seen[2].headers["Idempotency-Key"] != keys[0]


def test_retries_are_bounded_and_end_in_the_mapped_error() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, json={"detail": "the job queue is unreachable"})

    client = mock_client(handler, retries=2, backoff=1.0)
    with pytest.raises(Unavailable) as raised:
        client.submit_audit({"model_id": str(uuid.uuid4()), "dataset": "digits"})
    assert len(calls) == 3 and len(client.sleeps) == 2
    assert 0.5 <= client.sleeps[0] <= 1.0 and 1.0 <= client.sleeps[1] <= 2.0  # backoff, jitter
    assert raised.value.status == 503 and "unreachable" in str(raised.value)


def test_connection_failures_are_retried_then_raised() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    client = mock_client(handler, retries=1)
    with pytest.raises(ConnectionFailed, match="tried 2 times"):
        client.job(JOB["id"])
    assert len(calls) == 2


def test_an_upload_is_not_resent_after_a_dropped_connection(tmp_path: Path) -> None:
    """A read error may come after the server stored the upload: uploads carry no
    Idempotency-Key, so the client does not send them twice (a refused connection is
    resent: it never reached the server)."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        request.read()
        raise httpx.ReadError("connection reset", request=request)

    data = tmp_path / "data.npz"
    data.write_bytes(b"not really")
    client = mock_client(handler, retries=3)
    with pytest.raises(ConnectionFailed):
        client.upload_dataset(data)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (404, {"detail": "no job 1"}, NotFound),
        (401, {"detail": "missing or invalid API key"}, Unauthorized),
        (409, {"detail": "Idempotency-Key was used", "job_id": "x"}, Conflict),
        (413, {"detail": "upload over 1 MB"}, PayloadTooLarge),
        (418, {"detail": "teapot"}, BulwarkError),
    ],
)
def test_fastapi_detail_strings_map_to_exceptions(
    status: int, body: dict[str, Any], kind: type[BulwarkError]
) -> None:
    error = error_from_response(httpx.Response(status, json=body))
    assert type(error) is kind and error.status == status
    assert error.detail == body["detail"] and error.type == "about:blank"
    assert error.extensions == {k: v for k, v in body.items() if k != "detail"}


def test_fastapi_422_lists_and_problem_details_give_the_same_field_errors() -> None:
    fields = [{"loc": ["body", "overrides", "lr"], "msg": "not a number", "type": "value_error"}]
    legacy = error_from_response(httpx.Response(422, json={"detail": fields}))
    problem = error_from_response(
        httpx.Response(
            422,
            json={
                "type": "https://bulwark.dev/problems/invalid-request",
                "title": "Invalid request",
                "status": 422,
                "detail": "1 invalid field",
                "instance": "/v1/jobs/pretrain",
                "errors": fields,
                "trace_id": "abc",
            },
            headers={"Content-Type": "application/problem+json"},
        )
    )
    for error in (legacy, problem):
        assert isinstance(error, InvalidRequest) and error.errors == fields
        assert "overrides.lr: not a number" in error.message or error.detail
    assert problem.title == "Invalid request" and problem.instance == "/v1/jobs/pretrain"
    assert problem.type.endswith("invalid-request") and problem.extensions == {"trace_id": "abc"}
    assert problem.problem()["errors"] == fields
    text = error_from_response(httpx.Response(502, text="<html>bad gateway</html>"))
    assert text.status == 502 and "bad gateway" in (text.detail or "")


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= (retry_after_seconds(later) or 0) <= 31


def test_wait_sends_if_none_match_and_treats_304_as_unchanged() -> None:
    polls: list[httpx.Request] = []
    states = ["queued", "running", "running", "running", "succeeded"]

    def handler(request: httpx.Request) -> httpx.Response:
        polls.append(request)
        status = states[min(len(polls) - 1, len(states) - 1)]
        etag = f'"{status}"'
        if request.headers.get("If-None-Match") == etag:
            return httpx.Response(304, headers={"ETag": etag})
        progress = 1.0 if status == "succeeded" else 0.5
        body = JOB | {"status": status, "phase": status, "progress": progress}
        return httpx.Response(200, json=body, headers={"ETag": etag})

    client = mock_client(handler)
    job = client.wait(JOB["id"], progress=True, poll=0.1, bar_file=io.StringIO())
    assert job.status == "succeeded" and len(polls) == 5
    assert polls[0].headers.get("If-None-Match") is None
    assert polls[2].headers["If-None-Match"] == '"running"'
    # Unchanged polls back off; a change resets the interval.
    assert client.sleeps[2] > client.sleeps[1] > client.sleeps[0] - 1e-9


def test_a_download_whose_sha256_differs_is_refused_and_not_kept(tmp_path: Path) -> None:
    weights = b"\x00" * 1000

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/weights"):
            return httpx.Response(
                200,
                content=weights,
                headers={
                    "X-Content-SHA256": hashlib.sha256(weights).hexdigest(),
                    "Content-Disposition": 'attachment; filename="m.safetensors"',
                },
            )
        return httpx.Response(200, json={"id": "m", "sha256": "f" * 64})

    client = mock_client(handler)
    with pytest.raises(ChecksumMismatch, match="the model says f"):
        client.download_weights("m", tmp_path)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------- the embedded service (e2e)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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


@dataclass
class Service:
    url: str
    key: str
    log: Path
    env: dict[str, str]

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``bulwark serve`` on a free 127.0.0.1 port: SQLite, a filesystem broker and a real
    worker process; one tenant and its key."""
    folder = tmp_path_factory.mktemp("embedded")
    env = embedded_env(folder / "data")

    def bulwark(*args: str) -> str:
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

    bulwark("db", "upgrade")
    found = re.search(
        r"API key \(shown once, store it now\): (\S+)", bulwark("tenants", "create", "hub")
    )
    assert found
    port = free_port()
    log = folder / "serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "bulwark.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "bulwark serve never got ready:\n" + log.read_text()
            time.sleep(0.3)
        yield Service(url=url, key=found.group(1), log=log, env=env)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def digits_npz(path: Path) -> Path:
    """scikit-learn's digits as a tenant's .npz (uint8 greyscale, 8x8), 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    cut = int(0.8 * len(labels))
    np.savez(
        path,
        x_train=images[:cut],
        y_train=labels[:cut],
        x_test=images[cut:],
        y_test=labels[cut:],
        classes=np.array([str(d) for d in range(10)]),
    )
    return path


# The cheapest audit that still has a verdict: one attack, one pair, two targets, no reference.
QUICK_AUDIT = {
    "attacks": ["fc"],
    "pairs": [[0, 1]],
    "pair_sets": [],
    "targets_per_pair": 2,
    "iterations": 3,
    "reference": "none",
    "overrides": {"retrain_epochs": 2, "retrain_milestones": [], "eval_images": 50},
}


@pytest.mark.e2e
def test_the_hub_flow_through_the_client(service: Service, tmp_path: Path) -> None:
    with BulwarkClient(service.url, service.key, timeout=30) as client:
        pretrain = client.submit_pretrain(PRETRAIN | {"epochs": 1, "name": "digits-none"})
        done = client.wait(pretrain.id, progress=False, timeout=240)
        assert done.succeeded, (done.error, service.output())

        weights = client.download_weights(done.result_model_id, tmp_path)
        assert weights.suffix == ".safetensors" and not list(tmp_path.glob("*.part"))
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        assert sha == client.model(done.result_model_id)["sha256"]

        model = client.upload_model(weights, arch="convnet", input_shape="1,8,8", name="hub-digits")
        assert model["name"] == "hub-digits" and model["sha256"] == sha
        dataset = client.upload_dataset(digits_npz(tmp_path / "digits.npz"), name="hub-data")
        assert dataset["status"] == "ready" and dataset["classes"] == list("0123456789")
        assert dataset["id"] in {d["id"] for d in client.datasets()["items"]}
        assert model["id"] in {m["id"] for m in client.models()["items"]}

        audit = client.submit_audit(
            QUICK_AUDIT | {"model_id": model["id"], "dataset_id": dataset["id"]}
        )
        finished = client.wait(audit.id, progress=False, timeout=240)
        assert finished.succeeded, (finished.error, service.output())
        report = client.report(audit.id)
        assert report["job_id"] == audit.id and report["signature"]["algorithm"] == "ed25519"
        assert report["body"]["verdict"]["outcome"] in ("pass", "fail", "inconclusive")
        assert report["body"]["attacks"]["fc"]["instances"] == 2
        card = client.card(model["id"])
        assert card.startswith("---") and "hub-digits" in card


@pytest.mark.e2e
def test_errors_from_the_service_are_mapped(service: Service) -> None:
    with BulwarkClient(service.url, service.key, retries=0) as client:
        with pytest.raises(NotFound) as missing:
            client.job(uuid.uuid4())
        assert missing.value.status == 404 and missing.value.detail
        # Valid for the request model, refused by the service's resolution: a 422 naming it.
        with pytest.raises(InvalidRequest) as invalid:
            client.submit_pretrain(PRETRAIN | {"overrides": {"lr": "fast"}})
        assert any("lr" in [str(p) for p in e["loc"]] for e in invalid.value.errors)
        policy = client.put_policy({"default": {"max_asr": 0.5}})
        assert policy["version"] == 1 and client.policy()["version"] == 1
    with BulwarkClient(service.url, "bwk_wrong", retries=0) as stranger:
        with pytest.raises(Unauthorized) as refused:
            stranger.models()
        assert refused.value.status == 401


# ------------------------------------------------------------------- a generated client


def snake(name: str) -> str:
    """openapi-python-client's module name of an operation id (``createPretrainJob`` and
    ``submit_pretrain_v1_jobs_pretrain_post`` alike)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).replace("-", "_").lower()


@pytest.mark.e2e
def test_a_client_generated_from_the_openapi_document_runs_a_pretraining_job(
    service: Service, tmp_path: Path
) -> None:
    generator = shutil.which("openapi-python-client") or str(
        Path(sys.executable).parent / "openapi-python-client"
    )
    if not Path(generator).is_file():
        pytest.skip("openapi-python-client is not installed (pip install -e '.[dev]')")
    spec = httpx.get(f"{service.url}/openapi.json").json()
    (tmp_path / "openapi.json").write_text(json.dumps(spec))
    result = subprocess.run(
        [
            generator,
            "generate",
            "--path",
            str(tmp_path / "openapi.json"),
            "--output-path",
            str(tmp_path / "generated"),
            "--meta",
            "none",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "securitySchemes" in spec.get("components", {}), (
        "/openapi.json declares no securitySchemes: generated clients send no key"
    )

    operations = {
        (path, method): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }
    create, read = (
        operations[("/v1/jobs/pretrain", "post")],
        operations[("/v1/jobs/{job_id}", "get")],
    )
    sys.path.insert(0, str(tmp_path))
    try:
        package = importlib.import_module("generated")
        tag = snake(create["tags"][0])
        submit = importlib.import_module(f"generated.api.{tag}.{snake(create['operationId'])}")
        get = importlib.import_module(f"generated.api.{tag}.{snake(read['operationId'])}")
        models = importlib.import_module("generated.models")
        client = package.AuthenticatedClient(base_url=service.url, token=service.key)
        body = models.PretrainJobCreate.from_dict(PRETRAIN | {"epochs": 1})
        answer = submit.sync_detailed(client=client, body=body)
        assert answer.status_code == 202, answer.content
        job_id = json.loads(answer.content)["id"]
        deadline = time.monotonic() + 240
        while True:
            job = get.sync_detailed(client=client, job_id=job_id)
            assert job.status_code == 200, job.content
            state = json.loads(job.content)
            if state["status"] in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, "the generated client's job never finished"
            time.sleep(0.5)
        assert state["status"] == "succeeded", (state["error"], service.output())
        # And without the key, the generated client is refused.
        anonymous = package.Client(base_url=service.url)
        assert get.sync_detailed(client=anonymous, job_id=job_id).status_code == 401
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "generated" or m.startswith("generated.")]:
            del sys.modules[name]
