"""The whole sandbox in the spec (issue 15): in-place update bookkeeping.

Revision ID: 0006_spec_fields
Revises: 0005_pools
Create Date: 2026-11-27 09:00:00

* ``lease_status.spec_fields``: per spec field a short digest of the value the lease's sandbox was
  created or last updated with (never the value), so ``plan`` can say which fields a change touches
  ("update labels in place" vs "replace: image changed").

* ``leases.rollout_requested_at``: `leasectl rollout` (or plain SQL) asks for the lease's sandbox to be
  replaced; a sandbox created before that time is replaced like after a spec change.

* The whole sandbox in ``leases`` (NULL = Daytona's default): ``os_user``, ``public``,
  ``network_block_all``, ``network_allow_list`` and ``domain_allow_list`` (JSON lists), ``gpu_type``,
  ``spot``, ``auto_pause_interval``, ``ephemeral`` and ``secrets`` (JSON:
  env variable -> Daytona secret name), ``volumes`` (JSON: the mounts), ``build`` (JSON: Dockerfile content and context digests). Unset, they are left out of the spec hashes, so no existing
  sandbox is replaced by the upgrade.

* ``volumes``: the Daytona volumes leasectl manages (operator-owned: name, desired state).

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


_LEASE_COLUMNS = (
    ("os_user", sa.String(length=32)),
    ("public", sa.Boolean()),
    ("network_block_all", sa.Boolean()),
    ("network_allow_list", sa.JSON()),
    ("domain_allow_list", sa.JSON()),
    ("gpu_type", sa.String(length=32)),
    ("spot", sa.Boolean()),
    ("auto_pause_interval", sa.Integer()),
    ("ephemeral", sa.Boolean()),
    ("secrets", sa.JSON()),
    ("volumes", sa.JSON()),
    ("build", sa.JSON()),
)


def upgrade() -> None:
    op.add_column("lease_status", sa.Column("spec_fields", sa.JSON(), nullable=True))
    op.add_column("leases", sa.Column("rollout_requested_at", sa.DateTime(timezone=True), nullable=True))
    for name, kind in _LEASE_COLUMNS:
        op.add_column("leases", sa.Column(name, kind, nullable=True))
    op.create_table(
        "volumes",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("desired_state", sa.String(length=16), server_default="present", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("desired_state IN ('present', 'absent')", name=op.f("ck_volumes_desired_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_volumes")),
        sa.UniqueConstraint("name", name=op.f("uq_volumes_name")),
    )


def downgrade() -> None:
    op.drop_table("volumes")
    op.execute("DROP VIEW IF EXISTS lease_overview")
    with op.batch_alter_table("lease_status") as batch:
        batch.drop_column("spec_fields")
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("rollout_requested_at")
        for name, _ in reversed(_LEASE_COLUMNS):
            batch.drop_column(name)
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
