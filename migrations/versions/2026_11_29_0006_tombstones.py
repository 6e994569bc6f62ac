"""Tombstones for models and jobs: ``deleted_at``.

``DELETE /v1/models/{id}`` and ``DELETE /v1/jobs/{id}`` remove the files and keep the row
with its deletion time, as datasets do (0004): reads answer 404, a repeated DELETE is 204, and
the rows that name a deleted model or job keep their ids.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
