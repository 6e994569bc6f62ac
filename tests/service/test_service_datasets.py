"""Tenant datasets: uploads checked by their container at the API, read by a real worker into
a canonical npz, audited by ``dataset_id``; malicious uploads leave no row and no file."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from servicekit import add_model_row, problem, problem_errors, wait_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.artifacts import dataset_data_key
from common.models import DatasetStatus, Job, JobStatus, TenantDataset

TERMINAL = {"succeeded", "failed", "cancelled"}
DIGITS_SPLIT = {"pretrain": 100, "retrain": 10, "pool": 25}


# ---- files a tenant might upload -------------------------------------------------------------


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def digits_arrays() -> dict[str, np.ndarray]:
    """sklearn's digits as the core's digits reader splits them: the first 80% of each class
    train, the rest test; 0..16 grey levels scaled to uint8, (N, H, W)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train = np.zeros(len(labels), dtype=bool)
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        train[idx[: int(0.8 * len(idx))]] = True
    return {
        "x_train": images[train],
        "y_train": labels[train],
        "x_test": images[~train],
        "y_test": labels[~train],
    }


def tiny_arrays(classes: int = 3, per_class: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class).astype(np.int64)
    return {
        "x_train": rng.integers(0, 256, (len(labels), 8, 8), dtype=np.uint8),
        "y_train": labels,
        "x_test": rng.integers(0, 256, (len(labels), 8, 8), dtype=np.uint8),
        "y_test": labels.copy(),
    }


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def png_bytes(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def image_folder_zip() -> bytes:
    """train/<class>/ and test/<class>/ with 3 and 2 RGB 6x6 images of each of 2 classes."""
    files = {}
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for index in range(count):
                files[f"{split}/{cls}/{index}.png"] = png_bytes(len(files))
    return zip_bytes(files)


def declared_huge(data: bytes, member: str, size: int) -> bytes:
    """``data`` (a zip) with ``member``'s inflated size declared as ``size`` in the central
    directory, the only place a listing reads."""
    entry = data.find(b"PK\x01\x02")
    while entry >= 0:
        (name_length,) = struct.unpack("<H", data[entry + 28 : entry + 30])
        if data[entry + 46 : entry + 46 + name_length].decode() == member:
            return data[: entry + 24] + struct.pack("<I", size) + data[entry + 28 :]
        entry = data.find(b"PK\x01\x02", entry + 4)
    raise AssertionError(f"no {member} in the zip")


def tar_with_symlink() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        image = png_bytes(1)
        info = tarfile.TarInfo("train/cat/0.png")
        info.size = len(image)
        archive.addfile(info, io.BytesIO(image))
        link = tarfile.TarInfo("train/cat/1.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


class CreatesAFile:
    """Unpickling this creates ``path``: the proof that an upload's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


# ---- helpers -------------------------------------------------------------------------------


def upload(client, tenant, data: bytes, filename: str = "data.npz", **form: str):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/datasets",
        headers=tenant.headers,
        data=form,
        files={"file": (filename, data, "application/octet-stream")},
    )


def stored_files(settings) -> list[Path]:  # type: ignore[no-untyped-def]
    root = settings.resolved_artifact_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def rows(db, model) -> int:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def wait_dataset(client, tenant, dataset_id: str, timeout: float = 120) -> dict:  # type: ignore[no-untyped-def]
    def settled() -> dict | None:
        dataset = client.get(f"/v1/datasets/{dataset_id}", headers=tenant.headers).json()
        return dataset if dataset["status"] != "pending" else None

    return wait_for(settled, timeout=timeout, interval=0.3, what=f"dataset {dataset_id}")


def wait_job(client, tenant, job_id: str, timeout: float = 180) -> dict:  # type: ignore[no-untyped-def]
    def finished() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
        return job if job["status"] in TERMINAL else None

    return wait_for(finished, timeout=timeout, interval=0.5, what=f"job {job_id}")


def add_dataset(db, tenant_id: uuid.UUID, **facts: Any) -> uuid.UUID:  # type: ignore[no-untyped-def]
    """A ready dataset row, as a finished dataset job would write it (digits-like facts)."""
    values: dict[str, Any] = {
        "status": DatasetStatus.READY,
        "classes": [str(c) for c in range(10)],
        "image_shape": {"channels": 1, "height": 8, "width": 8},
        "train_counts": [142] * 10,
        "test_counts": [36] * 10,
        **facts,
    }
    with Session(db) as session:
        dataset = TenantDataset(
            tenant_id=tenant_id,
            name="d",
            format="npz",
            sha256="0" * 64,
            size_bytes=1,
            **values,
        )
        dataset.data_key = dataset_data_key(dataset.id)
        session.add(dataset)
        session.commit()
        return dataset.id


def add_model(db, tenant_id: uuid.UUID) -> uuid.UUID:  # type: ignore[no-untyped-def]
    return add_model_row(db, tenant_id)


# ---- the API side: container checks, tenancy, life cycle ------------------------------------


def test_list_get_delete_and_another_tenant_gets_404(client, make_tenant, clean_db, settings):
    owner, other = make_tenant("owner"), make_tenant("other")
    response = upload(client, owner, npz_bytes(**tiny_arrays()), name="tiny")
    assert response.status_code == 202, response.text
    dataset = response.json()
    assert (dataset["name"], dataset["format"], dataset["status"]) == ("tiny", "npz", "pending")
    assert dataset["classes"] is None and dataset["job_id"]
    job = client.get(f"/v1/jobs/{dataset['job_id']}", headers=owner.headers).json()
    assert (job["kind"], job["status"], job["spec"]["dataset_id"]) == (
        "dataset",
        "queued",
        dataset["id"],
    )
    listed = client.get("/v1/datasets", headers=owner.headers).json()
    assert (listed["total"], [d["id"] for d in listed["items"]]) == (1, [dataset["id"]])
    path = f"/v1/datasets/{dataset['id']}"
    assert client.get(path, headers=owner.headers).json() == dataset
    for method in ("GET", "DELETE"):
        assert client.request(method, path, headers=other.headers).status_code == 404
    assert client.get("/v1/datasets", headers=other.headers).json()["total"] == 0
    # The import job is stopped by deleting the dataset, not by cancelling the job.
    cancel = client.post(f"/v1/jobs/{dataset['job_id']}/cancel", headers=owner.headers)
    assert cancel.status_code == 409 and "DELETE /v1/datasets" in problem(cancel)["detail"]
    assert len(stored_files(settings)) == 1  # the upload, waiting for its worker
    assert client.delete(path, headers=owner.headers).status_code == 204
    assert client.get(path, headers=owner.headers).status_code == 404
    assert client.delete(path, headers=owner.headers).status_code == 204  # idempotent
    assert client.get("/v1/datasets", headers=owner.headers).json()["total"] == 0
    assert stored_files(settings) == []
    job = client.get(f"/v1/jobs/{dataset['job_id']}", headers=owner.headers).json()
    assert job["status"] == "cancelled"
    with Session(clean_db) as session:  # a tombstone: the row stays, marked deleted
        assert session.get(TenantDataset, uuid.UUID(dataset["id"])).deleted_at is not None


def test_the_format_comes_from_the_form_or_the_file_name(client, make_tenant, clean_db):
    tenant = make_tenant("a")
    folder = upload(client, tenant, image_folder_zip(), filename="pets.zip")
    assert folder.status_code == 202 and folder.json()["format"] == "image-folder"
    named = upload(client, tenant, image_folder_zip(), filename="pets", format="image-folder")
    assert named.status_code == 202 and named.json()["name"] == "pets"
    for form, words in (({}, "does not say"), ({"format": "parquet"}, "valid dataset formats")):
        response = upload(client, tenant, image_folder_zip(), filename="pets", **form)
        assert response.status_code == 422, response.text
        error = problem_errors(response)[0]
        assert error["loc"] == ["body", "format"] and words in error["msg"], error
    assert rows(clean_db, TenantDataset) == 2


NPZ = npz_bytes(**tiny_arrays())


@pytest.mark.parametrize(
    ("data", "filename", "words"),
    [
        pytest.param(
            zip_bytes(
                {
                    "x_train.npy": b"\0" * (16 << 20),
                    "y_train.npy": b"",
                    "x_test.npy": b"",
                    "y_test.npy": b"",
                }
            ),
            "bomb.npz",
            "zip bomb",
            id="zip-bomb-npz",
        ),
        pytest.param(
            declared_huge(NPZ, "x_train.npy", 0xFFFFFFF0),
            "huge.npz",
            "bytes in all",
            id="declared-huge-member",
        ),
        pytest.param(
            zip_bytes({"train/cat/0.png": png_bytes(0), "../escape.png": png_bytes(1)}),
            "pets.zip",
            "'..' component",
            id="dot-dot-member",
        ),
        pytest.param(tar_with_symlink(), "pets.tar", "symbolic link", id="symlink-in-tar"),
        pytest.param(
            zip_bytes({**members(NPZ), "run.py": b"print('hi')"}),
            "extra.npz",
            "unexpected members ['run.py']",
            id="unexpected-npz-member",
        ),
        pytest.param(
            zip_bytes({"x_train.npy": b"", "y_train.npy": b""}),
            "half.npz",
            "missing members ['x_test.npy', 'y_test.npy']",
            id="missing-npz-members",
        ),
        pytest.param(tar_with_symlink(), "data.npz", "symbolic link", id="tar-named-npz"),
        pytest.param(b"just some bytes" * 10, "data.npz", "not a readable", id="not-an-archive"),
    ],
)
def test_a_malicious_or_malformed_container_is_a_422_leaving_nothing(
    client, make_tenant, clean_db, clean_redis, settings, data, filename, words
) -> None:
    response = upload(client, make_tenant("eve"), data, filename=filename)
    assert response.status_code == 422, response.text
    error = problem_errors(response)[0]
    assert error["loc"] == ["body", "file"] and words in error["msg"], error
    assert rows(clean_db, TenantDataset) == 0 and rows(clean_db, Job) == 0
    assert stored_files(settings) == []
    assert clean_redis.llen("gpu") == 0


def test_an_oversized_upload_is_a_413_leaving_nothing(app, client, make_tenant, clean_db, settings):
    app.state.settings = settings.model_copy(update={"max_upload_bytes": 4096})
    response = upload(client, make_tenant("a"), npz_bytes(**digits_arrays()))
    assert response.status_code == 413, response.text
    assert response.json()["limit_bytes"] == 4096
    assert rows(clean_db, TenantDataset) == 0 and stored_files(settings) == []


def test_an_unreachable_broker_fails_the_dataset_and_keeps_no_file(settings, make_tenant):
    from fastapi.testclient import TestClient

    from api.app import create_app

    tenant = make_tenant("a")
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = upload(client, tenant, NPZ)
        assert response.status_code == 503, response.text
        [dataset] = client.get("/v1/datasets", headers=tenant.headers).json()["items"]
    assert dataset["status"] == "failed" and "queue is unreachable" in dataset["error"]
    assert stored_files(settings) == []


# ---- audits and pre-training by dataset_id (checked against the recorded facts) --------------


def test_dataset_and_dataset_id_together_or_neither_is_a_422(client, make_tenant, clean_db):
    tenant = make_tenant("a")
    model_id = str(add_model(clean_db, tenant.id))
    dataset_id = str(add_dataset(clean_db, tenant.id))
    for path, body in (
        ("/v1/jobs/audit", {"model_id": model_id}),
        ("/v1/jobs/pretrain", {"arch": "convnet"}),
    ):
        for extra in ({"dataset": "digits", "dataset_id": dataset_id}, {}):
            response = client.post(path, headers=tenant.headers, json={**body, **extra})
            assert response.status_code == 422, response.text
            error = problem_errors(response)[0]
            assert "dataset" in error["msg"] and "dataset_id" in error["msg"], error
    assert rows(clean_db, Job) == 0


def test_an_audit_by_dataset_id_is_checked_against_the_datasets_facts(
    client, make_tenant, clean_db
) -> None:
    tenant, other = make_tenant("a"), make_tenant("b")
    model_id = str(add_model(clean_db, tenant.id))
    digits_like = str(add_dataset(clean_db, tenant.id))
    rgb = str(
        add_dataset(clean_db, tenant.id, image_shape={"channels": 3, "height": 8, "width": 8})
    )
    five = str(
        add_dataset(
            clean_db,
            tenant.id,
            classes=list("abcde"),
            train_counts=[150] * 5,
            test_counts=[30] * 5,
        )
    )
    small = str(add_dataset(clean_db, tenant.id, train_counts=[20] * 10))
    theirs = str(add_dataset(clean_db, other.id))

    def audit(dataset_id: str, **extra: Any):  # type: ignore[no-untyped-def]
        body = {"model_id": model_id, "dataset_id": dataset_id, "targets_per_pair": 1, **extra}
        return client.post("/v1/jobs/audit", headers=tenant.headers, json=body)

    missing = audit(theirs)
    assert missing.status_code == 404 and missing.json()["loc"] == ["body", "dataset_id"]
    assert audit(str(uuid.uuid4())).status_code == 404
    cases = [
        (audit(rgb), ["body", "dataset_id"], "3-channel"),
        (audit(digits_like, pairs=[[0, 10]]), ["body", "pairs", 0], "below 10"),
        (audit(digits_like, targets_per_pair=40), ["body", "targets_per_pair"], "36 test"),
        (
            audit(digits_like, pairs=[[0, 1]], targets_per_pair=40),
            ["body", "targets_per_pair"],
            "36 test",
        ),
        # The npz entry's default split (10 re-training and 25 pool images per class).
        (audit(small), ["body", "overrides", "split"], "has 20 of class"),
        (
            audit(digits_like, overrides={"split": {"pretrain": 140, "retrain": 1, "pool": 2}}),
            ["body", "overrides", "split"],
            "needs 143",
        ),
    ]
    for response, loc, words in cases:
        assert response.status_code == 422, response.text
        error = problem_errors(response)[0]
        assert error["loc"] == loc and words in error["msg"], error
    assert rows(clean_db, Job) == 0

    # Five classes for a ten-class head: the audit re-trains a fresh head, so it is accepted.
    accepted = audit(five, pairs=[[0, 4]])
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert job["spec"]["dataset_id"] == five and job["spec"]["dataset"] is None
    assert job["config"]["dataset"] == "npz"
    assert not {"data_dir", "model", "device"} & set(job["config"])
    assert "/" not in json.dumps(job["spec"]).replace("/v1", "")  # no server path anywhere

    # A dataset that a queued audit reads cannot be deleted until the audit is gone.
    refused = client.delete(f"/v1/datasets/{five}", headers=tenant.headers)
    assert refused.status_code == 409 and refused.json()["job_ids"] == [job["id"]]
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=tenant.headers)
    assert client.delete(f"/v1/datasets/{five}", headers=tenant.headers).status_code == 204
    gone = audit(five, pairs=[[0, 4]])
    assert gone.status_code == 404, gone.text


def test_a_dataset_that_is_not_ready_is_a_409(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("a")
    model_id = str(add_model(clean_db, tenant.id))
    for status in (DatasetStatus.PENDING, DatasetStatus.FAILED):
        dataset_id = str(add_dataset(clean_db, tenant.id, status=status))
        response = client.post(
            "/v1/jobs/audit",
            headers=tenant.headers,
            json={"model_id": model_id, "dataset_id": dataset_id},
        )
        assert response.status_code == 409, response.text
        assert problem(response, 409)["dataset_status"] == status.value


def test_a_pretraining_by_dataset_id_checks_the_split(client, make_tenant, clean_db) -> None:
    tenant = make_tenant("a")
    dataset_id = str(add_dataset(clean_db, tenant.id))
    body = {"dataset_id": dataset_id, "arch": "convnet", "recipe": "quick", "epochs": 1}
    # The npz entry's default split has no pre-training images: pre-training needs a split.
    audit_only = client.post("/v1/jobs/pretrain", headers=tenant.headers, json=body)
    assert audit_only.status_code == 422, audit_only.text
    assert problem_errors(audit_only)[0]["loc"] == ["body", "overrides", "split"]
    short = client.post(
        "/v1/jobs/pretrain",
        headers=tenant.headers,
        json={**body, "overrides": {"split": {"pretrain": 130, "retrain": 10, "pool": 25}}},
    )
    assert short.status_code == 422, short.text
    error = problem_errors(short)[0]
    assert error["loc"] == ["body", "overrides", "split"] and "needs 165" in error["msg"], error
    response = client.post(
        "/v1/jobs/pretrain",
        headers=tenant.headers,
        json={**body, "overrides": {"split": DIGITS_SPLIT}},
    )
    assert response.status_code == 202, response.text
    assert response.json()["config"]["dataset"] == "npz"


# ---- through a real worker -----------------------------------------------------------------


def test_an_npz_upload_is_read_by_a_worker_into_its_facts(
    client, make_tenant, start_worker, clean_db, settings
) -> None:
    worker = start_worker()
    tenant = make_tenant("hub")
    arrays = digits_arrays()
    response = upload(client, tenant, npz_bytes(**arrays, classes=np.array(list("0123456789"))))
    assert response.status_code == 202, response.text
    dataset = wait_dataset(client, tenant, response.json()["id"])
    assert dataset["status"] == "ready", (dataset["error"], worker.output()[-3000:])
    assert dataset["classes"] == list("0123456789")
    assert dataset["image_shape"] == {"channels": 1, "height": 8, "width": 8}
    assert dataset["train_counts"] == np.bincount(arrays["y_train"]).tolist()
    assert dataset["test_counts"] == np.bincount(arrays["y_test"]).tolist()
    job = wait_job(client, tenant, dataset["job_id"])
    assert job["status"] == "succeeded" and "10 classes" in job["message"], job
    # Only the canonical npz stays; the upload is gone.
    [stored] = stored_files(settings)
    assert stored.relative_to(settings.resolved_artifact_dir).as_posix() == dataset_data_key(
        dataset["id"]
    )
    with np.load(stored, allow_pickle=False) as canonical:
        assert int(canonical["y_train"].shape[0]) == len(arrays["y_train"])

    # An image folder in a zip is read the same way.
    folder = upload(client, tenant, image_folder_zip(), filename="pets.zip")
    assert folder.status_code == 202, folder.text
    pets = wait_dataset(client, tenant, folder.json()["id"])
    assert pets["status"] == "ready", (pets["error"], worker.output()[-3000:])
    assert (pets["classes"], pets["train_counts"], pets["test_counts"]) == (
        ["cat", "dog"],
        [3, 3],
        [2, 2],
    )
    assert pets["image_shape"] == {"channels": 3, "height": 6, "width": 6}


def test_bad_arrays_and_pickles_fail_the_dataset_job_leaving_no_file(
    client, make_tenant, start_worker, clean_db, settings, tmp_path
) -> None:
    """Accepted by the API (the container is right), refused by the worker's reader: the job
    and the dataset fail with the reason, and neither the upload nor an npz is kept."""
    worker = start_worker()
    tenant = make_tenant("eve")
    marker = tmp_path / "pwned"
    good = tiny_arrays()
    labels = {**good, "y_train": good["y_train"] + 5}
    uploads = {
        "shapes": (npz_bytes(**{**good, "y_train": good["y_train"][:-1]}), "11 labels for 12"),
        "labels": (npz_bytes(**labels, classes=np.array(list("abc"))), "must lie in [0, 2]"),
        "pickle": (
            npz_bytes(**{**good, "x_train": np.array([CreatesAFile(marker)] * 12, dtype=object)}),
            "Python objects",
        ),
    }
    submitted = {}
    for what, (data, _) in uploads.items():
        response = upload(client, tenant, data, filename=f"{what}.npz")
        assert response.status_code == 202, (what, response.text)
        submitted[what] = response.json()["id"]
    for what, dataset_id in submitted.items():
        dataset = wait_dataset(client, tenant, dataset_id)
        assert dataset["status"] == "failed", (what, worker.output()[-3000:])
        assert uploads[what][1] in dataset["error"], (what, dataset["error"])
        assert what in dataset["error"] and "/" not in dataset["error"], dataset
        assert dataset["classes"] is None
        job = wait_job(client, tenant, dataset["job_id"])
        assert (job["status"], job["error"]) == ("failed", dataset["error"])
    assert not marker.exists()
    assert stored_files(settings) == []
    # The payload is live: unpickling it the unsafe way would have created the file.
    pickle.loads(pickle.dumps(CreatesAFile(marker)))
    assert marker.exists()


def test_an_audit_by_dataset_id_over_http_ends_with_a_report(
    client, make_tenant, start_worker, clean_db, settings, digits_extractor
) -> None:
    from safetensors.torch import save

    worker = start_worker()
    tenant = make_tenant("hub")
    model = digits_extractor("none").model
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    uploaded = client.post(
        "/v1/models",
        headers=tenant.headers,
        data={"arch": "convnet", "input_shape": "1,8,8", "name": "digits-convnet"},
        files={"file": ("model.safetensors", weights, "application/octet-stream")},
    )
    assert uploaded.status_code == 201, uploaded.text
    response = upload(client, tenant, npz_bytes(**digits_arrays()), name="digits")
    assert response.status_code == 202, response.text
    dataset = wait_dataset(client, tenant, response.json()["id"])
    assert dataset["status"] == "ready", (dataset["error"], worker.output()[-3000:])

    audit = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={
            "model_id": uploaded.json()["id"],
            "dataset_id": dataset["id"],
            "attacks": ["fc", "bp"],
            "pairs": [[0, 7], [2, 1]],
            "targets_per_pair": 1,
            "iterations": 5,
            "overrides": {
                "retrain_epochs": 5,
                "retrain_milestones": [],
                "eval_images": 100,
            },
        },
    )
    assert audit.status_code == 202, audit.text
    job = wait_job(client, tenant, audit.json()["id"])
    assert job["status"] == "succeeded", (job["error"], worker.output()[-3000:])
    assert job["spec"]["dataset_id"] == dataset["id"] and job["config"]["dataset"] == "npz"
    report = client.get(job["report_url"], headers=tenant.headers).json()
    assert set(report["body"]["attacks"]) == {"fc", "bp"}
    for result in report["body"]["attacks"].values():
        assert result["instances"] == 2 and 0 <= result["asr"] <= 1
    assert not (settings.resolved_work_dir / job["id"]).exists()  # the fetched npz is gone
    with Session(clean_db) as session:
        stored = session.get(Job, uuid.UUID(job["id"]))
        assert stored is not None and stored.status == JobStatus.SUCCEEDED


# ---- a dataset job that ends without reading the upload -------------------------------------


@pytest.mark.parametrize(
    ("left_as", "job_status", "says"),
    [
        # Its last worker died mid-read, having used up every attempt (a redelivery settles it).
        ("running", "failed", "stopped its worker 3 times (last phase: read)"),
        # Released for a retry after its last attempt (a database error on the last worker).
        ("queued", "failed", "stopped its worker 3 times (last phase: read)"),
        # Cancellation was asked for while its worker, which then died, was reading.
        ("cancelled-running", "cancelled", "cancelled (its worker had stopped)"),
    ],
)
def test_a_dataset_job_that_ends_unclaimable_fails_its_dataset_and_drops_the_upload(
    client, make_tenant, clean_db, settings, left_as: str, job_status: str, says: str
) -> None:
    """The settle path of a job no worker may claim any more (worker.jobs.claim_job) is where
    a dataset job ends without its own code running: the dataset must not stay pending."""
    from datetime import timedelta

    from sqlalchemy import update

    from common.artifacts import make_artifact_store
    from common.db import make_session_factory
    from common.models import utcnow
    from worker.jobs import Resources, claim_job

    tenant = make_tenant("hub")
    response = upload(client, tenant, npz_bytes(**tiny_arrays()), name="tiny")
    assert response.status_code == 202, response.text
    dataset = response.json()
    job_id = uuid.UUID(dataset["job_id"])
    assert len(stored_files(settings)) == 1  # the upload, waiting for its worker
    with Session(clean_db) as session:  # the row as the claims and the dead worker left it
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status=JobStatus.QUEUED if left_as == "queued" else JobStatus.RUNNING,
                attempts=settings.max_attempts,
                phase="read",
                cancel_requested=left_as == "cancelled-running",
                lease_expires_at=None if left_as == "queued" else utcnow() - timedelta(seconds=1),
            )
        )
        session.commit()
    resources = Resources(
        settings=settings,
        session_factory=make_session_factory(clean_db),
        store=make_artifact_store(settings),
    )
    # What a redelivered message does: the claim is refused and the job is settled.
    assert claim_job(resources=resources, job_id=job_id, worker="test:1") is None
    job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
    assert job["status"] == job_status
    settled = client.get(f"/v1/datasets/{dataset['id']}", headers=tenant.headers).json()
    assert settled["status"] == "failed", settled
    assert says in settled["error"]
    if job_status == "failed":
        assert settled["error"] == job["error"]
    assert settled["classes"] is None
    assert stored_files(settings) == []  # the upload is gone with the dataset
    # A later redelivery changes nothing.
    assert claim_job(resources=resources, job_id=job_id, worker="test:2") is None
    again = client.get(f"/v1/datasets/{dataset['id']}", headers=tenant.headers).json()
    assert again == settled
