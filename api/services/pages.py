"""A finished audit's report as pictures and one HTML page (``core.report_page``).

The poison grids are the PNGs the worker stored beside the report
(``reports/<job>/poisons/<attack>.png``); they are read through the artifact store and served
or inlined as they are, never decoded.
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from api.errors import NotFoundError
from api.services.jobs import get_report
from common.artifacts import ArtifactNotFoundError, ArtifactStore
from common.models import Tenant
from core.report import AuditReport, read_report
from core.report_page import asr_chart_svg, budget_chart_svg, render_report_html


def poisons_key(job_id: uuid.UUID, attack: str) -> str:
    return f"reports/{job_id}/poisons/{attack}.png"


def audit_report(*, session: Session, tenant: Tenant, job_id: uuid.UUID) -> AuditReport:
    """The tenant's finished audit report (404 for another tenant's job or a job kind without
    reports, 409 while it has none yet: ``api.services.jobs.get_report``)."""
    stored = get_report(session=session, tenant=tenant, job_id=job_id)
    return read_report(stored.body, newer_fields="ignore")


def _stored_png(
    store: ArtifactStore, job_id: uuid.UUID, report: AuditReport, attack: str
) -> bytes | None:
    key = poisons_key(job_id, attack)
    if attack not in report.attacks or key not in report.stored_artifacts:
        return None
    try:
        with store.open(key) as stream:
            return stream.read()
    except ArtifactNotFoundError:
        return None


def poison_png(
    *, session: Session, store: ArtifactStore, tenant: Tenant, job_id: uuid.UUID, attack: str
) -> bytes:
    report = audit_report(session=session, tenant=tenant, job_id=job_id)
    png = _stored_png(store, job_id, report, attack)
    if png is None:
        raise NotFoundError(
            f"no poison picture for attack {attack!r} in job {job_id}; the report's attacks are "
            f"{', '.join(report.attacks) or 'none'}",
            attacks=list(report.attacks),
        )
    return png


def asr_svg(*, session: Session, tenant: Tenant, job_id: uuid.UUID) -> str:
    return asr_chart_svg(audit_report(session=session, tenant=tenant, job_id=job_id))


def budget_svg(*, session: Session, tenant: Tenant, job_id: uuid.UUID) -> str:
    """The budget curve's chart; 404 when the audit swept no budget."""
    report = audit_report(session=session, tenant=tenant, job_id=job_id)
    if report.budget_curve is None:
        raise NotFoundError(
            f"audit job {job_id} has no budget curve: it was not asked for one (the audit "
            "request's budget, with deltas or poisons to sweep)"
        )
    return budget_chart_svg(report)


def report_html(
    *, session: Session, store: ArtifactStore, tenant: Tenant, job_id: uuid.UUID
) -> str:
    report = audit_report(session=session, tenant=tenant, job_id=job_id)
    pictures = {
        name: png
        for name in report.attacks
        if (png := _stored_png(store, job_id, report, name)) is not None
    }
    return render_report_html(report, pictures, title=f"Bulwark audit report, job {job_id}")
