"""A pre-training that asks for 2 devices, through the API and a real worker (Celery's prefork
pool child starts the 2 ranks; on this CPU machine they are gloo processes)."""

from __future__ import annotations

import uuid

import pytest
from servicekit import wait_for

from common.settings import Settings

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_devices_per_job": 2})


def test_a_two_device_pretraining_runs_on_a_worker(client, make_tenant, start_worker) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker()
    tenant = make_tenant("lab")
    body = {
        "dataset": "digits",
        "arch": "convnet",
        "defense": "pcl",
        "recipe": "quick",
        "epochs": 2,
        "overrides": {
            "devices": 2,
            "warmup_epochs": 1,
            "split": {"pretrain": 20, "retrain": 1, "pool": 1},
        },
    }
    too_many = client.post(
        "/v1/jobs/pretrain",
        headers=tenant.headers,
        json={**body, "overrides": {**body["overrides"], "devices": 3}},
    )
    assert too_many.status_code == 422
    (error,) = too_many.json()["errors"]
    assert error["loc"] == ["body", "overrides", "devices"] and "at most 2" in error["msg"]

    submitted = client.post("/v1/jobs/pretrain", headers=tenant.headers, json=body)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]

    def finished() -> dict | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
        return job if job["status"] in TERMINAL else None

    job = wait_for(finished, timeout=240, interval=0.5, what=f"job {job_id}")
    assert job["status"] == "succeeded", (job["error"], worker.output()[-3000:])
    assert job["progress"] == 1.0
    model_id = job["result_model_id"]
    assert model_id == str(uuid.uuid5(uuid.UUID(job_id), "model"))
    model = client.get(f"/v1/models/{model_id}", headers=tenant.headers).json()
    assert model["manifest"]["config"]["devices"] == 2
    assert len(model["manifest"]["centroids"]) == 10
