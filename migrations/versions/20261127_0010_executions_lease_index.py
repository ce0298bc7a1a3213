"""Executions: no single-column index on ``lease_name`` (issue 14).

Revision ID: 0010_executions_lease_index
Revises: 0009_queued_index
Create Date: 2026-11-27 17:00:00

``ix_executions_lease_name_state`` (``lease_name``, ``state``) already answers every lookup by
lease (``executions --lease``, the per-lease order of the queue), so ``ix_executions_lease_name``
only cost writes: each command changes its row's ``state`` twice (claimed, then finished), and on
PostgreSQL such an update is never heap-only, so every index of the table gets a new entry each
time. tests/unit/test_schema_indexes.py refuses an index that another one's leading columns cover.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010_executions_lease_index"
down_revision: str | Sequence[str] | None = "0009_queued_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index(op.f("ix_executions_lease_name"), table_name="executions")


def downgrade() -> None:
    op.create_index(op.f("ix_executions_lease_name"), "executions", ["lease_name"], unique=False)
