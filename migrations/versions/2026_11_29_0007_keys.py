"""API keys as HMAC-SHA256 with a server secret, and when each key was last used.

``hash_scheme`` says how ``key_hash`` was made: ``sha256`` (every key before this revision,
the server default here) or ``hmac-sha256`` (HMAC with ``BULWARK_KEY_SECRET``). An old key
keeps working: it is verified by its sha256 once and its row is rewritten to the HMAC then
(``api.services.tenants.authenticate``). ``revoked_at`` exists since 0001.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 22:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("hash_scheme", sa.String(length=16), server_default="sha256", nullable=False)
        )
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("last_used_at")
        batch_op.drop_column("hash_scheme")
