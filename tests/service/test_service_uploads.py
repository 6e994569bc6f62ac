"""Uploads are untrusted: checked without torch or unpickling, streamed with a size limit,
and a rejected upload leaves no file and no row."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
from servicekit import wait_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from catalog import ARCHS
from common.models import StoredModel

FORM = {
    "arch": "convnet",
    "input_shape": "1,8,8",
    "name": "tiny",
    "classes": json.dumps([str(i) for i in range(10)]),
}


@pytest.fixture(scope="module")
def convnet_bytes() -> bytes:
    """A real ConvNet state dict in safetensors (made with torch, as a model hub would)."""
    from safetensors.torch import save

    from core.models import build_model

    model = build_model("convnet", in_channels=1, num_classes=10, mean=[0.3], std=[0.4])
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


class CreatesAFile:
    """Unpickling this creates ``path``: the proof that an upload's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


def stored_files(settings) -> list[Path]:  # type: ignore[no-untyped-def]
    root = settings.resolved_artifact_dir
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def model_rows(db) -> int:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        return session.scalar(select(func.count()).select_from(StoredModel)) or 0


def upload(client, tenant, data: bytes, form=FORM, filename="model.safetensors"):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/models",
        headers=tenant.headers,
        data=form,
        files={"file": (filename, data, "application/octet-stream")},
    )


def test_upload_download_and_card(client, make_tenant, convnet_bytes, settings) -> None:
    from core.checkpoint import load_extractor

    tenant = make_tenant("hub")
    response = upload(client, tenant, convnet_bytes)
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["sha256"] == hashlib.sha256(convnet_bytes).hexdigest()
    assert (model["arch"], model["num_classes"], model["in_channels"], model["feature_dim"]) == (
        "convnet",
        10,
        1,
        128,
    )
    assert model["manifest"]["input_shape"] == [1, 8, 8] and model["source"] == "upload"
    weights = client.get(model["weights_url"], headers=tenant.headers)
    assert weights.content == convnet_bytes
    assert weights.headers["X-Content-SHA256"] == model["sha256"]
    assert weights.headers["Content-Length"] == str(len(convnet_bytes))
    assert weights.headers["Content-Disposition"] == 'attachment; filename="tiny.safetensors"'
    downloaded = settings.data_dir / "downloaded.safetensors"
    downloaded.write_bytes(weights.content)
    assert load_extractor(downloaded).model.arch == "convnet"
    card = client.get(model["card_url"], headers=tenant.headers)
    assert card.headers["content-type"].startswith("text/markdown")
    assert "# tiny" in card.text and model["sha256"] in card.text and "Not audited" in card.text
    listed = client.get("/v1/models", headers=tenant.headers).json()
    assert [m["id"] for m in listed["items"]] == [model["id"]]
    assert [p.name for p in stored_files(settings)] == ["model.safetensors"]


def test_a_bare_pickle_is_refused_and_never_runs(
    client, make_tenant, clean_db, settings, tmp_path
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"head.weight": CreatesAFile(marker)})
    response = upload(client, make_tenant("eve"), payload, filename="model.pkl")
    assert response.status_code == 415
    assert "safetensors" in response.json()["detail"]
    assert not marker.exists()
    assert model_rows(clean_db) == 0 and stored_files(settings) == []
    # The payload is live: loading it the unsafe way would have created the file.
    pickle.loads(payload)
    assert marker.exists()


def _wait_job(client, tenant, job_id: str) -> dict:  # type: ignore[no-untyped-def]
    def finished() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, timeout=120, interval=0.5, what=f"import job {job_id}")


def test_a_torch_file_that_would_run_code_fails_its_import_and_never_runs(
    client, make_tenant, start_worker, clean_db, settings, tmp_path
) -> None:
    """torch.save's layout (a zip holding data.pkl) goes to a worker, whose weights_only
    reader refuses the payload's callable: the job fails, the code never runs, no model."""
    worker = start_worker()
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"head.weight": CreatesAFile(marker)}))
        archive.writestr("archive/version", "3\n")
    tenant = make_tenant("eve")
    response = upload(client, tenant, buffer.getvalue(), filename="model.pt")
    assert response.status_code == 202, response.text
    job = _wait_job(client, tenant, response.json()["id"])
    assert job["status"] == "failed", worker.output()[-3000:]
    assert "weights-only" in job["error"] and job["result_model_id"] is None
    assert not marker.exists()
    assert model_rows(clean_db) == 0 and stored_files(settings) == []


