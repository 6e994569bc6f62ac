"""Input hardening (issue 11): bodies bounded before anything trusts or parses them, archive
members size-checked before they are inflated, every bad input a 4xx naming the field, and
nothing internal in a job's error."""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from servicekit import problem, problem_errors
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.models import Job, StoredModel, TenantDataset

PRETRAIN = {"dataset": "digits", "arch": "convnet", "defense": "none", "recipe": "quick"}
MiB = 1 << 20


def rows(db, table) -> int:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def stored_files(settings) -> list[Path]:  # type: ignore[no-untyped-def]
    root = settings.resolved_artifact_dir
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def call_asgi(
    app: Any,
    headers: list[tuple[bytes, bytes]],
    *,
    total: int,
    path: str = "/v1/jobs/pretrain",
    content_type: bytes = b"application/json",
    head: bytes = b"",
    chunk: int = 64 * 1024,
) -> tuple[int, dict[str, Any], int]:
    """POST ``head`` then filler up to ``total`` bytes to ``path`` straight through the ASGI
    interface (a test client reads a streamed body whole before the app runs); the status,
    the problem, and how many body bytes the app pulled with ``receive``."""
    pulled = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        size = min(chunk, total - pulled)
        data = (head + b" " * chunk)[pulled : pulled + size] if pulled < len(head) else b""
        data = data or b"\0" * size
        pulled += size
        return {"type": "http.request", "body": data, "more_body": pulled < total}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", content_type), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


def test_a_100_mib_json_body_without_credentials_is_a_413_before_it_is_read(app) -> None:
    total = 100 * MiB
    cap = app.state.settings.max_json_body_bytes
    # Declared: refused from the header alone, not one byte read.
    status, body, pulled = call_asgi(app, [(b"content-length", str(total).encode())], total=total)
    assert status == 413 and body["type"].endswith("/upload-too-large"), body
    assert str(total) in body["detail"] and body["limit_bytes"] == cap
    assert pulled == 0
    # Chunked (no Content-Length): cut as it streams, at the cap plus one chunk.
    status, body, pulled = call_asgi(app, [], total=total)
    assert status == 413 and body["type"].endswith("/upload-too-large"), body
    assert pulled <= cap + 64 * 1024, pulled


def test_a_json_body_under_the_cap_still_reaches_authentication(client) -> None:
    response = client.post("/v1/jobs/pretrain", json=PRETRAIN)
    problem(response, 401)


def test_an_upload_larger_than_its_limit_is_cut_while_it_streams(
    settings, make_tenant, clean_db, clean_redis
) -> None:
    """Without a Content-Length, the upload parser stops at the upload limit; the middleware
    would stop it at the limit plus the form's fields anyway."""
    from api.app import create_app, dispose_engines

    small = settings.model_copy(update={"max_upload_bytes": 4096})
    application = create_app(small)
    tenant = make_tenant("a")
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="m.pt"\r\n\r\n'
    try:
        status, body, pulled = call_asgi(
            application,
            [(b"authorization", f"Bearer {tenant.key}".encode())],
            total=64 * MiB,
            path="/v1/models",
            content_type=b"multipart/form-data; boundary=b",
            head=head,
        )
        assert status == 413 and body["type"].endswith("/upload-too-large"), body
        assert pulled <= 4096 + 2 * 64 * 1024, pulled
        # No credentials: the middleware's cap (limit + form fields) stops it before the 401.
        status, body, pulled = call_asgi(
            application,
            [],
            total=64 * MiB,
            path="/v1/models",
            content_type=b"multipart/form-data; boundary=b",
            head=head,
        )
        assert status in (401, 413), body
        assert pulled <= 4096 + 3 * MiB, pulled
        assert stored_files(small) == [] and rows(clean_db, Job) == 0
    finally:
        dispose_engines(application)


