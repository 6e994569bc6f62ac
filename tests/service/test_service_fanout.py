"""An audit fanned out across real worker processes: its attacks (on the model and on its
reference) run as ``audit-part`` jobs on any free worker, and its scoring run reports what the
same audit in one task reports; cancel reaches every part; a worker killed mid-part leaves an
audit that still finishes (worker.tasks ``execute_audit``, ``execute_audit_part``)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from servicekit import ROOT, WorkerProcess, settings_env, wait_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from common.models import Job, JobStatus
from common.settings import Settings

TERMINAL = {"succeeded", "failed", "cancelled"}
SWEEP_SECONDS = 1.0  # the kill test's workers sweep this often (the default is 30 s)


class Worker(WorkerProcess):
    """``bulwark worker`` with the settings that ``settings_env`` does not carry."""

    def __init__(self, settings: Settings, log: Path, *, fan_out: bool = True) -> None:
        self.log = log
        env = settings_env(settings) | {
            "BULWARK_AUDIT_FAN_OUT": str(fan_out).lower(),
            "BULWARK_AUDIT_FAN_OUT_MIN_WORK": "0",  # these audits are small: fan them out
            "BULWARK_SWEEP_INTERVAL_SECONDS": str(SWEEP_SECONDS),
            "OMP_NUM_THREADS": "1",  # two workers share this machine's cores
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bulwark.cli",
                "worker",
                "--loglevel=INFO",
                f"--hostname=fanout-{uuid.uuid4().hex[:6]}@%h",
            ],
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def ran(self, job_id: uuid.UUID) -> bool:
        """Whether a pool child of this worker claimed the job (``run_job``'s log line)."""
        return f"job {job_id} (audit-part) attempt" in self.output()


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Any:
    started: list[Worker] = []

    def start(*, fan_out: bool = True) -> Worker:
        worker = Worker(settings, tmp_path / f"worker-{len(started)}.log", fan_out=fan_out)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_job(client: Any, tenant: Any, job_id: str, timeout: float) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
        return job if job["status"] in TERMINAL else None

    result: dict[str, Any] = wait_for(finished, timeout=timeout, interval=0.5, what=job_id)
    return result


def pretrained_model(client: Any, tenant: Any, worker: Worker) -> str:
    job = client.post(
        "/v1/jobs/pretrain",
        headers=tenant.headers,
        json={
            "dataset": "digits",
            "arch": "convnet",
            "defense": "none",
            "recipe": "quick",
            "epochs": 1,
        },
    ).json()
    done = wait_job(client, tenant, job["id"], timeout=180)
    assert done["status"] == "succeeded", (done["error"], worker.output()[-3000:])
    return str(done["result_model_id"])


def audit_body(model_id: str, *, iterations: int, reference: str = "auto") -> dict[str, Any]:
    return {
        "model_id": model_id,
        "dataset": "digits",
        "attacks": ["fc", "bp"],
        "pairs": [[0, 7], [2, 1]],
        "targets_per_pair": 2,
        "iterations": iterations,
        "reference": reference,
        "overrides": {"retrain_epochs": 5, "retrain_milestones": [], "eval_images": 100},
    }


def parts_of(db: Any, audit_id: str) -> list[Job]:
    with Session(db) as session:
        return list(
            session.scalars(
                select(Job).where(Job.parent_id == uuid.UUID(audit_id)).order_by(Job.id)
            )
        )


def report_rows(client: Any, tenant: Any, job_id: str) -> dict[str, Any]:
    body = client.get(f"/v1/jobs/{job_id}/report", headers=tenant.headers).json()["body"]
    return {
        "model": {name: result["rows"] for name, result in body["attacks"].items()},
        "reference": {
            name: result["rows"] for name, result in body["reference"]["attacks"].items()
        },
        "union": body["union"],
    }


def test_an_audit_fans_out_across_two_workers_and_reports_as_one_task(
    client, make_tenant, workers, clean_db
) -> None:
    tenant = make_tenant("hub")
    first, second = workers(), workers()
    model_id = pretrained_model(client, tenant, first)
    audit = client.post(
        "/v1/jobs/audit", headers=tenant.headers, json=audit_body(model_id, iterations=40)
    ).json()
    done = wait_job(client, tenant, audit["id"], timeout=300)
    logs = first.output()[-2000:] + second.output()[-2000:]
    assert done["status"] == "succeeded", (done["error"], logs)
    assert done["progress"] == 1.0 and done["attempts"] == 1  # the wait gave its attempt back

    parts = parts_of(clean_db, audit["id"])
    names = sorted(part.spec["part"] for part in parts)
    assert names == sorted(
        f"{side}-{attack}-round0" for side in ("model", "reference") for attack in ("fc", "bp")
    )
    assert all(part.status == JobStatus.SUCCEEDED and part.attempts == 1 for part in parts)
    assert all(part.id == uuid.uuid5(uuid.UUID(audit["id"]), part.spec["part"]) for part in parts)
    # Each part's worker field names a pool child of one of the two workers, and both ran some.
    holders = {part.id: [w for w in (first, second) if w.ran(part.id)] for part in parts}
    assert all(len(found) == 1 for found in holders.values()), holders
    for part in parts:
        assert f"attempt 1 on {part.worker}" in holders[part.id][0].output()
    assert {id(found[0]) for found in holders.values()} == {id(first), id(second)}
    # The parts are internal: the tenant sees its pre-training and its audit only.
    listed = client.get("/v1/jobs", headers=tenant.headers).json()
    assert listed["total"] == 2 and audit["id"] in [job["id"] for job in listed["items"]]
    assert client.get(f"/v1/jobs/{parts[0].id}", headers=tenant.headers).status_code == 404
    fanned = report_rows(client, tenant, audit["id"])

    # The same audit in one task, on a worker with fan-out off, reports the same rows.
    first.stop()
    second.stop()
    single = workers(fan_out=False)
    again = client.post(
        "/v1/jobs/audit", headers=tenant.headers, json=audit_body(model_id, iterations=40)
    ).json()
    whole = wait_job(client, tenant, again["id"], timeout=300)
    assert whole["status"] == "succeeded", (whole["error"], single.output()[-3000:])
    assert parts_of(clean_db, again["id"]) == []
    assert report_rows(client, tenant, again["id"]) == fanned


def test_cancelling_a_fanned_out_audit_cancels_every_part(
    client, make_tenant, workers, clean_db
) -> None:
    tenant = make_tenant("hub")
    first, _second = workers(), workers()
    model_id = pretrained_model(client, tenant, first)
    audit = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json=audit_body(model_id, iterations=20_000, reference="none"),
    ).json()

    def both_crafting() -> bool:
        parts = parts_of(clean_db, audit["id"])
        return len(parts) == 2 and all(part.phase.startswith("craft") for part in parts)

    wait_for(both_crafting, timeout=120, what="both parts to craft")
    waiting = client.get(f"/v1/jobs/{audit['id']}", headers=tenant.headers).json()
    assert waiting["status"] == "running" and waiting["phase"] == "waiting for parts"
    response = client.post(f"/v1/jobs/{audit['id']}/cancel", headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"  # no worker held it: it ends at once
    asked = time.monotonic()

    def parts_ended() -> list[Job] | None:
        parts = parts_of(clean_db, audit["id"])
        return parts if all(part.status.finished for part in parts) else None

    parts = wait_for(parts_ended, timeout=60, what="the parts to stop")
    assert time.monotonic() - asked < 60
    assert [part.status for part in parts] == [JobStatus.CANCELLED] * 2
    report = client.get(f"/v1/jobs/{audit['id']}/report", headers=tenant.headers)
    assert report.status_code == 409


def test_a_worker_killed_mid_part_leaves_an_audit_that_still_finishes(
    client, make_tenant, workers, clean_db, settings
) -> None:
    tenant = make_tenant("hub")
    first, second = workers(), workers()
    model_id = pretrained_model(client, tenant, first)
    audit = client.post(
        "/v1/jobs/audit",
        headers=tenant.headers,
        json=audit_body(model_id, iterations=1500, reference="none"),
    ).json()

    def crafting_part() -> Job | None:
        parts = parts_of(clean_db, audit["id"])
        running = [p for p in parts if p.phase.startswith("craft") and p.progress < 0.5]
        return running[0] if running else None

    victim = wait_for(crafting_part, timeout=120, interval=0.1, what="a part crafting")
    holder = first if first.ran(victim.id) else second
    assert holder.ran(victim.id)
    holder.kill()  # its lease runs out; the other worker's sweep re-sends the part
    done = wait_job(client, tenant, audit["id"], timeout=300)
    survivor = second if holder is first else first
    assert done["status"] == "succeeded", (done["error"], survivor.output()[-3000:])
    parts = {part.id: part for part in parts_of(clean_db, audit["id"])}
    assert parts[victim.id].attempts == 2 and parts[victim.id].status == JobStatus.SUCCEEDED
    assert survivor.ran(victim.id)
    assert done["attempts"] == 1
    assert settings.lease_seconds + SWEEP_SECONDS < 30  # the take-over is quick at these


def waiting_audit(db: Any, tenant_id: uuid.UUID) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """An audit waiting for its two parts, as ``worker.tasks`` leaves it: running, held by no
    worker; one part running on a worker, one queued."""
    from common.models import utcnow

    audit_id = uuid.uuid4()
    parts = [uuid.uuid5(audit_id, name) for name in ("model-fc-round0", "model-bp-round0")]
    with Session(db) as session:
        session.add(
            Job(
                id=audit_id,
                tenant_id=tenant_id,
                kind="audit",
                spec={},
                status=JobStatus.RUNNING,
                phase="waiting for parts",
                attempts=0,
            )
        )
        session.flush()
        for part_id, (name, status) in zip(
            parts,
            [("model-fc-round0", JobStatus.RUNNING), ("model-bp-round0", JobStatus.QUEUED)],
            strict=True,
        ):
            session.add(
                Job(
                    id=part_id,
                    tenant_id=tenant_id,
                    kind="audit-part",
                    spec={"part": name},
                    status=status,
                    parent_id=audit_id,
                    worker="elsewhere:1" if status == JobStatus.RUNNING else None,
                    lease_expires_at=utcnow(),
                )
            )
        session.commit()
    return audit_id, parts


def test_a_failed_part_fails_its_audit_with_the_parts_message(
    make_tenant, clean_db, settings
) -> None:
    from common.artifacts import make_artifact_store
    from common.db import make_session_factory
    from worker.jobs import Resources, finish_job

    tenant = make_tenant("hub")
    audit_id, (failing, other) = waiting_audit(clean_db, tenant.id)
    resources = Resources(
        settings=settings,
        session_factory=make_session_factory(clean_db),
        store=make_artifact_store(settings),
    )
    finish_job(
        resources=resources,
        job_id=failing,
        status=JobStatus.FAILED,
        phase="failed",
        error="out of memory; resubmit with a smaller batch_size or model",
    )
    with Session(clean_db) as session:
        audit, queued = session.get(Job, audit_id), session.get(Job, other)
        assert audit is not None and queued is not None
        assert audit.status == JobStatus.FAILED and audit.finished_at is not None
        assert audit.error == (
            "part model-fc-round0: out of memory; resubmit with a smaller batch_size or model"
        )
        assert queued.status == JobStatus.CANCELLED  # the rest of the audit stops


def test_the_api_cancels_a_waiting_audit_at_once_and_hides_its_parts(
    client, make_tenant, clean_db
) -> None:
    tenant = make_tenant("hub")
    audit_id, (running, queued) = waiting_audit(clean_db, tenant.id)
    assert client.get(f"/v1/jobs/{running}", headers=tenant.headers).status_code == 404
    assert client.post(f"/v1/jobs/{running}/cancel", headers=tenant.headers).status_code == 404
    listed = client.get("/v1/jobs", headers=tenant.headers).json()
    assert [job["id"] for job in listed["items"]] == [str(audit_id)] and listed["total"] == 1
    response = client.post(f"/v1/jobs/{audit_id}/cancel", headers=tenant.headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    with Session(clean_db) as session:
        running_part, queued_part = session.get(Job, running), session.get(Job, queued)
        assert running_part is not None and queued_part is not None
        assert running_part.status == JobStatus.RUNNING and running_part.cancel_requested
        assert queued_part.status == JobStatus.CANCELLED


def test_only_an_audit_big_enough_and_not_sequential_fans_out(tmp_path) -> None:
    from common.specs import AuditJobCreate, resolve_audit
    from worker.tasks import fans_out

    spec = AuditJobCreate(
        model_id=uuid.uuid4(),
        dataset="digits",
        attacks=["fc", "bp"],
        pairs=[(0, 7)],
        targets_per_pair=2,
        iterations=10,
        reference="none",
    )
    small = resolve_audit(spec, model="model")
    settings = Settings(data_dir=tmp_path)
    work = 10 * 2 * small.max_poisons
    assert work < settings.audit_fan_out_min_work
    assert not fans_out(settings, small)  # a process per part would cost more than it saves
    assert fans_out(settings.model_copy(update={"audit_fan_out_min_work": work}), small)
    iterations = -(-settings.audit_fan_out_min_work // (2 * small.max_poisons))
    big = small.model_copy(update={"iterations": iterations})
    assert fans_out(settings, big)
    assert not fans_out(settings, big.model_copy(update={"sequential": True}))
    assert not fans_out(settings.model_copy(update={"audit_fan_out": False}), big)
    any_size = settings.model_copy(update={"audit_fan_out_min_work": 0})
    one_attack = big.model_copy(update={"attacks": ["bp"]})
    assert not fans_out(any_size, one_attack)  # one part: nothing to spread
    assert fans_out(any_size, one_attack.model_copy(update={"reference": "reference"}))
