"""Policy (issue 16): schedules on leases and pools, quotas, and the usage record.

Revision ID: 0007_policy
Revises: 0006_spec_fields
Create Date: 2026-11-27 07:00:00

* ``leases.schedule`` and ``pools.schedule``: JSON, NULL = no schedule. Added in place (no table
  copy), so the ``lease_overview`` view needs no rebuild.
* ``quotas``: limits per label value, per label (each value on its own) or for the whole instance.
* ``usage``: segments of observed state with resources, appended by the reconciler.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_policy"
down_revision: str | Sequence[str] | None = "0006_spec_fields"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_LIMITS = ("sandboxes", "cpu", "memory", "disk", "gpu")


def upgrade() -> None:
    op.add_column("leases", sa.Column("schedule", sa.JSON(), nullable=True))
    op.add_column("pools", sa.Column("schedule", sa.JSON(), nullable=True))
    op.create_table(
        "quotas",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("label", sa.String(length=63), server_default="", nullable=False),
        sa.Column("value", sa.String(length=255), server_default="", nullable=False),
        *(sa.Column(col, sa.Integer(), nullable=True) for col in _LIMITS),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("label <> '' OR value = ''", name=op.f("ck_quotas_value_needs_label")),
        *(
            sa.CheckConstraint(f"{col} IS NULL OR {col} >= 0", name=op.f(f"ck_quotas_{col}_non_negative"))
            for col in _LIMITS
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quotas")),
        sa.UniqueConstraint("label", "value", name=op.f("uq_quotas_label")),
    )
    op.create_table(
        "usage",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("lease_name", sa.String(length=63), nullable=False),
        sa.Column("sandbox_id", sa.String(length=128), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("labels", sa.JSON(), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("cpu", sa.Integer(), server_default="0", nullable=False),
        sa.Column("memory", sa.Integer(), server_default="0", nullable=False),
        sa.Column("disk", sa.Integer(), server_default="0", nullable=False),
        sa.Column("gpu", sa.Integer(), server_default="0", nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage")),
    )
    op.create_index("ix_usage_closed_lease_name", "usage", ["closed", "lease_name"], unique=False)
    op.create_index(op.f("ix_usage_started_at"), "usage", ["started_at"], unique=False)
    op.create_index(op.f("ix_usage_ended_at"), "usage", ["ended_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_usage_ended_at"), table_name="usage")
    op.drop_index(op.f("ix_usage_started_at"), table_name="usage")
    op.drop_index("ix_usage_closed_lease_name", table_name="usage")
    op.drop_table("usage")
    op.drop_table("quotas")
    # Columns dropped in place on both backends (SQLite >= 3.35), so the view stays as it is.
    op.drop_column("pools", "schedule")
    op.drop_column("leases", "schedule")