@pytest.mark.parametrize(
    "body",
    [
        # The file part never ends: no closing boundary (was stored with an empty sha256).
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="m.safetensors"\r\n'
        b"\r\n" + b"x" * 5000,
        b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nn\r\n--b\r\n',
        b"this is not multipart at all" * 50,
    ],
    ids=["unterminated-file", "unterminated-form", "garbage"],
)
@pytest.mark.parametrize("route", ["/v1/models", "/v1/datasets"])
def test_a_malformed_multipart_body_is_a_400_and_stores_nothing(
    client, make_tenant, clean_db, settings, body, route
) -> None:
    tenant = make_tenant("a")
    response = client.post(
        route,
        headers={**tenant.headers, "Content-Type": "multipart/form-data; boundary=b"},
        content=body,
    )
    found = problem(response, 400)
    assert found["type"].endswith("/malformed-body"), found
    assert rows(clean_db, StoredModel) == rows(clean_db, TenantDataset) == rows(clean_db, Job) == 0
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        ('{"dataset": "digits", "seed": 1, "overrides": {"lr": NaN}}', ["body", "overrides"]),
        ('{"dataset": "digits", "overrides": {"lr": Infinity}}', ["body", "overrides"]),
        ('{"dataset": "digits", "overrides": {"note": "a\\u0000b"}}', ["body", "overrides"]),
        ('{"dataset": "digits", "seed": 99999999999999999999}', ["body", "seed"]),
        ('{"dataset": "digits", "name": "a\\u0000b"}', ["body", "name"]),
        ('{"dataset": "digits", "name": "a\\u001b[31mred"}', ["body", "name"]),
        (json.dumps({"dataset": "digits", "name": "n" * 201}), ["body", "name"]),
    ],
)
def test_bad_pretrain_numbers_and_names_are_a_422_naming_the_field(
    client, make_tenant, clean_db, raw, loc
) -> None:
    tenant = make_tenant("a")
    response = client.post(
        "/v1/jobs/pretrain",
        headers={**tenant.headers, "Content-Type": "application/json"},
        content=raw.encode(),
    )
    assert loc in [error["loc"] for error in problem_errors(response)], response.text
    assert rows(clean_db, Job) == 0


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        ('{"delta": NaN}', ["body", "delta"]),
        ('{"delta": -Infinity}', ["body", "delta"]),
        ('{"budget": {"deltas": [NaN]}}', ["body", "budget", "deltas", 0]),
        ('{"pairs": [[0, 9999999999999]]}', ["body", "pairs"]),
        ('{"attack_settings": {"bp": {"step": NaN}}}', ["body", "attack_settings"]),
    ],
)
def test_bad_audit_numbers_are_a_422(client, make_tenant, clean_db, raw, loc) -> None:
    tenant = make_tenant("a")
    base = {"dataset": "digits", "model_id": str(uuid.uuid4())}
    body = json.dumps(base)[:-1] + ", " + raw[1:]
    response = client.post(
        "/v1/jobs/audit",
        headers={**tenant.headers, "Content-Type": "application/json"},
        content=body.encode(),
    )
    assert loc in [error["loc"] for error in problem_errors(response)], response.text
    assert rows(clean_db, Job) == 0


@pytest.mark.parametrize(
    "route", ["/v1/jobs", "/v1/models", "/v1/datasets", "/v1/webhooks", "/v1/policy/versions"]
)
@pytest.mark.parametrize("offset", [2**31, 2**63, 2**64 + 5])
def test_an_offset_past_the_database_range_is_a_422(client, make_tenant, route, offset) -> None:
    tenant = make_tenant("a")
    response = client.get(route, params={"offset": offset}, headers=tenant.headers)
    assert ["query", "offset"] in [e["loc"] for e in problem_errors(response)]


def test_a_policy_version_past_the_integer_column_is_a_422(client, make_tenant) -> None:
    tenant = make_tenant("a")
    response = client.get(f"/v1/policy/versions/{2**63}", headers=tenant.headers)
    assert ["path", "version"] in [e["loc"] for e in problem_errors(response)]


