"""lease_status.observed_since: when the recorded sandbox entered its observed state.

Revision ID: 0012_observed_since
Revises: 0011_hot_updates
Create Date: 2026-11-27 20:00:00

Daytona leaves a sandbox in a transitional state (``starting``, ``creating``, ...) as long as the
change it waits for is pending, and refuses every other change meanwhile; a runner that went away
can keep it there. The planner waited without saying for how long. The column lets it say so (the
lease's message reports the sandbox stuck past ``controller.stuck_after_seconds``) and lets an
operator ask with SQL. Existing rows start with NULL: the next pass sets it to the moment it
looks (how long a state lasted before the upgrade is not known).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_observed_since"
down_revision: str | Sequence[str] | None = "0011_hot_updates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("lease_status", sa.Column("observed_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # In place on both backends (SQLite 3.35 and later drop a column without copying the table, so
    # lease_overview, which does not read this column, stays as it is).
    op.execute("ALTER TABLE lease_status DROP COLUMN observed_since")
