"""The whole sandbox in the spec (issue 15): in-place update bookkeeping.

Revision ID: 0006_spec_fields
Revises: 0005_pools
Create Date: 2026-11-27 09:00:00

* ``lease_status.spec_fields``: per spec field a short digest of the value the lease's sandbox was
  created or last updated with (never the value), so ``plan`` can say which fields a change touches
  ("update labels in place" vs "replace: image changed").

* ``leases.rollout_requested_at``: `leasectl rollout` (or plain SQL) asks for the lease's sandbox to be
  replaced; a sandbox created before that time is replaced like after a spec change.

Columns are added in place (no table copy), so ``lease_overview`` needs no rebuild.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_spec_fields"
down_revision: str | Sequence[str] | None = "0005_pools"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("lease_status", sa.Column("spec_fields", sa.JSON(), nullable=True))
    op.add_column("leases", sa.Column("rollout_requested_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS lease_overview")
    with op.batch_alter_table("lease_status") as batch:
        batch.drop_column("spec_fields")
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("rollout_requested_at")
    op.execute("CREATE VIEW lease_overview AS " + _view_0005())


def _view_0005() -> str:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("20261127_0005_pools.py")
    spec = importlib.util.spec_from_file_location("leasectl_migration_0005", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.LEASE_OVERVIEW_SQL)
