"""The model hub's whole flow: its own architecture and its own data, over HTTP and locally.

A torchvision-style ResNet-18 (7x7 stem, max-pool: no Bulwark architecture) exported with
torch.export, and an ``.npz`` of the hub's images, both written by the test; uploaded, checked
and imported by a real worker, then audited with FC, CP and BP through that worker. The same
two files through ``bulwark audit`` give a report too.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from torchvision_style import Penultimate, export, resnet

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 40, 10
SPLIT = {"pretrain": 0, "retrain": 10, "pool": 25}  # an audit-only split of the hub's data
QUICK = {"retrain_epochs": 2, "retrain_milestones": [], "eval_images": 40, "screen_images": 20}


def hub_npz() -> bytes:
    """uint8 NHWC images whose class sets the mean colour, plus noise; integer labels."""
    rng = np.random.default_rng(0)

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(CLASSES), per_class)
        colour = rng.integers(40, 216, (CLASSES, 3))[labels][:, None, None, :]
        noise = rng.integers(-40, 40, (len(labels), 32, 32, 3))
        return np.clip(colour + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)

    x_train, y_train = split(TRAIN_PER_CLASS)
    x_test, y_test = split(TEST_PER_CLASS)
    buffer = io.BytesIO()
    names = np.array(["red", "green", "blue", "grey"])
    np.savez(buffer, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=names)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hub")
    program, data = folder / "extractor.pt2", folder / "data.npz"
    program.write_bytes(export(Penultimate(resnet(seed=3))))
    data.write_bytes(hub_npz())
    return program, data


def finished(client, tenant, url: str, timeout: float = 240) -> dict:  # type: ignore[no-untyped-def]
    """GET ``url`` until it leaves queued/running/pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(url, headers=tenant.headers).json()
        if body["status"] not in ("queued", "running", "pending"):
            return body
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {url}")


def test_a_hub_audits_its_own_resnet_on_its_own_data_over_http(
    client, make_tenant, start_worker, clean_db, hub_files
) -> None:
    worker = start_worker()
    tenant = make_tenant("hub")
    program, data = hub_files

    model_upload = client.post(
        "/v1/models",
        headers=tenant.headers,
        files={"file": ("extractor.pt2", program.read_bytes())},
        data={"input_shape": "3,32,32", "output": "features", "name": "hub-resnet18"},
    )
    assert model_upload.status_code == 202, model_upload.text
    dataset_upload = client.post(
        "/v1/datasets",
        headers=tenant.headers,
        files={"file": ("data.npz", data.read_bytes())},
        data={"name": "hub-colours"},
    )
    assert dataset_upload.status_code == 202, dataset_upload.text

    imported = finished(client, tenant, f"/v1/jobs/{model_upload.json()['id']}")
    assert imported["status"] == "succeeded", (imported["error"], worker.output()[-3000:])
    dataset = finished(client, tenant, f"/v1/datasets/{dataset_upload.json()['id']}")
    assert dataset["status"] == "ready", (dataset["error"], worker.output()[-3000:])
    assert dataset["classes"] == ["red", "green", "blue", "grey"]

    audit = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={
            "model_id": imported["result_model_id"],
            "dataset_id": dataset["id"],
            "attacks": ["fc", "cp", "bp"],
            "attack_settings": {"cp": {"poisons": 2}, "bp": {"poisons": 2}},
            "pairs": [[0, 1], [2, 3]],
            "targets_per_pair": 2,
            "iterations": 3,
            "overrides": {**QUICK, "split": SPLIT},
        },
    )
    assert audit.status_code == 202, audit.text
    job = finished(client, tenant, f"/v1/jobs/{audit.json()['id']}")
    assert job["status"] == "succeeded", (job["error"], worker.output()[-3000:])
    assert job["config"]["dataset"] == "npz" and job["spec"]["dataset_id"] == dataset["id"]

    report = client.get(job["report_url"], headers=tenant.headers).json()["body"]
    assert report["model"]["arch"] == "exported" and report["head_init"] == "fresh"
    assert report["dataset"]["classes"] == ["red", "green", "blue", "grey"]
    assert report["dataset"]["split"] == SPLIT
    assert set(report["attacks"]) == {"fc", "cp", "bp"}
    for result in report["attacks"].values():
        assert result["instances"] == 4 and 0.0 <= result["asr"] <= 1.0
        assert result["max_linf"] <= 25.5 / 255 + 1e-6
    # Nothing a tenant reads names a path on the server.
    model_path = f"/v1/models/{imported['result_model_id']}"
    assert report["model"]["path"] == report["config"]["model"] == model_path
    assert report["config"]["data_dir"] is None
    assert "/tmp" not in json.dumps(job) + json.dumps(report)


@pytest.mark.slow  # seconds of CPU or a subprocess: out of make test-fast
def test_the_same_two_files_audit_locally_with_the_cli(hub_files, tmp_path, capsys) -> None:
    from bulwark.cli import main

    program, data = hub_files
    out = tmp_path / "report.json"
    code = main(
        [
            "audit",
            "--model",
            str(program),
            "--dataset",
            str(data),
            "--attacks",
            "fc,cp,bp",
            "--attack-set",
            "cp.poisons=2",
            "--attack-set",
            "bp.poisons=2",
            "--pairs",
            "0:1,2:3",
            "--targets-per-pair",
            "2",
            "--iterations",
            "3",
            "--retrain-epochs",
            "2",
            "--split",
            "0:10:25",
            "--eval-images",
            "40",
            "--set",
            "screen_images=20",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["model"]["arch"] == "exported" and report["dataset"]["name"] == "npz"
    assert set(report["attacks"]) == {"fc", "cp", "bp"}
    assert all(result["instances"] == 4 for result in report["attacks"].values())
    # A torch.export program has no automatic reference: the report says why.
    assert report["reference"] is None and "architecture 'exported'" in report["reference_note"]

    # Its undefended twin, exported the same way, is named as the reference.
    twin = tmp_path / "twin.pt2"
    twin.write_bytes(export(Penultimate(resnet(seed=4))))
    args = [
        "audit", "--model", str(program), "--dataset", str(data), "--attacks", "fc",
        "--pairs", "0:1,2:3", "--targets-per-pair", "2", "--iterations", "3",
        "--retrain-epochs", "2", "--split", "0:10:25", "--eval-images", "40",
        "--set", "screen_images=20", "--reference", str(twin), "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["reference"]["source"] == "named"
    assert report["reference"]["model"]["arch"] == "exported"
    assert set(report["comparison"]) == {"fc"}