TORCH_FORM = {"arch": "convnet", "input_shape": "1,8,8", "mean": "0.5", "std": "0.5"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mean", "nan"),
        ("std", "inf"),
        ("mean", "[NaN]"),
        ("input_shape", "1,8,99999999999999999999"),
        ("name", "a\x00b"),
        ("name", "x" * 201),
    ],
)
def test_bad_upload_form_fields_are_a_422_naming_the_field(
    client, make_tenant, clean_db, settings, field, value
) -> None:
    tenant = make_tenant("a")
    form = {**TORCH_FORM, field: value}
    response = client.post(
        "/v1/models",
        headers=tenant.headers,
        data=form,
        files={"file": ("model.pt", torch_zip(), "application/octet-stream")},
    )
    assert ["body", field] in [e["loc"] for e in problem_errors(response)], response.text
    assert rows(clean_db, Job) == 0 and stored_files(settings) == []


def test_a_dataset_name_with_control_characters_is_a_422(
    client, make_tenant, clean_db, settings
) -> None:
    tenant = make_tenant("a")
    response = client.post(
        "/v1/datasets",
        headers=tenant.headers,
        data={"name": "bad\x07name"},
        files={"file": ("d.npz", b"PK\x03\x04" + b"\0" * 64, "application/octet-stream")},
    )
    assert ["body", "name"] in [e["loc"] for e in problem_errors(response)], response.text
    assert rows(clean_db, TenantDataset) == 0 and stored_files(settings) == []


