"""Usage: no index on ``usage.ended_at`` (issue 14).

Revision ID: 0008_usage_ended_at
Revises: 0007_policy
Create Date: 2026-11-27 10:30:00

Every reconcile pass moves ``ended_at`` of every open segment (one per sandbox) to the pass's time.
With an index on the column each pass rewrote one index entry per sandbox, and on PostgreSQL an
update of an indexed column can never be a heap-only (HOT) update, so the table and its indexes
grew by a row version per sandbox per pass until vacuum caught up. The only reader of the column is
``leasectl usage --since``, an occasional report over a table of one row per change of state: it
scans instead (``started_at`` keeps its index for ``--until``).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008_usage_ended_at"
down_revision: str | Sequence[str] | None = "0007_policy"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index(op.f("ix_usage_ended_at"), table_name="usage")


def downgrade() -> None:
    op.create_index(op.f("ix_usage_ended_at"), "usage", ["ended_at"], unique=False)
