"""A model hub's ``torch.export`` program over HTTP: upload, import on a real worker, audit.

The API routes a zip by its central directory alone (``.../archive_format`` is torch.export's,
``.../data.pkl`` torch.save's) and refuses unsafe names, links, too many members and declared
sizes past the limit before storing anything. Whatever needs torch (the graph, the pickles)
is checked by the worker (``core.exported``), whose refusal fails the import job with the
reason and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from servicekit import problem, problem_errors, wait_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from torch import nn

from common.models import Job, StoredModel

FORM = {"input_shape": "1,8,8", "name": "hub-cnn", "mean": "0.3", "std": "0.3"}


class HubCNN(nn.Module):
    """An architecture Bulwark does not know: its exported program is all the worker sees."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.down(self.stem(x))).flatten(1)


def _archive(model: nn.Module | None = None) -> bytes:
    torch.manual_seed(0)
    program = torch.export.export((model or HubCNN()).eval(), (torch.rand(1, 1, 8, 8),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def program() -> bytes:
    return _archive()


class CreatesAFile:
    """Unpickling this creates ``path``: the proof that an upload's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename.split("/", 1)[1]: archive.read(info) for info in archive.infolist()}


def _rewrite(data: bytes, change: Callable[[dict[str, bytes]], None]) -> bytes:
    """The archive with members changed, written by torch's own PT2 writer."""
    from torch.export.pt2_archive._package import PT2ArchiveWriter

    contents = _members(data)
    change(contents)
    buffer = io.BytesIO()
    with PT2ArchiveWriter(buffer) as writer:
        for name, value in contents.items():
            if name not in (".data/version", "byteorder", ".data/serialization_id"):
                writer.write_bytes(name, value)
    return buffer.getvalue()


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def upload(client, tenant, data: bytes, form=FORM, filename="hub.pt2"):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/models",
        headers=tenant.headers,
        data=form,
        files={"file": (filename, data, "application/octet-stream")},
    )


def wait_job(client, tenant, job_id: str, timeout: float = 120) -> dict:  # type: ignore[no-untyped-def]
    def finished() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, timeout=timeout, interval=0.5, what=f"job {job_id}")


def stored_files(settings) -> list[Path]:  # type: ignore[no-untyped-def]
    root = settings.resolved_artifact_dir
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def rows(db, table) -> int:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def test_an_exported_program_is_imported_then_audited_over_http(
    client, make_tenant, start_worker, clean_db, settings, program
) -> None:
    worker = start_worker()
    tenant = make_tenant("hub")
    response = upload(client, tenant, program)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "import" and job["spec"]["format"] == "export"
    assert job["spec"]["output"] == "features" and job["spec"]["arch"] is None
    job = wait_job(client, tenant, job["id"])
    assert job["status"] == "succeeded", (job["error"], worker.output()[-3000:])

    model = client.get(f"/v1/models/{job['result_model_id']}", headers=tenant.headers).json()
    facts = (model["arch"], model["num_classes"], model["in_channels"], model["feature_dim"])
    assert facts == ("exported", 0, 1, 16) and model["name"] == "hub-cnn"
    manifest = model["manifest"]
    assert manifest["kind"] == "exported-extractor" and manifest["input_shape"] == [1, 8, 8]
    assert manifest["head"] == "none" and manifest["normalization"]["mean"] == pytest.approx([0.3])
    assert model["sha256"] == manifest["weights_sha256"] == hashlib.sha256(program).hexdigest()
    weights = client.get(model["weights_url"], headers=tenant.headers)
    assert weights.content == program  # stored untouched
    assert weights.headers["Content-Disposition"] == 'attachment; filename="hub-cnn.pt2"'
    assert sorted(p.name for p in stored_files(settings)) == ["manifest.json", "model.pt2"]

    # Digits has 10 classes and the program no head: the audit re-trains a fresh one.
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
    audit_job = wait_job(client, tenant, audit.json()["id"], timeout=180)
    assert audit_job["status"] == "succeeded", (audit_job["error"], worker.output()[-3000:])
    report = client.get(audit_job["report_url"], headers=tenant.headers).json()["body"]
    assert report["model"]["arch"] == "exported" and report["model"]["feature_dim"] == 16
    assert report["head_init"] == "fresh" and report["dataset"]["name"] == "digits"
    assert report["model"]["weights_sha256"] == model["sha256"]
    for result in report["attacks"].values():
        assert result["instances"] == 2 and result["max_linf"] <= 25.5 / 255 + 1e-6
    card = client.get(model["card_url"], headers=tenant.headers).text
    assert "`model.pt2`" in card and "| FC |" in card


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    return info


