"""/v1/jobs/{job_id}: a finished audit's report as an HTML page and as pictures (the ASR
chart, the budget curve, the poison grids)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from api.deps import CurrentTenant, SessionDep, StoreDep
from api.errors import problem_response_spec, problem_responses
from api.services import pages

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

TEXT = {"schema": {"type": "string"}}
BINARY = {"schema": {"type": "string", "format": "binary"}}
UNFINISHED = problem_responses(409)  # the audit has no report yet


@router.get(
    "/{job_id}/report.html",
    response_class=HTMLResponse,
    operation_id="getReportPage",
    summary="An audit's report as an HTML page",
    responses={200: {"content": {"text/html": TEXT}}, **UNFINISHED},
)
def report_page(
    job_id: uuid.UUID, session: SessionDep, store: StoreDep, tenant: CurrentTenant
) -> HTMLResponse:
    """The report as one self-contained HTML page: the numbers, the ASR chart, and the poison
    grids inlined as ``data:`` URIs (the page works saved, without the key)."""
    html = pages.report_html(session=session, store=store, tenant=tenant, job_id=job_id)
    return HTMLResponse(html)


@router.get(
    "/{job_id}/pictures/asr.svg",
    response_class=Response,
    operation_id="getAsrChart",
    summary="An audit's ASR chart (SVG)",
    responses={200: {"content": {"image/svg+xml": TEXT}}, **UNFINISHED},
)
def asr_chart(job_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> Response:
    """One bar per attack with its 95% Wilson interval, the baseline rate as a marker."""
    svg = pages.asr_svg(session=session, tenant=tenant, job_id=job_id)
    return Response(svg, media_type="image/svg+xml")


@router.get(
    "/{job_id}/pictures/budget.svg",
    response_class=Response,
    operation_id="getBudgetChart",
    summary="An audit's budget curve (SVG)",
    responses={
        200: {"content": {"image/svg+xml": TEXT}},
        404: {
            **problem_response_spec(404),
            "description": "no such audit for this tenant, or the audit has no budget curve",
        },
        **UNFINISHED,
    },
)
def budget_chart(job_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> Response:
    """The budget curve: ASR against delta and against poisons per instance, the model's line
    and the reference's, with 95% Wilson whiskers (404 when the audit swept no budget)."""
    svg = pages.budget_svg(session=session, tenant=tenant, job_id=job_id)
    return Response(svg, media_type="image/svg+xml")


@router.get(
    "/{job_id}/pictures/{attack}.png",
    response_class=Response,
    operation_id="getPoisonGrid",
    summary="An attack's poison grid (PNG)",
    responses={200: {"content": {"image/png": BINARY}}, **UNFINISHED},
)
def poison_grid(
    job_id: uuid.UUID, attack: str, session: SessionDep, store: StoreDep, tenant: CurrentTenant
) -> Response:
    """The attack's poison grid as stored: base | poison ... | target, one row per instance."""
    png = pages.poison_png(
        session=session, store=store, tenant=tenant, job_id=job_id, attack=attack
    )
    return Response(png, media_type="image/png")
