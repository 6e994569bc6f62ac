"""End to end over HTTP: pre-train, audit the result with FC, CP and BP, read the report,
all through a real worker process on the real Redis and Postgres."""

from __future__ import annotations

import uuid

from servicekit import wait_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.models import StoredModel
from common.queue import make_celery, task_name
from common.signing import read_public_key, verify_report

TERMINAL = {"succeeded", "failed", "cancelled"}


def wait_job(client, tenant, job_id: str, timeout: float) -> dict:  # type: ignore[no-untyped-def]
    def finished() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
        return job if job["status"] in TERMINAL else None

    return wait_for(finished, timeout=timeout, interval=0.5, what=f"job {job_id}")


def test_pretrain_then_audit_over_http(client, make_tenant, start_worker, clean_db, settings):
    worker = start_worker()
    tenant = make_tenant("lab")
    submitted = client.post(
        "/v1/jobs/pretrain",
        headers={**tenant.headers, "Idempotency-Key": "first-run"},
        json={
            "dataset": "digits",
            "arch": "convnet",
            "defense": "none",
            "recipe": "quick",
            "epochs": 1,
            "name": "digits-convnet",
        },
    )
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]
    pretrain = wait_job(client, tenant, job_id, timeout=150)
    assert pretrain["status"] == "succeeded", (pretrain["error"], worker.output()[-3000:])
    assert pretrain["attempts"] == 1 and pretrain["progress"] == 1.0
    assert pretrain["started_at"] and pretrain["finished_at"] >= pretrain["started_at"]
    model_id = pretrain["result_model_id"]
    assert model_id == str(uuid.uuid5(uuid.UUID(job_id), "model"))
    model = client.get(f"/v1/models/{model_id}", headers=tenant.headers).json()
    assert model["name"] == "digits-convnet" and model["source"] == "pretrain"
    weights = client.get(model["weights_url"], headers=tenant.headers)
    assert len(weights.content) == model["size_bytes"]
    assert weights.headers["X-Content-SHA256"] == model["sha256"]
    assert not (settings.resolved_work_dir / job_id).exists()  # scratch removed

    audit = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json={
            "model_id": model_id,
            "dataset": "digits",
            "attacks": ["fc", "cp", "bp"],
            "pairs": [[0, 7], [2, 1]],
            "targets_per_pair": 1,
            "iterations": 5,
            "overrides": {"retrain_epochs": 5, "retrain_milestones": [], "eval_images": 100},
        },
    )
    assert audit.status_code == 202, audit.text
    audit_job = wait_job(client, tenant, audit.json()["id"], timeout=150)
    assert audit_job["status"] == "succeeded", (audit_job["error"], worker.output()[-3000:])
    assert audit_job["report_url"] == f"/v1/jobs/{audit_job['id']}/report"
    report = client.get(audit_job["report_url"], headers=tenant.headers).json()
    assert report["model_id"] == model_id
    attacks = report["body"]["attacks"]
    assert set(attacks) == {"fc", "cp", "bp"}
    for result in attacks.values():
        assert result["instances"] == 2 and 0 <= result["asr"] <= 1
        assert result["max_linf"] <= 25.5 / 255 + 1e-6
    assert len(report["body"]["stored_artifacts"]) == 6  # .npz and .png per attack
    # A real worker's report, as served, checks against the deployment's public key.
    public_key = read_public_key(client.get("/.well-known/bulwark-signing-key").text)
    assert verify_report(report["body"], report["signature"], public_key)
    card = client.get(f"/v1/models/{model_id}/card", headers=tenant.headers).text
    assert "| FC |" in card and "| CP |" in card and "| BP |" in card
    assert "Training recipe" in card and "defense: none" in card

    # A retried submission and a redelivered message change nothing.
    retried = client.post(
        "/v1/jobs/pretrain",
        headers={**tenant.headers, "Idempotency-Key": "first-run"},
        json={
            "dataset": "digits",
            "arch": "convnet",
            "defense": "none",
            "recipe": "quick",
            "epochs": 1,
            "name": "digits-convnet",
        },
    )
    assert retried.json()["id"] == job_id and retried.json()["status"] == "succeeded"
    make_celery(settings).send_task(task_name("pretrain"), args=[job_id], task_id=job_id)
    wait_for(
        lambda: worker.output().count(f"[{job_id}] succeeded") == 2,
        timeout=30,
        what="the redelivered task",
    )
    again = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
    assert (again["attempts"], again["finished_at"]) == (1, pretrain["finished_at"])
    with Session(clean_db) as session:
        assert session.scalar(select(func.count()).select_from(StoredModel)) == 1
