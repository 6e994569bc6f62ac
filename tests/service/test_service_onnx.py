"""ONNX models over HTTP: accepted only where the deployment converts them.

With ``BULWARK_ONNX_ENABLED`` off (the default) an ``.onnx`` upload answers 415 saying why and
pointing to torch.export. With it on, the API walks the file's top-level protobuf fields with
its own varint reader (``api.onnx_check``: nothing parses the graph there) and answers 202 with
an ``import`` job of format ``onnx``; a worker converts the graph (onnx2torch), re-exports it
with ``torch.export`` and checks and stores that program exactly as an uploaded ``.pt2``.

The conversion needs the ``onnx`` extra, whose onnx2torch imports torchvision: the tests that
convert are skipped where it does not import (the CPU machines of the test suite), never faked.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import pytest
from servicekit import problem, problem_errors, wait_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.models import Job, StoredModel
from common.settings import Settings

HAS_CONVERTER = importlib.util.find_spec("onnx2torch") is not None
NEEDS_CONVERTER = pytest.mark.skipif(
    not HAS_CONVERTER, reason="needs the onnx extra (onnx2torch, with an importable torchvision)"
)
FORM = {"input_shape": "1,8,8", "name": "hub onnx", "mean": "0.3", "std": "0.3"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The conftest's settings with ONNX conversion enabled (what the worker image sets)."""
    return settings.model_copy(update={"onnx_enabled": True})


# ---- ONNX files, hand-encoded (the API needs no onnx package to tell them) -----------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _opset(domain: str, version: int) -> bytes:
    return _field(8, (_field(1, domain.encode()) if domain else b"") + b"\x10" + _varint(version))


def _onnx(*, graph: bytes = b"\x0a\x05input" * 10, tail: bytes | None = None) -> bytes:
    """ir_version 8, producer_name, a graph (contents the API does not read), opset 13."""
    body = b"\x08\x08" + _field(2, b"pytorch") + _field(7, graph)
    return body + (_opset("", 13) if tail is None else tail)


BIG_GRAPH = b"\x0a\x05input" * 50  # 350 bytes: what follows lies past the sniffed head
METADATA = _field(14, _field(1, b"author") + _field(2, b"hub"))  # a metadata_props entry


def upload(client, tenant, data: bytes, form=FORM, filename="hub.onnx"):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/models",
        headers=tenant.headers,
        data=form,
        files={"file": (filename, data, "application/octet-stream")},
    )


def stored_files(settings: Settings) -> list[Path]:
    root = settings.resolved_artifact_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def rows(db, table) -> int:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def wait_job(client, tenant, job_id: str, timeout: float = 180) -> dict:  # type: ignore[no-untyped-def]
    def finished() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, timeout=timeout, interval=0.5, what=f"job {job_id}")


# ---- the API -------------------------------------------------------------------------------


def test_with_onnx_off_an_onnx_upload_is_a_415_saying_why(
    settings, make_tenant, clean_db, clean_redis
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app, dispose_engines

    off = settings.model_copy(update={"onnx_enabled": False})
    application = create_app(off)
    try:
        with TestClient(application) as client:
            response = upload(client, make_tenant("a"), _onnx())
    finally:
        dispose_engines(application)
    assert response.status_code == 415, response.text
    detail = problem(response, 415)["detail"]
    assert "its workers have no ONNX converter" in detail and "BULWARK_ONNX_ENABLED" in detail
    assert "export the model with torch.export and upload the .pt2" in detail
    assert rows(clean_db, Job) == 0 and stored_files(off) == []


@pytest.mark.parametrize("output", [None, "logits"])
def test_with_onnx_on_an_onnx_upload_is_a_202_with_an_onnx_import_job(
    client, make_tenant, clean_db, settings, output: str | None
) -> None:
    tenant = make_tenant("hub")
    form = FORM if output is None else {**FORM, "output": output}
    data = _onnx()
    response = upload(client, tenant, data, form)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["kind"], job["status"]) == ("import", "queued")
    spec = job["spec"]
    assert (spec["format"], spec["arch"], spec["input_shape"]) == ("onnx", None, [1, 8, 8])
    assert spec["output"] == (output or "features")  # as for a .pt2: features unless told
    assert (spec["mean"], spec["std"], spec["name"]) == ([0.3], [0.3], "hub onnx")
    assert spec["filename"] == "hub.onnx"
    listed = client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers).json()
    assert listed["spec"] == spec
    (stored,) = stored_files(settings)  # the upload as sent, waiting for its worker
    assert stored.read_bytes() == data
    assert rows(clean_db, StoredModel) == 0


