"""Signed reports over HTTP: the well-known key, the report's signature, ``bulwark verify``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from servicekit import add_report_row, submit_audit_job

from bulwark.cli import main
from common.signing import SigningKeyError


def instance_row(instance: int, success: bool) -> dict[str, Any]:
    return {
        "instance": instance,
        "target_index": 10 + instance,
        "target_class": 1,
        "poison_class": 2,
        "base_indices": [3, 4],
        "success": success,
        "predicted_class": 2 if success else 1,
        "poison_class_probability": 0.71,
        "re_acc": 0.93,
        "feature_distance": 1.25,
        "relative_feature_distance": 0.125,
        "linf": 0.0313725,
        "coefficients": [0.5, 0.5],
        "objective_start": 3.5,
        "objective_end": 0.75,
        "baseline_success": False,
        "baseline_poison_class_probability": 0.01,
        "baseline_re_acc": 0.94,
    }


def attack(name: str, asr: float) -> dict[str, Any]:
    mean_std = {"mean": 0.93, "std": 0.01}
    return {
        "attack": name,
        "poisons_per_instance": 2,
        "instances": 2,
        "successes": 1,
        "asr": asr,
        "asr_wilson95": [0.0945, 0.9055],
        "baseline": {"successes": 0, "rate": 0.0, "wilson95": [0.0, 0.658], "re_acc": mean_std},
        "re_acc": mean_std,
        "feature_distance": {"mean": 1.25, "std": 0.0},
        "relative_feature_distance": {"mean": 0.125, "std": 0.0},
        "max_linf": 0.0313725,
        "seconds": {"craft": 1.5, "retrain": 0.25},
        "rows": [instance_row(0, True), instance_row(1, False)],
    }


def report_body(model_id: uuid.UUID) -> dict[str, Any]:
    """A bulwark-audit/2 report as the worker stores it."""
    return {
        "schema_version": "bulwark-audit/2",
        "created_at": "2026-01-02T03:04:05+00:00",
        "model": {
            "path": f"/v1/models/{model_id}",
            "arch": "convnet",
            "feature_dim": 128,
            "num_classes": 10,
            "defense": "none",
            "trained_on": "digits",
            "weights_sha256": "0" * 64,
        },
        "dataset": {
            "name": "digits",
            "classes": [str(c) for c in range(10)],
            "split": {"train": 1437, "test": 360},
            "retrain_images": 200,
            "pool_images": 1000,
            "eval_images": 360,
        },
        "pre_acc": 0.97,
        "pre_acc_source": "measured",
        "head_init": "pretrained",
        "config": {"model": f"/v1/models/{model_id}", "epsilon": 8 / 255, "label": "é"},
        "seed": 0,
        "device": "cpu",
        "precision": "fp32",
        "instances": [
            {"target_index": 10, "target_class": 1, "poison_class": 2, "base_indices": [3, 4]},
            {"target_index": 11, "target_class": 1, "poison_class": 2, "base_indices": [3, 4]},
        ],
        "attacks": {"fc": attack("fc", 0.5), "cp": attack("cp", 0.5)},
        "screen": None,
        "timings": {"total": 2.0},
        "versions": {"bulwark": "0.1.0"},
        "stored_artifacts": [],
    }


def add_report(db: Any, client: Any, tenant: Any) -> str:
    """An audit job of ``tenant`` (submitted over HTTP) and its report row, as a worker writes."""
    model_id, job_id = submit_audit_job(db, client, tenant)
    add_report_row(db, tenant.id, job_id, model_id, report_body(model_id))
    return job_id


def test_a_served_report_verifies_and_a_changed_one_does_not(
    client, make_tenant, clean_db, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner, other = make_tenant("owner"), make_tenant("other")
    job_id = add_report(clean_db, client, owner)

    well_known = client.get("/.well-known/bulwark-signing-key")  # no key needed
    assert well_known.status_code == 200, well_known.text
    key = well_known.json()
    assert key["algorithm"] == "ed25519" and "BEGIN PUBLIC KEY" in key["public_key_pem"]
    key_file = tmp_path / "key.json"
    key_file.write_text(well_known.text)
    pem_file = tmp_path / "key.pem"
    pem_file.write_text(key["public_key_pem"])

    response = client.get(f"/v1/jobs/{job_id}/report", headers=owner.headers)
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["signature"]["key_id"] == key["key_id"]
    assert served["body"]["attacks"]["fc"]["asr"] == 0.5
    report_file = tmp_path / "report.json"
    report_file.write_text(json.dumps(served, indent=2))  # re-indented on the way: still valid

    for key_source in (key_file, pem_file):
        assert main(["verify", str(report_file), "--public-key", str(key_source)]) == 0
    assert "valid" in capsys.readouterr().out

    served["body"]["attacks"]["fc"]["asr"] = 0.75
    report_file.write_text(json.dumps(served))
    assert main(["verify", str(report_file), "--public-key", str(key_file)]) == 1
    assert "invalid signature" in capsys.readouterr().out

    # Another tenant still gets 404, for the report and its signature alike.
    assert client.get(f"/v1/jobs/{job_id}/report", headers=other.headers).status_code == 404
    # The key is created once: a second request signs with the same one.
    again = client.get(f"/v1/jobs/{job_id}/report", headers=owner.headers).json()
    assert again["signature"] == response.json()["signature"]  # Ed25519 is deterministic


def test_verify_fetches_the_key_from_url(
    client, make_tenant, clean_db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    owner = make_tenant("owner")
    job_id = add_report(clean_db, client, owner)
    report_file = tmp_path / "report.json"
    report_file.write_text(client.get(f"/v1/jobs/{job_id}/report", headers=owner.headers).text)
    fetched: list[str] = []

    def get(url: str, **_: Any) -> httpx.Response:
        fetched.append(url)
        return client.get(url)

    monkeypatch.setattr(httpx, "get", get)
    assert main(["verify", str(report_file), "--url", "http://testserver/"]) == 0
    assert fetched == ["http://testserver/.well-known/bulwark-signing-key"]


def test_verify_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.signing import public_key_pem

    key_file = tmp_path / "key.pem"
    key_file.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    missing = tmp_path / "missing.json"
    malformed = tmp_path / "malformed.json"
    malformed.write_text("{not json")
    no_signature = tmp_path / "no-signature.json"
    no_signature.write_text(json.dumps({"body": {}}))
    for report in (missing, malformed, no_signature):
        assert main(["verify", str(report), "--public-key", str(key_file)]) == 2
    not_a_key = tmp_path / "not-a-key.txt"
    not_a_key.write_text("hello")
    no_signature.write_text(json.dumps({"body": {}, "signature": {}}))
    assert main(["verify", str(no_signature), "--public-key", str(not_a_key)]) == 2
    assert main(["verify", str(no_signature), "--public-key", str(missing)]) == 2
    with pytest.raises(SystemExit) as exit_info:  # neither --public-key nor --url
        main(["verify", str(no_signature)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().out.count("error:") == 5


def test_production_api_refuses_to_start_without_a_key_file(settings) -> None:
    from api.app import create_app

    production = settings.model_copy(update={"environment": "production"})
    with pytest.raises(SigningKeyError, match="BULWARK_SIGNING_KEY_FILE"):
        create_app(production)
    assert not (settings.data_dir / "signing-key.pem").exists()
