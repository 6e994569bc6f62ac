"""The undefended reference of an audit through the service: ``reference`` auto (pre-trained
once, cached in the artifact store, reused), a model of the tenant's named by id, refused ids,
and none; the verdict decided under the tenant's stored policy. Real worker, Redis, Postgres;
digits models of one epoch and audits of a few iterations, so each test takes seconds."""

from __future__ import annotations

import os
import uuid
from typing import Any

from servicekit import Tenant, add_model_row, problem_errors, wait_for
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from catalog.policy import Policy
from common.artifacts import make_artifact_store
from common.models import Job
from common.settings import Settings
from core.verdict import UNION

TERMINAL = {"succeeded", "failed", "cancelled"}
AUTO_PREFIX = "auto-reference:"

# A tenant policy with a reference check, so that the verdict shows which policy decided it.
FIRST_POLICY = {"default": {"max_asr": 0.9}}
SECOND_POLICY = {
    "confidence": 0.9,
    "default": {"max_asr_above_baseline": 0.5, "max_asr_relative_to_reference": 3.0},
}

# The cheapest audit that still runs every stage: two attacks (so a comparison per attack), one
# closest and one random pair, one target each, a few crafting and re-training steps.
AUDIT = {
    "dataset": "digits",
    "attacks": ["fc", "bp"],
    "attack_settings": {"bp": {"poisons": 2}},
    "closest_pairs": 1,
    "random_pairs": 1,
    "targets_per_pair": 1,
    "iterations": 3,
    "overrides": {"retrain_epochs": 3, "retrain_milestones": [], "eval_images": 100},
}


def pretrain_payload(defense: str, name: str) -> dict[str, Any]:
    return {
        "dataset": "digits",
        "arch": "convnet",
        "defense": defense,
        "recipe": "quick",
        "epochs": 1,
        "name": name,
    }


def wait_job(client: Any, tenant: Tenant, job_id: str, timeout: float) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
        return job if job["status"] in TERMINAL else None

    job: dict[str, Any] = wait_for(finished, timeout=timeout, interval=0.5, what=f"job {job_id}")
    return job


def pretrained(client: Any, tenant: Tenant, worker: Any, defense: str, name: str) -> str:
    """A digits ConvNet pre-trained by the worker; its model id."""
    submitted = client.post(
        "/v1/jobs/pretrain", headers=tenant.headers, json=pretrain_payload(defense, name)
    )
    assert submitted.status_code == 202, submitted.text
    job = wait_job(client, tenant, submitted.json()["id"], timeout=150)
    assert job["status"] == "succeeded", (job["error"], worker.output()[-3000:])
    model_id: str = job["result_model_id"]
    return model_id