@pytest.mark.parametrize(
    ("data", "words"),
    [
        # Past the first bytes the API sniffs (SNIFF_BYTES): only the walk of every field sees it.
        (_onnx(graph=BIG_GRAPH, tail=_opset("", 13) + METADATA)[:-2], "past the end of the file"),
        (_onnx(graph=BIG_GRAPH) + b"\x00\x00", "is not a field of an ONNX ModelProto"),
        (_onnx(tail=_opset("com.microsoft", 1)), "custom operator sets ['com.microsoft']"),
        (_onnx(tail=_opset("", 13) + _field(25, b"\x0a\x01f")), "defines its own functions"),
        (
            b"\x08\x08" + _field(2, b"pytorch") + _opset("", 13),
            "holds one graph; this file holds 0",
        ),
        (_onnx(tail=b""), "imports no operator set"),
        (_onnx(graph=BIG_GRAPH, tail=_opset("", 13) + _field(2, b"x")), "field 2 after field 8"),
    ],
    ids=["truncated", "trailing", "custom-domain", "functions", "no-graph", "no-opset", "order"],
)
def test_with_onnx_on_a_malformed_onnx_file_is_a_422_naming_the_problem(
    client, make_tenant, clean_db, settings, data: bytes, words: str
) -> None:
    response = upload(client, make_tenant("a"), data)
    assert response.status_code == 422, response.text
    (error,) = problem_errors(response)
    assert error["loc"] == ["body", "file"], error
    assert "ONNX" in error["msg"] and words in error["msg"], error["msg"]
    assert rows(clean_db, Job) == 0 and stored_files(settings) == []


def test_with_onnx_on_a_file_named_onnx_that_is_not_one_is_a_422(
    client, make_tenant, clean_db, settings
) -> None:
    response = upload(client, make_tenant("a"), b"PK\x03\x04" + b"\x00" * 200)
    assert response.status_code == 422, response.text
    assert "not an ONNX model" in problem_errors(response)[0]["msg"]
    assert rows(clean_db, Job) == 0 and stored_files(settings) == []