def test_a_torch_state_dict_is_converted_to_safetensors_by_a_worker(
    client, make_tenant, start_worker, clean_db, settings
) -> None:
    import torch

    from core.checkpoint import load_extractor
    from core.models import build_model

    worker = start_worker()
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=1, num_classes=10, mean=[0.3], std=[0.4])
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    tenant = make_tenant("hub")
    response = upload(client, tenant, buffer.getvalue(), filename="model.pt")
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == "import"
    job = _wait_job(client, tenant, response.json()["id"])
    assert job["status"] == "succeeded", (job["error"], worker.output()[-3000:])
    stored = client.get(f"/v1/models/{job['result_model_id']}", headers=tenant.headers).json()
    assert stored["name"] == "tiny" and stored["source"] == "upload"
    assert stored["manifest"]["source_sha256"] == hashlib.sha256(buffer.getvalue()).hexdigest()
    assert stored["manifest"]["classes"] == [str(i) for i in range(10)]
    weights = client.get(stored["weights_url"], headers=tenant.headers)
    path = settings.data_dir / "converted.safetensors"
    path.write_bytes(weights.content)
    assert weights.headers["X-Content-SHA256"] == hashlib.sha256(weights.content).hexdigest()
    converted = load_extractor(path).model
    for name, tensor in model.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name
    # The .pt itself is gone once converted: only the safetensors model stays.
    assert sorted(p.name for p in stored_files(settings)) == ["manifest.json", "model.safetensors"]


@pytest.mark.parametrize(
    ("form", "field"),
    [({**FORM, "arch": "vgg"}, "arch"), ({**FORM, "mean": "0.1,0.2", "std": "0.3,0.3"}, "mean")],
)
def test_a_torch_upload_with_a_bad_form_is_refused_before_anything_is_kept(
    client, make_tenant, clean_db, settings, form, field
) -> None:
    payload = b"PK\x03\x04" + b"\0" * 100
    response = upload(client, make_tenant("hub"), payload, form=form, filename="model.pt")
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", field]
    if field == "arch":  # the catalog's message, listing the valid names
        assert response.json()["detail"][0]["msg"] == ARCHS.unknown_message("vgg")
    assert model_rows(clean_db) == 0 and stored_files(settings) == []


def _tamper(data: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d[:-4], "cover"),
        (lambda d: d[:5], "too short"),
        (lambda d: struct.pack("<Q", 10**12) + d[8:], "header length"),
        (lambda d: _tamper(d, lambda h: h["head.weight"].update(shape=[10, 129])), "needs"),
        (lambda d: _tamper(d, lambda h: h["head.bias"].update(dtype="F8_E4M3")), "dtype"),
        (lambda d: _tamper(d, lambda h: h.update(fc=h.pop("head.weight"))), "Bulwark model"),
        (lambda d: b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!" + b"x", "JSON"),
    ],
)
def test_malformed_safetensors_get_a_422_on_the_file_field(
    client, make_tenant, clean_db, settings, convnet_bytes, mutate, words
) -> None:
    response = upload(client, make_tenant("a"), mutate(convnet_bytes))
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "file"] and words in error["msg"], error
    assert model_rows(clean_db) == 0 and stored_files(settings) == []


@pytest.mark.parametrize(
    ("form", "loc"),
    [
        ({**FORM, "arch": "resnet18"}, ["body", "arch"]),
        ({**FORM, "arch": "vgg"}, ["body", "arch"]),
        ({k: v for k, v in FORM.items() if k != "input_shape"}, ["body", "input_shape"]),
        ({**FORM, "input_shape": "3,8,8"}, ["body", "input_shape"]),
        ({**FORM, "classes": '["a", "b"]'}, ["body", "classes"]),
        ({**FORM, "mean": "0.5"}, ["body", "std"]),
        ({**FORM, "mean": "0.5", "std": "0"}, ["body", "std"]),
    ],
)
def test_bad_metadata_gets_a_422_naming_the_field(
    client, make_tenant, clean_db, settings, convnet_bytes, form, loc
) -> None:
    response = upload(client, make_tenant("a"), convnet_bytes, form=form)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == loc
    assert model_rows(clean_db) == 0 and stored_files(settings) == []


def test_oversized_uploads_are_refused_leaving_nothing(
    app, client, make_tenant, clean_db, settings, convnet_bytes
) -> None:
    app.state.settings = settings.model_copy(update={"max_upload_bytes": 4096})
    tenant = make_tenant("a")
    declared = upload(client, tenant, convnet_bytes)
    assert declared.status_code == 413, declared.text
    assert declared.json()["limit_bytes"] == 4096

    # Chunked, with no Content-Length: the parser stops once the file passes the limit.
    boundary = "bulwarkboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="arch"\r\n\r\nconvnet\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="big.safetensors"\r\n\r\n'
    ).encode()

    def body():  # type: ignore[no-untyped-def]
        yield head
        for _ in range(64):
            yield b"\0" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    streamed = client.post(
        "/v1/models",
        content=body(),
        headers={**tenant.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert streamed.status_code == 413, streamed.text
    assert model_rows(clean_db) == 0 and stored_files(settings) == []
