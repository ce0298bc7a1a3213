"""executions: retries of what never started, the ``unknown`` state, session commands, ordering.

Revision ID: 0004_exec_queue
Revises: 0003
Create Date: 2026-11-27 05:00:00

New columns: ``attempts`` (how many times the row was tried and provably did not start),
``attempt_log`` (JSON list of ``{"at", "reason"}``, one per such attempt), ``next_attempt_at`` (the
row's back-off), ``session_id`` and ``command_id`` (the Daytona session command the row runs as, so
another worker can re-attach to it) and ``ordered`` (false: the row does not wait for earlier rows
of its lease). The state CHECK gains ``unknown`` (the command may or may not have run). On SQLite
the CHECK can only change by copying the table (batch mode); ``lease_overview`` is dropped around it
and created again from the SQL frozen in revision 0001, as in 0003.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0004_exec_queue"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = ("queued", "running", "succeeded", "failed", "timed_out", "error", "cancelled", "interrupted")
_AFTER = (*_BEFORE, "unknown")


def _check(values: tuple[str, ...]) -> str:
    return f"state IN ({', '.join(repr(v) for v in values)})"


def _view_sql() -> str:
    """The view SQL frozen in revision 0001 (unchanged by this revision)."""
    path = Path(__file__).with_name("20261126_0001_initial_schema.py")
    spec = importlib.util.spec_from_file_location("leasectl_migration_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.LEASE_OVERVIEW_SQL)


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS lease_overview")
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("attempt_log", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("session_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("command_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("ordered", sa.Boolean(), server_default=sa.true(), nullable=False))
        batch.drop_constraint("state", type_="check")
        batch.create_check_constraint("state", _check(_AFTER))
        batch.create_index("ix_executions_lease_name_state", ["lease_name", "state"])
    op.execute("CREATE VIEW lease_overview AS " + _view_sql())


def downgrade() -> None:
    op.execute("UPDATE executions SET state = 'interrupted' WHERE state = 'unknown'")
    op.execute("DROP VIEW IF EXISTS lease_overview")
    with op.batch_alter_table("executions") as batch:
        batch.drop_index("ix_executions_lease_name_state")
        batch.drop_constraint("state", type_="check")
        batch.create_check_constraint("state", _check(_BEFORE))
        for column in ("ordered", "command_id", "session_id", "next_attempt_at", "attempt_log", "attempts"):
            batch.drop_column(column)
    op.execute("CREATE VIEW lease_overview AS " + _view_sql())
