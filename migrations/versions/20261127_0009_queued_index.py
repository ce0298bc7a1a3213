"""Executions: an index of the queued rows in claim order (issue 14).

Revision ID: 0009_queued_index
Revises: 0008_usage_ended_at
Create Date: 2026-11-27 13:40:00

The dispatcher's claim takes the oldest queued rows (``ORDER BY created_at, id LIMIT n``). Without
an index in that order PostgreSQL read, joined and sorted every queued row for each claim, so a
claim's cost grew with the queue (about 0.7 ms at 400 queued rows, on a path every command takes).
A partial index holds only queued rows: the claim walks it in order and stops after ``n``, and a
row leaves it when it is claimed (the history of finished rows never enters it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_queued_index"
down_revision: str | Sequence[str] | None = "0008_usage_ended_at"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_QUEUED = sa.text("state = 'queued'")


def upgrade() -> None:
    op.create_index(
        "ix_executions_queued",
        "executions",
        ["created_at", "id"],
        unique=False,
        postgresql_where=_QUEUED,
        sqlite_where=_QUEUED,
    )


def downgrade() -> None:
    op.drop_index("ix_executions_queued", table_name="executions")
