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
from servicekit import problem, problem_errors, wait_for
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
    assert "safetensors" in problem(response)["detail"]
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
    assert response.status_code == 422 and problem_errors(response)[0]["loc"] == ["body", field]
    if field == "arch":  # the catalog's message, listing the valid names
        assert problem_errors(response)[0]["msg"] == ARCHS.unknown_message("vgg")
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
    error = problem_errors(response)[0]
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
    assert problem_errors(response)[0]["loc"] == loc
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


# Every tensor is checked against the architecture: a 201 means the model loads for an audit.


def _safetensors(state) -> bytes:  # type: ignore[no-untyped-def]
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def _bulwark_state(arch: str, in_channels: int = 3, num_classes: int = 10) -> dict:
    from core.models import build_model

    return dict(build_model(arch, in_channels=in_channels, num_classes=num_classes).state_dict())


RESNET_FORM = {"arch": "resnet18", "input_shape": "3,32,32", "name": "r18"}


def _refused_on_file(response, db, settings) -> list[str]:  # type: ignore[no-untyped-def]
    """The messages of a 422 whose every problem names the file; nothing may be kept."""
    assert response.status_code == 422, response.text
    detail = problem_errors(response)
    assert all(error["loc"] == ["body", "file"] for error in detail), detail
    assert model_rows(db) == 0 and stored_files(settings) == []
    return [error["msg"] for error in detail]


def test_a_resnet18_with_a_7x7_stem_is_refused_naming_the_tensor_and_its_shape(
    client, make_tenant, clean_db, settings
) -> None:
    import torch

    state = _bulwark_state("resnet18")
    state["body.0.weight"] = torch.zeros(64, 3, 7, 7)
    response = upload(client, make_tenant("a"), _safetensors(state), form=RESNET_FORM)
    (message,) = _refused_on_file(response, clean_db, settings)
    assert "do not fit resnet18 (3 input channels, 10 classes)" in message
    assert "1 wrong shape: body.0.weight is (64, 3, 7, 7), expected (64, 3, 3, 3)" in message


def test_a_convnet_missing_a_tensor_is_refused(client, make_tenant, clean_db, settings) -> None:
    state = _bulwark_state("convnet", in_channels=1)
    del state["body.14.weight"]
    response = upload(client, make_tenant("a"), _safetensors(state))
    (message,) = _refused_on_file(response, clean_db, settings)
    assert "1 missing tensor: body.14.weight" in message


def test_every_mismatch_is_listed_in_one_422(client, make_tenant, clean_db, settings) -> None:
    import torch

    state = _bulwark_state("convnet", in_channels=1)
    for index in (7, 10, 14):  # a conv and its batch norm each: 18 missing tensors
        for name in [n for n in state if n.startswith((f"body.{index}.", f"body.{index + 1}."))]:
            del state[name]
    state["head.bias"] = torch.zeros(11)
    state["body.4.num_batches_tracked"] = torch.zeros((), dtype=torch.float32)
    state["extra.weight"] = torch.zeros(3)
    response = upload(client, make_tenant("a"), _safetensors(state))
    shape, missing, unexpected, dtype = _refused_on_file(response, clean_db, settings)
    assert "1 wrong shape: head.bias is (11,), expected (10,)" in shape
    assert "18 missing tensors: body.7.weight; " in missing and "; and 13 more" in missing
    assert "1 unexpected tensor: extra.weight" in unexpected
    assert "body.4.num_batches_tracked is F32, expected integer" in dtype


def _torchvision_resnet18_state() -> dict:
    """torchvision.models.resnet18()'s state dict names and shapes (7x7 stem, max-pool,
    ``layerN.M`` blocks, ``downsample``, ``fc``), written out: torchvision is not needed."""
    import torch

    state: dict = {}

    def conv_bn(conv: str, bn: str, cin: int, cout: int, kernel: int) -> None:
        state[f"{conv}.weight"] = torch.zeros(cout, cin, kernel, kernel)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            state[f"{bn}.{stat}"] = torch.zeros(cout)
        state[f"{bn}.num_batches_tracked"] = torch.zeros((), dtype=torch.int64)

    conv_bn("conv1", "bn1", 3, 64, 7)
    cin = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in (0, 1):
            prefix = f"layer{layer}.{block}"
            conv_bn(f"{prefix}.conv1", f"{prefix}.bn1", cin, planes, 3)
            conv_bn(f"{prefix}.conv2", f"{prefix}.bn2", planes, planes, 3)
            if block == 0 and layer > 1:
                conv_bn(f"{prefix}.downsample.0", f"{prefix}.downsample.1", cin, planes, 1)
            cin = planes
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    return state