def torch_zip(record: bytes = b"\0" * 64) -> bytes:
    """A small zip laid out as torch.save writes one (``archive/data.pkl``, a record)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weight": 0}, protocol=2))
        archive.writestr("archive/data/0", record)
        archive.writestr("archive/version", b"3\n")
    return buffer.getvalue()


INFLATED = 3 << 29  # 1.5 GiB


@pytest.fixture(scope="module")
def torch_bomb(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A .pt of about 1.5 MB whose record really inflates to 1.5 GiB (zeros, deflated)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"weight": 0}, protocol=2))
        with zf.open("archive/data/0", "w", force_zip64=True) as record:
            zeros = bytes(MiB)
            for _ in range(INFLATED // MiB):
                record.write(zeros)
    assert path.stat().st_size < 3 * MiB
    return path


@pytest.mark.slow  # seconds of CPU or a subprocess: out of make test-fast
def test_a_torch_file_that_inflates_to_1_5_gib_is_refused_at_the_api(
    client, make_tenant, clean_db, settings, torch_bomb
) -> None:
    tenant = make_tenant("a")
    response = client.post(
        "/v1/models",
        headers=tenant.headers,
        data=TORCH_FORM,
        files={"file": ("bomb.pt", torch_bomb.read_bytes(), "application/octet-stream")},
    )
    assert response.status_code in (413, 422), response.text
    assert "zip bomb" in response.text or response.status_code == 413
    # No import job, so no worker ever calls torch.load on it; nothing kept.
    assert rows(clean_db, Job) == 0 and stored_files(settings) == []


def test_the_worker_refuses_a_torch_bomb_before_torch_load(settings, torch_bomb) -> None:
    from worker.jobs import JobFailedError
    from worker.tasks import _check_torch_zip

    with pytest.raises(JobFailedError, match=r"zip bomb|declare more than"):
        _check_torch_zip(torch_bomb, settings)
    # Under a limit above 1.5 GiB, the ratio alone refuses it.
    roomy = settings.model_copy(update={"max_upload_bytes": 4 << 30})
    with pytest.raises(JobFailedError, match="zip bomb"):
        _check_torch_zip(torch_bomb, roomy)
    # A zip that declares more than the upload limit in all is refused too.
    small = settings.model_copy(update={"max_upload_bytes": 1024})
    big = torch_bomb.parent / "big.pt"
    big.write_bytes(torch_zip(b"\1" * 4096))
    with pytest.raises(JobFailedError, match="declare"):
        _check_torch_zip(big, small)
    broken = torch_bomb.parent / "broken.pt"
    broken.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(JobFailedError, match="not a readable zip"):
        _check_torch_zip(broken, settings)
    _check_torch_zip(big, settings)  # a sane torch zip passes


def test_a_torch_file_whose_zip_cannot_be_read_is_a_422_before_anything_is_kept(
    client, make_tenant, clean_db, settings
) -> None:
    tenant = make_tenant("a")
    response = client.post(
        "/v1/models",
        headers=tenant.headers,
        data=TORCH_FORM,
        files={"file": ("m.pt", b"PK\x03\x04" + b"\0" * 100, "application/octet-stream")},
    )
    assert ["body", "file"] in [e["loc"] for e in problem_errors(response)], response.text
    assert rows(clean_db, Job) == 0 and stored_files(settings) == []


def test_job_errors_hold_no_sql_paths_or_escapes(settings) -> None:
    import sqlalchemy.exc

    from core.data import DatasetError
    from worker.jobs import JobFailedError, failure_message

    sql = sqlalchemy.exc.DataError(
        "INSERT INTO models (id, name) VALUES (%(id)s, %(name)s)",
        {"name": "secret\x00"},
        ValueError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),
    )
    message, internal = failure_message(sql)
    assert internal and "INSERT" not in message and "secret" not in message
    assert message.startswith("internal error (logged)")
    work = settings.resolved_work_dir / str(uuid.uuid4()) / "data.npz"
    message, internal = failure_message(DatasetError(f"\x1b[31mcannot read {work}\x1b[0m\nbad"))
    assert not internal
    assert str(settings.data_dir) not in message and "\x1b" not in message
    assert "\n" not in message and "cannot read" in message and "bad" in message
    message, _ = failure_message(JobFailedError("see POST /v1/datasets; classes 0/1"))
    assert message == "see POST /v1/datasets; classes 0/1"  # API routes and words stay
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = sql
    assert failure_message(wrapped)[0].startswith("internal error (logged)")


def test_a_model_that_cannot_be_stored_leaves_no_weights(settings, clean_db, make_tenant) -> None:
    """A pre-training whose model row is refused (here: a NUL in its name, as a job written
    before names were checked at the API has) fails with no orphan files in the store."""
    from common.artifacts import make_artifact_store
    from common.db import make_session_factory
    from worker.jobs import Resources
    from worker.tasks import _store_model

    tenant = make_tenant("a")
    out_dir = settings.data_dir / "checkpoint"
    out_dir.mkdir(parents=True)
    (out_dir / "model.safetensors").write_bytes(b"weights")
    (out_dir / "manifest.json").write_text("{}")
    resources = Resources(
        settings=settings,
        session_factory=make_session_factory(clean_db),
        store=make_artifact_store(settings),
    )
    job = Job(id=uuid.uuid4(), tenant_id=tenant.id)
    manifest = {
        "arch": "convnet",
        "num_classes": 10,
        "in_channels": 1,
        "feature_dim": 64,
        "weights_sha256": "0" * 64,
    }
    import sqlalchemy.exc

    from common.models import ModelSource

    with pytest.raises(sqlalchemy.exc.SQLAlchemyError):
        _store_model(
            resources, job, out_dir, manifest, name="bad\x00name", source=ModelSource.PRETRAIN
        )
    assert stored_files(settings) == [] and rows(clean_db, StoredModel) == 0


def test_deflate_fixture_is_a_real_bomb(torch_bomb) -> None:
    """The bomb's record is real deflate data, not a forged size: it inflates as declared."""
    with zipfile.ZipFile(torch_bomb) as archive:
        info = archive.getinfo("archive/data/0")
        assert info.file_size == INFLATED and info.compress_size < 3 * MiB
        with archive.open(info) as record:
            head = record.read(MiB)
    assert head == bytes(MiB)  # the first MiB inflates to zeros
