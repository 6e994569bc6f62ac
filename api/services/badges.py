"""A model's verdict badge: the outcome of its newest report that has a verdict."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services.models import get_model
from common.models import Job, Report, Tenant
from core.badge import verdict_badge_svg


def newest_outcome(*, session: Session, model_id: uuid.UUID) -> str | None:
    """The verdict outcome of the model's newest report that has one (of a job not deleted),
    or None. Only the outcome is read from the database, not the report bodies."""
    outcome = Report.body[("verdict", "outcome")].as_string()
    return session.scalar(
        select(outcome)
        .join(Job, Job.id == Report.job_id)
        .where(Report.model_id == model_id, outcome.is_not(None), Job.deleted_at.is_(None))
        .order_by(Report.created_at.desc())
        .limit(1)
    )


def model_badge(*, session: Session, tenant: Tenant, model_id: uuid.UUID) -> str:
    """The tenant's model's badge as SVG; another tenant's model or a missing one is a 404."""
    model = get_model(session=session, tenant=tenant, model_id=model_id)
    return verdict_badge_svg(newest_outcome(session=session, model_id=model.id))
