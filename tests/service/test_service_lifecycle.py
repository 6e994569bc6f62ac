"""Lifecycle of models and jobs over HTTP: DELETE (artifacts removed, rows tombstoned,
idempotent, tenant-isolated), Location on every 201/202, ETag and If-None-Match on a job,
list filters and sorting."""

from __future__ import annotations

import io
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from servicekit import add_model_row, problem
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from catalog.policy import DEFAULT_POLICY
from common.artifacts import make_artifact_store, model_manifest_key, model_weights_key
from common.models import Job, JobStatus, Report, StoredModel

PRETRAIN = {"dataset": "digits", "arch": "convnet", "defense": "none", "recipe": "quick"}


@pytest.fixture(scope="module")
def convnet_bytes() -> bytes:
    """A real ConvNet state dict in safetensors (made with torch, as a model hub would)."""
    from safetensors.torch import save

    from core.models import build_model

    model = build_model("convnet", in_channels=1, num_classes=10, mean=[0.3], std=[0.4])
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def upload_model(client: Any, tenant: Any, data: bytes, filename: str, **form: str) -> Any:
    return client.post(
        "/v1/models",
        headers=tenant.headers,
        data={"input_shape": "1,8,8", **form},
        files={"file": (filename, data, "application/octet-stream")},
    )


def stored_files(settings: Any) -> set[str]:
    root: Path = settings.resolved_artifact_dir
    if not root.exists():
        return set()
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def finish(db: Engine, job_id: str, status: JobStatus = JobStatus.SUCCEEDED) -> None:
    with Session(db) as session:
        session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(status=status, finished_at=datetime.now(UTC))
        )
        session.commit()


def add_audit(
    db: Engine, tenant_id: uuid.UUID, model_id: uuid.UUID, minutes: int, **body: Any
) -> uuid.UUID:
    """A succeeded audit job and its report row (the body reduced to what is read)."""
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)
    with Session(db) as session:
        job = Job(
            tenant_id=tenant_id,
            kind="audit",
            status=JobStatus.SUCCEEDED,
            spec={},
            model_id=model_id,
            created_at=when,
            updated_at=when,
            finished_at=when,
        )
        session.add(job)
        session.flush()
        session.add(
            Report(
                tenant_id=tenant_id, job_id=job.id, model_id=model_id, body=body, created_at=when
            )
        )
        session.commit()
        return job.id


def verdict(outcome: str) -> dict[str, Any]:
    return {"outcome": outcome, "reason": "r", "checks": [], "confidence": 0.95}


def test_a_model_is_deleted_once_by_its_tenant_only(
    client, make_tenant, convnet_bytes, settings, clean_db
) -> None:
    owner, other = make_tenant("owner"), make_tenant("other")
    created = upload_model(client, owner, convnet_bytes, "m.safetensors", arch="convnet")
    assert created.status_code == 201, created.text
    model_id = created.json()["id"]
    assert created.headers["Location"] == f"/v1/models/{model_id}"
    assert client.get(created.headers["Location"], headers=owner.headers).status_code == 200
    assert stored_files(settings) == {model_weights_key(model_id)}

    # Another tenant's id is a 404 and removes nothing.
    problem(client.delete(f"/v1/models/{model_id}", headers=other.headers), 404)
    assert stored_files(settings) == {model_weights_key(model_id)}
    # A queued audit of it holds it (409 naming the job); once finished it can go.
    audit = client.post(
        "/v1/jobs/audit", headers=owner.headers, json={"model_id": model_id, "dataset": "digits"}
    ).json()
    held = problem(client.delete(f"/v1/models/{model_id}", headers=owner.headers), 409)
    assert held["job_ids"] == [audit["id"]] and stored_files(settings)
    finish(clean_db, audit["id"], JobStatus.CANCELLED)

    assert client.delete(f"/v1/models/{model_id}", headers=owner.headers).status_code == 204
    assert stored_files(settings) == set()
    for path in ("", "/weights", "/card", "/badge.svg"):
        problem(client.get(f"/v1/models/{model_id}{path}", headers=owner.headers), 404)
    assert client.get("/v1/models", headers=owner.headers).json()["total"] == 0
    # Idempotent; the row stays as a tombstone, so a finished job still names the model.
    assert client.delete(f"/v1/models/{model_id}", headers=owner.headers).status_code == 204
    with Session(clean_db) as session:
        row = session.get(StoredModel, uuid.UUID(model_id))
        assert row is not None and row.deleted_at is not None
    assert client.get(f"/v1/jobs/{audit['id']}", headers=owner.headers).json()["model_id"] == (
        model_id
    )
    # A deleted model cannot be audited, and is not offered as one to audit.
    refused = client.post(
        "/v1/jobs/audit", headers=owner.headers, json={"model_id": model_id, "dataset": "digits"}
    )
    assert problem(refused, 404)["valid_model_ids"] == []


