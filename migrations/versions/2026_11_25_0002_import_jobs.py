"""Jobs of kind "import": torch .pt uploads converted to safetensors by a worker.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 14:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# jobs.kind is a VARCHAR with a CHECK constraint (native_enum=False): widen the constraint.
CONSTRAINT = "job_kind"


def _replace_kind_check(kinds: tuple[str, ...]) -> None:
    listed = ", ".join(f"'{kind}'" for kind in kinds)
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_constraint(op.f(f"ck_jobs_{CONSTRAINT}"), type_="check")
        batch_op.create_check_constraint(CONSTRAINT, f"kind IN ({listed})")


def upgrade() -> None:
    _replace_kind_check(("pretrain", "audit", "import"))


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind = 'import'")
    _replace_kind_check(("pretrain", "audit"))