def test_a_torchvision_resnet18_is_refused_pointing_to_torch_export(
    client, make_tenant, clean_db, settings
) -> None:
    data = _safetensors(_torchvision_resnet18_state())
    response = upload(client, make_tenant("a"), data, form=RESNET_FORM)
    (message,) = _refused_on_file(response, clean_db, settings)
    assert "not one of Bulwark's architectures" in message and "conv1.weight" in message
    assert "export it with torch.export and upload the .pt2" in message


def test_a_resnet18_without_normalization_loads_with_the_forms_mean_and_std(
    client, make_tenant, clean_db, settings
) -> None:
    """The normalization buffers are the one pair that may be absent (the form gives them)."""
    from core.checkpoint import load_extractor

    state = _bulwark_state("resnet18", num_classes=4)
    del state["normalize.mean"], state["normalize.std"]
    tenant = make_tenant("a")
    refused = upload(client, tenant, _safetensors(state), form=RESNET_FORM)
    assert refused.status_code == 422 and problem_errors(refused)[0]["loc"] == ["body", "mean"]
    form = {**RESNET_FORM, "mean": "0.4,0.5,0.6", "std": "0.2,0.2,0.2"}
    response = upload(client, tenant, _safetensors(state), form=form)
    assert response.status_code == 201, response.text
    model = response.json()
    assert (model["arch"], model["num_classes"], model["feature_dim"]) == ("resnet18", 4, 512)
    weights = client.get(model["weights_url"], headers=tenant.headers)
    path = settings.data_dir / "r18.safetensors"
    path.write_bytes(weights.content)
    manifest = {"normalization": model["manifest"]["normalization"]}
    loaded = load_extractor(path, manifest).model
    assert loaded.normalize.mean.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])


# ONNX with BULWARK_ONNX_ENABLED off (the default): a 415 pointing to torch.export
# (tests/service/test_service_onnx.py has the deployments that convert it).


def _onnx_bytes() -> bytes:
    """The start of an ONNX ModelProto as protobuf writes it (ir_version 8, producer_name,
    a graph, an opset_import), hand-encoded: the API needs no onnx package to tell it."""
    graph = b"\x0a\x05input" * 10  # field contents the API does not read (70 bytes)
    return (
        b"\x08\x08"
        + b"\x12\x07pytorch"
        + b"\x3a"
        + bytes([len(graph)])
        + graph
        + b"\x42\x02\x10\x0d"  # opset_import {version: 13}
    )


ONNX_FORM = {"input_shape": "3,32,32", "name": "hub model", "mean": "0.5,0.5,0.5", "std": "1,1,1"}


def test_an_onnx_upload_gets_a_415_pointing_to_torch_export(
    client, make_tenant, clean_db, settings
) -> None:
    response = upload(client, make_tenant("a"), _onnx_bytes(), ONNX_FORM, "model.onnx")
    assert response.status_code == 415, response.text
    detail = problem(response, 415)["detail"]
    assert "ONNX uploads are not imported" in detail
    assert "export the model with torch.export and upload the .pt2" in detail
    assert model_rows(clean_db) == 0 and stored_files(settings) == []


def test_a_file_named_onnx_that_is_not_protobuf_gets_a_422(
    client, make_tenant, clean_db, settings, convnet_bytes
) -> None:
    response = upload(client, make_tenant("a"), convnet_bytes, ONNX_FORM, "model.onnx")
    assert response.status_code == 422, response.text
    error = problem_errors(response)[0]
    assert error["loc"] == ["body", "file"] and "not an ONNX model" in error["msg"]
    assert model_rows(clean_db) == 0 and stored_files(settings) == []