def test_a_deleted_exported_model_loses_its_program_and_manifest(
    client, make_tenant, settings, clean_db
) -> None:
    """Whatever files a model has (a .pt2 program and its manifest here) are removed."""
    tenant = make_tenant("a")
    model_id = add_model_row(
        clean_db, tenant.id, arch="exported", weights_key="placeholder"
    )  # the key is fixed below, once the id is known
    store = make_artifact_store(settings)
    program, manifest = f"models/{model_id}/model.pt2", model_manifest_key(model_id)
    with Session(clean_db) as session:
        session.execute(
            update(StoredModel).where(StoredModel.id == model_id).values(weights_key=program)
        )
        session.commit()
    source = settings.data_dir / "file"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"x")
    for key in (program, manifest):
        store.put_file(key, source)
    assert client.delete(f"/v1/models/{model_id}", headers=tenant.headers).status_code == 204
    assert not store.exists(program) and not store.exists(manifest)


def test_a_finished_job_is_deleted_with_its_artifacts(
    client, make_tenant, settings, clean_db
) -> None:
    owner, other = make_tenant("owner"), make_tenant("other")
    model_id = add_model_row(clean_db, owner.id)
    job = client.post("/v1/jobs/pretrain", headers=owner.headers, json=PRETRAIN)
    assert job.status_code == 202 and job.headers["Location"] == f"/v1/jobs/{job.json()['id']}"
    job_id = job.json()["id"]
    queued = problem(client.delete(f"/v1/jobs/{job_id}", headers=owner.headers), 409)
    assert queued["job_status"] == "queued" and "cancel" in queued["detail"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=owner.headers).status_code == 200
    assert client.delete(f"/v1/jobs/{job_id}", headers=owner.headers).status_code == 204
    problem(client.get(f"/v1/jobs/{job_id}", headers=owner.headers), 404)

    # An audit with a report: its own artifacts go, a shared reference's files stay.
    audit_id = add_audit(
        clean_db,
        owner.id,
        model_id,
        minutes=0,
        verdict=verdict("fail"),
        stored_artifacts=[],
    )
    own = f"reports/{audit_id}/poisons/fc.png"
    shared = "references/someone/abc/model.safetensors"
    with Session(clean_db) as session:
        report = session.scalars(select(Report).where(Report.job_id == audit_id)).one()
        report.body = {**report.body, "stored_artifacts": [own, shared]}
        session.commit()
    store = make_artifact_store(settings)
    source = settings.data_dir / "file"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"x")
    for key in (own, shared):
        store.put_file(key, source)
    badge = client.get(f"/v1/models/{model_id}/badge.svg", headers=owner.headers).text
    assert "fail" in badge

    problem(client.delete(f"/v1/jobs/{audit_id}", headers=other.headers), 404)
    assert store.exists(own)
    assert client.delete(f"/v1/jobs/{audit_id}", headers=owner.headers).status_code == 204
    assert not store.exists(own) and store.exists(shared)
    for path in ("", "/report", "/report.html", "/pictures/fc.png", "/cancel"):
        method = "POST" if path == "/cancel" else "GET"
        response = client.request(method, f"/v1/jobs/{audit_id}{path}", headers=owner.headers)
        problem(response, 404)
    assert client.delete(f"/v1/jobs/{audit_id}", headers=owner.headers).status_code == 204
    assert client.get("/v1/jobs", headers=owner.headers).json()["total"] == 0
    # The deleted audit no longer decides the model's badge.
    badge = client.get(f"/v1/models/{model_id}/badge.svg", headers=owner.headers).text
    assert "not audited" in badge


