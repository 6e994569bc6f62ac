"""The one way an audit's internal part jobs (kind ``audit-part``) are stopped with it: by
the API when a tenant cancels the audit, and by a worker when the audit ends."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from common.models import Job, JobStatus, utcnow

# The phase of an audit that gave its worker slot back while its parts run: held by no
# worker, it is cancelled at once rather than flagged.
WAITING_FOR_PARTS = "waiting for parts"


def stop_audit_parts(session: Session, audit_id: uuid.UUID, now: datetime | None = None) -> None:
    """Cancel the audit's queued parts at once and flag its running ones (each stops at its
    next progress step). Parts are internal: no webhook event. The caller commits."""
    now = now or utcnow()
    session.execute(
        update(Job)
        .where(Job.parent_id == audit_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.CANCELLED,
            phase="cancelled",
            cancel_requested=True,
            message="cancelled with its audit",
            finished_at=now,
            updated_at=now,
        )
    )
    session.execute(
        update(Job)
        .where(Job.parent_id == audit_id, Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True, updated_at=now)
    )
