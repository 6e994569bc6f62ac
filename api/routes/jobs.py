"""/v1/jobs: submit pre-training and audit jobs, watch, cancel, read reports."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from api.deps import (
    BearerDep,
    CeleryDep,
    CurrentTenant,
    SessionDep,
    SettingsDep,
    SigningKeyDep,
    StoreDep,
    authenticate_request,
)
from api.errors import problem_responses
from api.schemas import MAX_OFFSET, JobPublic, JobsPage, ReportPublic, SignaturePublic
from api.services import jobs as job_service
from api.services.jobs import SortOrder
from catalog import JobKindName
from common.models import JobStatus
from common.signing import sign_report
from common.specs import AuditJobCreate, PretrainJobCreate
from core.report import read_report
from core.verdict import Outcome

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(max_length=200, description="a retried POST with the same key returns the same job"),
]
Order = Annotated[
    SortOrder, Query(description="by creation time: desc (newest first, the default) or asc")
]
LOCATION = {"Location": {"description": "the job's URL", "schema": {"type": "string"}}}
SUBMITTED: dict[int | str, dict[str, Any]] = {
    202: {"description": "The job, queued", "headers": LOCATION}
}


def submitted(job: JobPublic, response: Response) -> JobPublic:
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.post(
    "/pretrain",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="createPretrainJob",
    summary="Submit a pre-training job",
    responses={**SUBMITTED, **problem_responses(404, 409)},
)
def submit_pretrain(
    spec: PretrainJobCreate,
    response: Response,
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
    return submitted(job_service.job_public(job), response)


@router.post(
    "/audit",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="createAuditJob",
    summary="Submit an audit job",
    responses={**SUBMITTED, **problem_responses(404, 409)},
)
def submit_audit(
    spec: AuditJobCreate,
    response: Response,
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
    return submitted(job_service.job_public(job), response)


@router.get("", operation_id="listJobs", summary="List jobs")
def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    kind: JobKindName | None = None,
    status: JobStatus | None = None,
    verdict: Annotated[
        Outcome | None,
        Query(description="only audits whose report's policy verdict has this outcome"),
    ] = None,
    order: Order = "desc",
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobsPage:
    jobs, total = job_service.list_jobs(
        session=session,
        tenant=tenant,
        kind=kind,
        status=status,
        verdict=verdict,
        order=order,
        limit=limit,
        offset=offset,
    )
    return JobsPage(
        items=[job_service.job_public(j) for j in jobs], total=total, limit=limit, offset=offset
    )


@router.get(
    "/{job_id}",
    operation_id="getJob",
    summary="Read a job",
    response_model=JobPublic,
    responses={
        200: {
            "description": "The job",
            "headers": {"ETag": {"description": "of this state", "schema": {"type": "string"}}},
        },
        304: {"description": "Not modified: the job is still as the `If-None-Match` ETag"},
    },
)
async def get_job(
    request: Request,
    job_id: uuid.UUID,
    _: BearerDep,
    if_none_match: Annotated[
        str | None,
        Header(max_length=2000, description="an ETag of an earlier answer: 304 while unchanged"),
    ] = None,
) -> Response:
    """The job's state; its ``ETag`` changes whenever anything in it does, so a poller that
    sends ``If-None-Match`` gets an empty 304 until then."""
    # Pollers are most of the API's traffic, so a poll is the cheap path: async, with its
    # blocking work (limits, key, the job's row) in one thread-pool hop on one connection,
    # where sync dependencies would take four hops; the key and an unchanged job's body come
    # from this process's caches (KeyCache, JobBodyCache).
    body = await run_in_threadpool(read_job_for_request, request, job_id)
    etag = job_service.job_etag(body)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if job_service.etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def read_job_for_request(request: Request, job_id: uuid.UUID) -> bytes:
    """The request's tenant and its job's public JSON, read on one connection that goes
    back to the pool before the answer is built and sent."""
    # Autocommit: the reads need no transaction of their own, which saves its BEGIN and
    # ROLLBACK round trips (authentication's rare write, last_used_at, commits by itself).
    with request.app.state.read_session_factory() as session:
        tenant = authenticate_request(request, session, cached=True)
        return job_service.job_body(
            session=session, tenant=tenant, job_id=job_id, cache=request.app.state.job_bodies
        )


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteJob",
    summary="Delete a finished job",
    responses=problem_responses(409),
)
def delete_job(
    job_id: uuid.UUID, session: SessionDep, store: StoreDep, tenant: CurrentTenant
) -> Response:
    """Remove a finished job's artifacts (report pictures, poisons) and keep its row as a
    tombstone: reads of it and of its report answer 404, a repeated DELETE is 204 too.
    Refused (409) while it is queued or running: cancel it first."""
    job_service.delete_job(session=session, store=store, tenant=tenant, job_id=job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{job_id}/cancel",
    operation_id="cancelJob",
    summary="Cancel a job",
    responses=problem_responses(409),
)
def cancel_job(job_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    """A queued job is cancelled at once; a running one stops at its next progress step; a
    finished one is 409, and so is a dataset job (delete its dataset instead)."""
    return job_service.job_public(
        job_service.cancel_job(session=session, tenant=tenant, job_id=job_id)
    )


@router.get(
    "/{job_id}/report",
    operation_id="getReport",
    summary="Read an audit's signed report",
    responses=problem_responses(409),
)
def get_report(
    job_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant, key: SigningKeyDep
) -> ReportPublic:
    """The audit's report, with the deployment's signature over its ``body``."""
    report = job_service.get_report(session=session, tenant=tenant, job_id=job_id)
    body = read_report(report.body, newer_fields="ignore")
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