def test_every_201_and_202_names_its_resource_in_location(
    client, make_tenant, convnet_bytes, clean_db
) -> None:
    tenant = make_tenant("a")
    model_id = str(add_model_row(clean_db, tenant.id))
    audit = client.post(
        "/v1/jobs/audit", headers=tenant.headers, json={"model_id": model_id, "dataset": "digits"}
    )
    assert audit.status_code == 202 and audit.headers["Location"] == (
        f"/v1/jobs/{audit.json()['id']}"
    )
    # A torch.save zip answers 202 with the import job that reads it.
    torch_zip = io.BytesIO()
    with zipfile.ZipFile(torch_zip, "w") as archive:
        archive.writestr("model/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("model/version", b"3\n")
    imported = upload_model(client, tenant, torch_zip.getvalue(), "model.pt", arch="convnet")
    assert imported.status_code == 202, imported.text
    assert imported.headers["Location"] == f"/v1/jobs/{imported.json()['id']}"
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as archive:
        for name in ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy"):
            archive.writestr(name, b"")
    dataset = client.post(
        "/v1/datasets",
        headers=tenant.headers,
        files={"file": ("d.npz", npz.getvalue(), "application/octet-stream")},
    )
    assert dataset.status_code == 202, dataset.text
    assert dataset.headers["Location"] == f"/v1/datasets/{dataset.json()['id']}"
    policy = client.put(
        "/v1/policy", headers=tenant.headers, json=DEFAULT_POLICY.model_dump(mode="json")
    )
    assert policy.status_code == 201 and policy.headers["Location"] == "/v1/policy/versions/1"


def test_a_job_read_carries_an_etag_and_if_none_match_is_304(client, make_tenant) -> None:
    tenant = make_tenant("a")
    job_id = client.post("/v1/jobs/pretrain", headers=tenant.headers, json=PRETRAIN).json()["id"]
    first = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers)
    etag = first.headers["ETag"]
    assert first.status_code == 200 and etag.startswith('"') and etag.endswith('"')
    assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).headers["ETag"] == etag
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        unchanged = client.get(
            f"/v1/jobs/{job_id}", headers={**tenant.headers, "If-None-Match": header}
        )
        assert unchanged.status_code == 304 and unchanged.content == b"", header
        assert unchanged.headers["ETag"] == etag
    stale = client.get(f"/v1/jobs/{job_id}", headers={**tenant.headers, "If-None-Match": '"x"'})
    assert stale.status_code == 200 and stale.json()["id"] == job_id
    client.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers)
    changed = client.get(f"/v1/jobs/{job_id}", headers={**tenant.headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["status"] == "cancelled"
    assert changed.headers["ETag"] != etag
    # Another tenant's job is a 404 whatever the ETag.
    other = make_tenant("b")
    response = client.get(f"/v1/jobs/{job_id}", headers={**other.headers, "If-None-Match": "*"})
    problem(response, 404)


def test_a_poll_sees_every_write_to_its_job(client, make_tenant, clean_db) -> None:
    """The poll serves an unchanged job's body from JobBodyCache: a write by any path (the
    ORM, a Core update as the worker's progress and sweep make) must show at the next poll."""
    tenant = make_tenant("a")
    job_id = client.post("/v1/jobs/pretrain", headers=tenant.headers, json=PRETRAIN).json()["id"]

    def poll() -> dict[str, Any]:
        response = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers)
        assert response.status_code == 200, response.text
        return response.json()

    first = poll()
    assert poll() == first  # from the cache
    with Session(clean_db) as session:
        session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(status=JobStatus.RUNNING, phase="epoch 1/2", progress=0.25)
        )
        session.commit()
    second = poll()
    assert (second["status"], second["phase"], second["progress"]) == ("running", "epoch 1/2", 0.25)
    assert second["updated_at"] != first["updated_at"]
    with Session(clean_db) as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.message = "half way"
        session.commit()
    assert poll()["message"] == "half way"
    # Deleted after a cached read: 404, not the cached body.
    with Session(clean_db) as session:
        session.execute(
            update(Job).where(Job.id == uuid.UUID(job_id)).values(deleted_at=datetime.now(UTC))
        )
        session.commit()
    problem(client.get(f"/v1/jobs/{job_id}", headers=tenant.headers), 404)


def test_lists_filter_and_sort(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("a")
    base = datetime(2026, 1, 1, tzinfo=UTC)
    first = add_model_row(clean_db, tenant.id, name="alpha", sha256="a" * 64, created_at=base)
    second = add_model_row(
        clean_db, tenant.id, name="beta", sha256="b" * 64, created_at=base + timedelta(hours=1)
    )
    add_model_row(clean_db, make_tenant("b").id, name="alpha", sha256="a" * 64)

    def model_ids(query: str) -> list[str]:
        response = client.get(f"/v1/models{query}", headers=tenant.headers)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert model_ids("") == [str(second), str(first)]
    assert model_ids("?order=asc") == [str(first), str(second)]
    assert model_ids(f"?sha256={'A' * 64}") == [str(first)]
    assert model_ids("?name=beta") == [str(second)]
    assert model_ids("?name=gamma") == []
    problem(client.get("/v1/models?sha256=xyz", headers=tenant.headers), 422)
    problem(client.get("/v1/models?order=sideways", headers=tenant.headers), 422)

    passed = add_audit(clean_db, tenant.id, first, minutes=0, verdict=verdict("pass"))
    failed = add_audit(clean_db, tenant.id, first, minutes=1, verdict=verdict("fail"))
    add_audit(clean_db, tenant.id, second, minutes=2)  # before policies: no verdict

    def job_ids(query: str) -> list[str]:
        response = client.get(f"/v1/jobs{query}", headers=tenant.headers)
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert job_ids("?verdict=pass") == [str(passed)]
    assert job_ids("?verdict=fail&kind=audit&status=succeeded") == [str(failed)]
    assert job_ids("?verdict=inconclusive") == []
    assert job_ids("?order=asc")[:2] == [str(passed), str(failed)]
    assert client.get("/v1/jobs?verdict=pass", headers=tenant.headers).json()["total"] == 1
    assert problem(client.get("/v1/jobs?verdict=maybe", headers=tenant.headers), 422)
    datasets = client.get("/v1/datasets?order=asc", headers=tenant.headers)
    assert datasets.status_code == 200 and datasets.json()["total"] == 0
