"""lease_status.phase: add Blocked (waiting on quota or capacity) and Idle (auto-stopped on purpose).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 04:00:00

Only the CHECK constraint changes. On SQLite the constraint can only change by copying the table
(batch mode), and SQLite refuses to rename a table that a view reads, so ``lease_overview`` is dropped
first and created again from the SQL frozen in revision 0001 (the view itself does not change here).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BEFORE = (
    "Pending",
    "Provisioning",
    "Ready",
    "Stopping",
    "Stopped",
    "Archiving",
    "Archived",
    "Deleting",
    "Deleted",
    "Error",
    "Failed",
    "Paused",
)
_AFTER = (*_BEFORE, "Blocked", "Idle")


def _check(values: tuple[str, ...]) -> str:
    return f"phase IN ({', '.join(repr(v) for v in values)})"


def _view_sql() -> str:
    """The view SQL frozen in revision 0001 (unchanged by this revision)."""
    path = Path(__file__).with_name("20261126_0001_initial_schema.py")
    spec = importlib.util.spec_from_file_location("leasectl_migration_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.LEASE_OVERVIEW_SQL)


def _swap(values: tuple[str, ...]) -> None:
    op.execute("DROP VIEW IF EXISTS lease_overview")
    with op.batch_alter_table("lease_status") as batch:
        batch.drop_constraint("phase", type_="check")
        batch.create_check_constraint("phase", _check(values))
    op.execute("CREATE VIEW lease_overview AS " + _view_sql())


def upgrade() -> None:
    _swap(_AFTER)


def downgrade() -> None:
    op.execute("UPDATE lease_status SET phase = 'Error' WHERE phase IN ('Blocked', 'Idle')")
    _swap(_BEFORE)
