"""/v1/jobs: submit pre-training and audit jobs, watch, cancel, read reports."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, status

from api.deps import CeleryDep, CurrentTenant, SessionDep, SettingsDep, SigningKeyDep
from api.schemas import JobPublic, JobsPage, ReportPublic, SignaturePublic
from api.services import jobs as job_service
from catalog import JobKindName
from common.models import JobStatus
from common.signing import sign_report
from common.specs import AuditJobCreate, PretrainJobCreate
from core.report import AuditReport

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(max_length=200, description="a retried POST with the same key returns the same job"),
]


@router.post("/pretrain", status_code=status.HTTP_202_ACCEPTED)
def submit_pretrain(
    spec: PretrainJobCreate,
    session: SessionDep,
    celery: CeleryDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    job = job_service.submit_pretrain(
        session=session,
        celery=celery,
        settings=settings,
        tenant=tenant,
        spec=spec,
        idempotency_key=idempotency_key,
    )
    return job_service.job_public(job)


@router.post("/audit", status_code=status.HTTP_202_ACCEPTED)
def submit_audit(
    spec: AuditJobCreate,
    session: SessionDep,
    celery: CeleryDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    job = job_service.submit_audit(
        session=session,
        celery=celery,
        settings=settings,
        tenant=tenant,
        spec=spec,
        idempotency_key=idempotency_key,
    )
    return job_service.job_public(job)


@router.get("")
def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    kind: JobKindName | None = None,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobsPage:
    jobs, total = job_service.list_jobs(
        session=session, tenant=tenant, kind=kind, status=status, limit=limit, offset=offset
    )
    return JobsPage(
        items=[job_service.job_public(j) for j in jobs], total=total, limit=limit, offset=offset
    )


@router.get("/{job_id}")
def get_job(job_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    return job_service.job_public(
        job_service.get_job(session=session, tenant=tenant, job_id=job_id)
    )


@router.post("/{job_id}/cancel")
def cancel_job(job_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    return job_service.job_public(
        job_service.cancel_job(session=session, tenant=tenant, job_id=job_id)
    )


@router.get("/{job_id}/report")
def get_report(
    job_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant, key: SigningKeyDep
) -> ReportPublic:
    """The audit's report, with the deployment's signature over its ``body``."""
    report = job_service.get_report(session=session, tenant=tenant, job_id=job_id)
    body = AuditReport.model_validate(report.body)
    # Signed as served: the body's JSON form is what the client holds and checks.
    signature = sign_report(body.model_dump(mode="json"), key)
    return ReportPublic(
        id=report.id,
        job_id=report.job_id,
        model_id=report.model_id,
        created_at=report.created_at,
        body=body,
        signature=SignaturePublic.model_validate(signature),
    )
