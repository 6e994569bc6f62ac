"""Job kinds from the catalog, and the resolved config of each job.

``jobs.kind`` loses its CHECK constraint and becomes a VARCHAR(32) checked in code against
``catalog.JOB_KINDS``, so a new kind of job needs no migration. ``jobs.config`` holds the core
config a pre-training or audit request resolved to at submission.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KIND_CHECK = "job_kind"  # ck_jobs_job_kind under the naming convention
KINDS_BEFORE = ("pretrain", "audit", "import")


def upgrade() -> None:
    # Batch mode: SQLite rebuilds the table; Postgres alters it in place.
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_constraint(op.f(f"ck_jobs_{KIND_CHECK}"), type_="check")
        batch_op.alter_column(
            "kind",
            existing_type=sa.String(length=16),
            type_=sa.String(length=32),
            existing_nullable=False,
        )
        batch_op.add_column(sa.Column("config", sa.JSON(), nullable=True))


def downgrade() -> None:
    listed = ", ".join(f"'{kind}'" for kind in KINDS_BEFORE)
    # Jobs of kinds added since cannot be kept under the old constraint.
    op.execute(f"DELETE FROM jobs WHERE kind NOT IN ({listed})")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("config")
        batch_op.alter_column(
            "kind",
            existing_type=sa.String(length=32),
            type_=sa.String(length=16),
            existing_nullable=False,
        )
        batch_op.create_check_constraint(KIND_CHECK, f"kind IN ({listed})")