def audited(client: Any, tenant: Tenant, worker: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The report body of an audit run by the worker."""
    submitted = client.post("/v1/jobs/audit", headers=tenant.headers, json=body)
    assert submitted.status_code == 202, submitted.text
    job = wait_job(client, tenant, submitted.json()["id"], timeout=240)
    assert job["status"] == "succeeded", (job["error"], worker.output()[-3000:])
    report = client.get(job["report_url"], headers=tenant.headers)
    assert report.status_code == 200, report.text
    report_body: dict[str, Any] = report.json()["body"]
    return report_body


def stat_of(path: os.PathLike[str]) -> tuple[int, int]:
    """(inode, mtime in ns): the store writes a new file (os.replace) on every put."""
    facts = os.stat(path)
    return facts.st_ino, facts.st_mtime_ns


def test_auto_reference_is_pretrained_once_cached_and_reused_under_the_tenant_policy(
    client: Any, make_tenant: Any, start_worker: Any, settings: Settings
) -> None:
    worker = start_worker()
    tenant = make_tenant("lab")
    for version, policy in enumerate((FIRST_POLICY, SECOND_POLICY), start=1):
        stored = client.put("/v1/policy", headers=tenant.headers, json=policy)
        assert stored.status_code == 201, stored.text
        assert stored.json()["version"] == version
    model_id = pretrained(client, tenant, worker, "at", "digits-at")

    first = audited(client, tenant, worker, {"model_id": model_id, **AUDIT})  # reference: auto
    reference = first["reference"]
    assert reference is not None and reference["source"] == "auto", first.get("reference_note")
    assert first["reference_note"] is None
    # The undefended twin: the model's own pre-training run (quick, 1 epoch) without a defense.
    assert first["model"]["defense"] == "at" and reference["model"]["defense"] == "none"
    assert reference["model"]["arch"] == "convnet"
    assert reference["model"]["path"].startswith(AUTO_PREFIX)
    # The reference ran on the model's instances, and each attack (and their union, the worst
    # case over the two) is compared.
    assert set(reference["attacks"]) == {"fc", "bp"}
    assert set(first["comparison"]) == {"fc", "bp", UNION}
    for name in ("fc", "bp"):
        comparison = first["comparison"][name]
        mine, theirs = first["attacks"][name], reference["attacks"][name]
        assert [row["target_index"] for row in mine["rows"]] == [
            row["target_index"] for row in theirs["rows"]
        ]
        assert comparison["model"] == mine["asr_correct_targets"]
        assert comparison["reference"] == theirs["asr_correct_targets"]
        low, high = comparison["difference95"]
        assert low <= comparison["difference"] <= high
    union = first["comparison"][UNION]
    assert (union["model"], union["reference"]) == (
        first["union"]["asr"],
        reference["union"]["asr"],
    )
    # The verdict is the tenant's newest policy's, with the reference ratio among its checks.
    verdict = first["verdict"]
    assert verdict["policy_version"] == 2
    assert Policy.model_validate(verdict["policy"]) == Policy.model_validate(SECOND_POLICY)
    assert verdict["confidence"] == 0.9
    assert {(c["attack"], c["name"]) for c in verdict["checks"]} == {
        (attack, check)
        for attack in ("fc", "bp", UNION)
        for check in ("max_asr_above_baseline", "max_asr_relative_to_reference")
    }

    # The pre-trained reference is in the artifact store under references/, named by its key.
    key = reference["model"]["path"].removeprefix(AUTO_PREFIX)
    store = make_artifact_store(settings)
    cached = [f"references/shared/{key}/{name}" for name in ("model.safetensors", "manifest.json")]
    assert all(store.exists(item) for item in cached), cached
    root = settings.resolved_artifact_dir
    before = [stat_of(root / item) for item in cached]
    assert [entry.name for entry in (root / "references" / "shared").iterdir()] == [key]

    second = audited(client, tenant, worker, {"model_id": model_id, **AUDIT})
    again = second["reference"]
    assert again is not None and again["source"] == "auto"
    assert again["model"] == reference["model"]  # same key, same weights
    for name in ("fc", "bp"):
        assert again["attacks"][name]["rows"] == reference["attacks"][name]["rows"]
    # Reused, not trained and stored again: the cached files are the very same files.
    assert [stat_of(root / item) for item in cached] == before
    assert [entry.name for entry in (root / "references" / "shared").iterdir()] == [key]


def test_a_named_reference_and_no_reference(
    client: Any, make_tenant: Any, start_worker: Any, settings: Settings
) -> None:
    worker = start_worker()
    tenant = make_tenant("lab")
    model_id = pretrained(client, tenant, worker, "at", "digits-at")
    undefended_id = pretrained(client, tenant, worker, "none", "digits-none")

    named = audited(
        client, tenant, worker, {"model_id": model_id, "reference": undefended_id, **AUDIT}
    )
    reference = named["reference"]
    assert reference is not None and reference["source"] == "named"
    assert reference["model"]["path"] == f"/v1/models/{undefended_id}"
    assert reference["model"]["defense"] == "none" and named["model"]["defense"] == "at"
    assert set(named["comparison"]) == {"fc", "bp", UNION} and named["reference_note"] is None
    # The tenant stored no policy: Bulwark's default decides, and says so.
    assert named["verdict"]["policy_version"] is None
    # A named reference trains nothing, so nothing is cached.
    assert not (settings.resolved_artifact_dir / "references").exists()

    without = audited(client, tenant, worker, {"model_id": model_id, "reference": "none", **AUDIT})
    assert without["reference"] is None and without["comparison"] == {}
    assert without["reference_note"] == "no reference: the request asked for none"
    assert without["verdict"] is not None
    assert all(c["name"] != "max_asr_relative_to_reference" for c in without["verdict"]["checks"])


def test_a_reference_of_another_tenant_or_the_model_itself_is_a_422(
    client: Any, make_tenant: Any, clean_db: Engine
) -> None:
    tenant, other = make_tenant("lab"), make_tenant("rival")
    model_id = add_model_row(clean_db, tenant.id)
    theirs = add_model_row(clean_db, other.id, name="theirs")
    cases = [
        (theirs, f"no model {theirs} of yours"),
        (model_id, "another model than the audited one"),
        (uuid.uuid4(), "of yours to use as the reference"),
    ]
    for reference, words in cases:
        response = client.post(
            "/v1/jobs/audit",
            headers=tenant.headers,
            json={"model_id": str(model_id), **AUDIT, "reference": str(reference)},
        )
        assert response.status_code == 422, (reference, response.text)
        (error,) = problem_errors(response)
        assert error["loc"] == ["body", "reference"] and words in error["msg"], error
    # Refused before anything is written or queued.
    with Session(clean_db) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_a_sequential_audit_through_the_service_stops_at_the_first_decided_look(
    client: Any, make_tenant: Any, start_worker: Any
) -> None:
    """An audit request with ``overrides.sequential`` runs in rounds under the tenant's stored
    policy: a policy every result meets decides at the first of two looks, so half the
    instances are crafted, the report says so (its verdict at the per-look confidence), and the
    HTML page shows how it ran."""
    worker = start_worker()
    tenant = make_tenant("lab")
    stored = client.put("/v1/policy", headers=tenant.headers, json={"default": {"max_asr": 1.0}})
    assert stored.status_code == 201, stored.text
    model_id = pretrained(client, tenant, worker, "none", "digits-none")
    body = {
        **AUDIT,
        "model_id": model_id,
        "reference": "none",
        "targets_per_pair": 2,
        "overrides": {**AUDIT["overrides"], "sequential": True, "rounds": 2},
    }
    submitted = client.post("/v1/jobs/audit", headers=tenant.headers, json=body)
    assert submitted.status_code == 202, submitted.text
    job = wait_job(client, tenant, submitted.json()["id"], timeout=240)
    assert job["status"] == "succeeded", (job["error"], worker.output()[-3000:])
    report = client.get(job["report_url"], headers=tenant.headers).json()["body"]
    facts = report["sequential"]
    assert facts["rounds_planned"] == 2 and facts["rounds_run"] == 1
    assert facts["instances_planned"] == 4 and facts["instances_run"] == 2
    assert len(report["instances"]) == 2
    assert facts["stopped"].startswith("pass decided after round 1 of 2")
    assert facts["crafting_work"] < facts["crafting_work_full"]
    assert report["verdict"]["outcome"] == "pass"
    assert report["verdict"]["confidence"] == facts["look_confidence"] == 1 - 0.05 / 2
    assert report["verdict"]["policy_version"] == 1
    page = client.get(f"/v1/jobs/{job['id']}/report.html", headers=tenant.headers)
    assert page.status_code == 200, page.text
    assert "<dt>sequential</dt><dd>2 of 4 planned instances in 1 of 2 rounds" in page.text
    assert "; tenant policy v1.</p>" in page.text