def test_with_onnx_on_an_oversized_onnx_upload_is_a_413(
    settings, make_tenant, clean_db, clean_redis
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app, dispose_engines

    small = settings.model_copy(update={"max_upload_bytes": 64})
    application = create_app(small)
    try:
        with TestClient(application) as client:
            response = upload(client, make_tenant("a"), _onnx(graph=b"\x0a\x05input" * 20))
    finally:
        dispose_engines(application)
    assert response.status_code == 413, response.text
    assert rows(clean_db, Job) == 0 and stored_files(small) == []


# ---- the worker ----------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CONVERTER, reason="this worker has the onnx extra")
def test_a_worker_without_the_converter_fails_the_job_saying_so_and_keeps_nothing(
    client, make_tenant, start_worker, clean_db, settings
) -> None:
    """A deployment that enables ONNX on workers without the extra: the job says what is
    missing and what else to do, and neither the upload nor a model is kept."""
    worker = start_worker()
    tenant = make_tenant("hub")
    response = upload(client, tenant, _onnx())
    assert response.status_code == 202, response.text
    job = wait_job(client, tenant, response.json()["id"])
    assert job["status"] == "failed", worker.output()[-3000:]
    assert "`onnx` extra" in job["error"] and "torchvision" in job["error"], job["error"]
    assert "export the model with torch.export and upload the .pt2" in job["error"]
    assert rows(clean_db, StoredModel) == 0 and stored_files(settings) == []


def _onnx_cnn(path: Path, *, unknown_operator: bool = False) -> None:
    """A small CNN on 1x8x8 images written with onnx.helper: Conv, BatchNormalization, Relu,
    GlobalAveragePool, Flatten (16-d features); a dynamic batch axis."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def constant(name: str, *shape: int, low: float = -0.5, high: float = 0.5) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], epsilon=1e-5
        ),
        helper.make_node("NotAnOperator" if unknown_operator else "Relu", ["n"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16])],
        [
            constant("w", 16, 1, 3, 3),
            constant("b", 16),
            constant("scale", 16, low=0.5, high=1.5),
            constant("shift", 16),
            constant("mean", 16),
            constant("var", 16, low=0.5, high=2.0),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    if not unknown_operator:
        onnx.checker.check_model(model)
    onnx.save_model(model, str(path))


@NEEDS_CONVERTER
def test_an_onnx_model_is_converted_then_audited_as_an_exported_program(
    client, make_tenant, start_worker, clean_db, settings, tmp_path
) -> None:
    worker = start_worker()
    tenant = make_tenant("hub")
    path = tmp_path / "cnn.onnx"
    _onnx_cnn(path)
    response = upload(client, tenant, path.read_bytes())
    assert response.status_code == 202, response.text
    job = wait_job(client, tenant, response.json()["id"])
    assert job["status"] == "succeeded", (job["error"], worker.output()[-3000:])
    assert job["message"].startswith("ONNX graph converted; torch.export program checked")
    model = client.get(f"/v1/models/{job['result_model_id']}", headers=tenant.headers).json()
    facts = (model["arch"], model["num_classes"], model["in_channels"], model["feature_dim"])
    assert facts == ("exported", 0, 1, 16) and model["name"] == "hub onnx"
    manifest = model["manifest"]
    assert manifest["kind"] == "exported-extractor" and manifest["source_format"] == "onnx"
    assert manifest["batch_range"] == [1, 1024] and manifest["input_shape"] == [1, 8, 8]
    assert sorted(p.name for p in stored_files(settings)) == ["manifest.json", "model.pt2"]

    audit = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={
            "model_id": model["id"],
            "dataset": "digits",
            "attacks": ["fc", "bp"],
            "attack_settings": {"bp": {"poisons": 2}},
            "pairs": [[0, 7]],
            "targets_per_pair": 2,
            "iterations": 3,
            "overrides": {
                "retrain_epochs": 2,
                "retrain_milestones": [],
                "eval_images": 50,
                "screen_images": 40,
            },
        },
    )
    assert audit.status_code == 202, audit.text
    audit_job = wait_job(client, tenant, audit.json()["id"])
    assert audit_job["status"] == "succeeded", (audit_job["error"], worker.output()[-3000:])
    report = client.get(audit_job["report_url"], headers=tenant.headers).json()["body"]
    assert report["model"]["arch"] == "exported" and report["model"]["feature_dim"] == 16
    assert report["head_init"] == "fresh"
    for result in report["attacks"].values():
        assert result["instances"] == 2 and 0 <= result["asr"] <= 1


@NEEDS_CONVERTER
def test_an_onnx_graph_with_an_unknown_operator_fails_its_job_and_keeps_nothing(
    client, make_tenant, start_worker, clean_db, settings, tmp_path
) -> None:
    worker = start_worker()
    tenant = make_tenant("hub")
    path = tmp_path / "odd.onnx"
    _onnx_cnn(path, unknown_operator=True)
    response = upload(client, tenant, path.read_bytes(), filename="odd.onnx")
    assert response.status_code == 202, response.text  # the API does not read the graph
    job = wait_job(client, tenant, response.json()["id"])
    assert job["status"] == "failed", worker.output()[-3000:]
    assert "odd.onnx uses operators ONNX does not define: ['NotAnOperator']" in job["error"]
    assert rows(clean_db, StoredModel) == 0 and stored_files(settings) == []
    assert uuid.UUID(job["id"])  # the job row stays, with its error