def _huge_declared_size(program: bytes) -> bytes:
    archive = bytearray(_zip([*_entries(program), ("archive/extra/notes", b"x" * 1000)]))
    entry = archive.rfind(b"PK\x01\x02")  # the last member's central directory entry
    struct.pack_into("<I", archive, entry + 24, 3 << 30)  # its uncompressed size: 3 GiB
    return bytes(archive)


def _entries(program: bytes) -> list[tuple[zipfile.ZipInfo | str, bytes]]:
    return [(f"archive/{name}", data) for name, data in _members(program).items()]


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda p: _zip([*_entries(p), ("archive/../../etc/evil", b"x")]), 422, "'..'"),
        (lambda p: _zip([*_entries(p), ("/etc/evil", b"x")]), 422, "absolute"),
        (lambda p: _zip([*_entries(p), (_symlink("archive/extra/link"), b"/etc")]), 422, "link"),
        (
            lambda p: _zip([*_entries(p), *((f"archive/extra/{i}", b"") for i in range(4100))]),
            422,
            "at most 4096",
        ),
        (_huge_declared_size, 422, "zip bomb"),
        (
            lambda p: _zip([("archive/weights.bin", b"\0" * 10)]),
            422,
            "neither a torch.export.save archive",
        ),
    ],
)
def test_a_bad_zip_is_refused_before_anything_is_stored(
    client, make_tenant, clean_db, settings, program, make, status, words
) -> None:
    response = upload(client, make_tenant("eve"), make(program))
    assert response.status_code == status, response.text
    error = problem_errors(response)[0]
    assert error["loc"] == ["body", "file"] and words in error["msg"], error
    assert stored_files(settings) == [] and rows(clean_db, Job) == 0


def test_a_zip_declaring_more_than_the_upload_limit_gets_a_413(
    app, client, make_tenant, clean_db, settings, program
) -> None:
    app.state.settings = settings.model_copy(update={"max_upload_bytes": 150_000})

    def deflated(name: str) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        return info

    # 80 KB of zeros each, a few hundred bytes once compressed: a small file declaring more.
    zeros = [(deflated(f"archive/extra/zeros{i}"), bytes(80_000)) for i in range(2)]
    data = _zip([*_entries(program), *zeros])
    assert len(data) < 150_000
    response = upload(client, make_tenant("eve"), data)
    assert response.status_code == 413, response.text
    assert "once inflated" in problem(response)["detail"]
    assert stored_files(settings) == [] and rows(clean_db, Job) == 0


def _pickled_sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(contents: dict[str, bytes]) -> None:
        buffer = io.BytesIO()
        torch.save(CreatesAFile(marker), buffer)
        contents["data/sample_inputs/model.pt"] = buffer.getvalue()

    return change


def _unknown_operator(contents: dict[str, bytes]) -> None:
    program = json.loads(contents["models/model.json"])
    node = program["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.ops.aten.totally_unknown.default"
    contents["models/model.json"] = json.dumps(program).encode()


@torch.library.custom_op("bulwark_service_test::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@double.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class WithCustomOp(HubCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return double(super().forward(x))


def test_programs_only_the_worker_can_judge_fail_their_import_leaving_nothing(
    client, make_tenant, start_worker, clean_db, settings, program, tmp_path
) -> None:
    """A pickle that would create a file, a custom operator, an operator name edited into
    the JSON, a program that does not take the declared input shape: each import job fails
    with the reason, the payload never runs, and neither the upload nor a model is kept."""
    worker = start_worker()
    tenant = make_tenant("eve")
    marker = tmp_path / "pwned"
    cases = [
        (_rewrite(program, _pickled_sample_inputs(marker)), FORM, "weights_only=True"),
        (_archive(WithCustomOp()), FORM, "bulwark_service_test.double.default' is not in"),
        (_rewrite(program, _unknown_operator), FORM, "totally_unknown"),
        (program, {**FORM, "input_shape": "1,16,16"}, "the program takes 8 at height"),
        (program, {**FORM, "output": "logits"}, "ends in a linear layer"),
    ]
    jobs = []
    for data, form, words in cases:
        response = upload(client, tenant, data, form=form)
        assert response.status_code == 202, response.text
        jobs.append((response.json()["id"], words))
    for job_id, words in jobs:
        job = wait_job(client, tenant, job_id)
        assert job["status"] == "failed", (words, worker.output()[-3000:])
        assert words in job["error"] and job["result_model_id"] is None, job["error"]
    assert not marker.exists()
    assert rows(clean_db, StoredModel) == 0 and stored_files(settings) == []
