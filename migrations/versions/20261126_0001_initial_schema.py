"""Initial schema: leases, lease_status, executions, events, orphan_sightings, leader_election,
and the lease_overview view.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 18:11:08.287191
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Frozen copy of models.views.LEASE_OVERVIEW_SQL at this revision (a later change gets a new revision).
LEASE_OVERVIEW_SQL = """
SELECT
    l.name AS name,
    l.desired_state AS desired_state,
    l.paused AS paused,
    l.expires_at AS expires_at,
    COALESCE(s.phase, 'Pending') AS phase,
    s.observed_state AS observed_state,
    s.sandbox_id AS sandbox_id,
    s.sandbox_name AS sandbox_name,
    s.message AS message,
    s.failures AS failures,
    s.next_attempt_at AS next_attempt_at,
    s.ready_at AS ready_at,
    s.workspace_path AS workspace_path,
    s.last_reconciled_at AS last_reconciled_at,
    l.created_at AS created_at,
    l.updated_at AS updated_at,
    s.updated_at AS status_updated_at
FROM leases l
LEFT JOIN lease_status s ON s.lease_name = l.name
"""


revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("lease_name", sa.String(length=63), nullable=True),
        sa.Column("sandbox_id", sa.String(length=128), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("controller_id", sa.String(length=128), nullable=True),
        sa.Column("pass_id", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_events_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_events_lease_name"), ["lease_name"], unique=False)

    op.create_table(
        "executions",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("lease_name", sa.String(length=63), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.Column("cwd", sa.String(length=1024), nullable=True),
        sa.Column("env", sa.JSON(), nullable=True),
        sa.Column("stdin", sa.LargeBinary(), nullable=True),
        sa.Column("timeout_seconds", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("output_truncated", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("sandbox_id", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'timed_out', 'error', 'cancelled', 'interrupted')",
            name=op.f("ck_executions_state"),
        ),
        sa.CheckConstraint(
            "timeout_seconds IS NULL OR timeout_seconds > 0", name=op.f("ck_executions_timeout_positive")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executions")),
    )
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_executions_lease_name"), ["lease_name"], unique=False)
        batch_op.create_index("ix_executions_state_id", ["state", "id"], unique=False)

    op.create_table(
        "leader_election",
        sa.Column("instance", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=True),
        sa.Column("term", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("instance", name=op.f("pk_leader_election")),
    )
    op.create_table(
        "lease_status",
        sa.Column("lease_name", sa.String(length=63), nullable=False),
        sa.Column("sandbox_id", sa.String(length=128), nullable=True),
        sa.Column("sandbox_name", sa.String(length=128), nullable=True),
        sa.Column("observed_state", sa.String(length=32), nullable=True),
        sa.Column("phase", sa.String(length=16), server_default="Pending", nullable=False),
        sa.Column("spec_hash", sa.String(length=64), nullable=True),
        sa.Column("failed_spec_hash", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("workspace_path", sa.String(length=1024), nullable=True),
        sa.Column("create_attempt_name", sa.String(length=128), nullable=True),
        sa.Column("create_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_reconciled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(
            "phase IN ('Pending', 'Provisioning', 'Ready', 'Stopping', 'Stopped', 'Archiving', 'Archived', 'Deleting', 'Deleted', 'Error', 'Failed', 'Paused')",
            name=op.f("ck_lease_status_phase"),
        ),
        sa.PrimaryKeyConstraint("lease_name", name=op.f("pk_lease_status")),
    )
    op.create_table(
        "leases",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("desired_state", sa.String(length=16), server_default="running", nullable=False),
        sa.Column("snapshot", sa.String(length=255), nullable=True),
        sa.Column("image", sa.String(length=1024), nullable=True),
        sa.Column("target", sa.String(length=64), nullable=True),
        sa.Column("language", sa.String(length=16), nullable=True),
        sa.Column("cpu", sa.Integer(), nullable=True),
        sa.Column("memory", sa.Integer(), nullable=True),
        sa.Column("disk", sa.Integer(), nullable=True),
        sa.Column("gpu", sa.Integer(), nullable=True),
        sa.Column("env", sa.JSON(), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("labels", sa.JSON(), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("auto_stop_interval", sa.Integer(), nullable=True),
        sa.Column("auto_archive_interval", sa.Integer(), nullable=True),
        sa.Column("auto_delete_interval", sa.Integer(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paused", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(
            "desired_state IN ('running', 'stopped', 'archived', 'absent')",
            name=op.f("ck_leases_desired_state"),
        ),
        sa.CheckConstraint(
            "language IS NULL OR language IN ('python', 'typescript', 'javascript')",
            name=op.f("ck_leases_language"),
        ),
        sa.CheckConstraint(
            "auto_archive_interval IS NULL OR auto_archive_interval >= 0", name=op.f("ck_leases_auto_archive")
        ),
        sa.CheckConstraint(
            "auto_delete_interval IS NULL OR auto_delete_interval >= -1", name=op.f("ck_leases_auto_delete")
        ),
        sa.CheckConstraint(
            "auto_stop_interval IS NULL OR auto_stop_interval >= 0", name=op.f("ck_leases_auto_stop")
        ),
        sa.CheckConstraint("cpu IS NULL OR cpu > 0", name=op.f("ck_leases_cpu_positive")),
        sa.CheckConstraint("disk IS NULL OR disk > 0", name=op.f("ck_leases_disk_positive")),
        sa.CheckConstraint("gpu IS NULL OR gpu > 0", name=op.f("ck_leases_gpu_positive")),
        sa.CheckConstraint(
            "image IS NOT NULL OR (cpu IS NULL AND memory IS NULL AND disk IS NULL AND gpu IS NULL)",
            name=op.f("ck_leases_resources_need_image"),
        ),
        sa.CheckConstraint("length(name) BETWEEN 1 AND 63", name=op.f("ck_leases_name_length")),
        sa.CheckConstraint("memory IS NULL OR memory > 0", name=op.f("ck_leases_memory_positive")),
        sa.CheckConstraint("snapshot IS NULL OR image IS NULL", name=op.f("ck_leases_snapshot_xor_image")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leases")),
        sa.UniqueConstraint("name", name=op.f("uq_leases_name")),
    )
    op.create_table(
        "orphan_sightings",
        sa.Column("sandbox_id", sa.String(length=128), nullable=False),
        sa.Column("sandbox_name", sa.String(length=128), nullable=True),
        sa.Column("lease_label", sa.String(length=63), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sandbox_id", name=op.f("pk_orphan_sightings")),
    )

    op.execute("CREATE VIEW lease_overview AS " + LEASE_OVERVIEW_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS lease_overview")
    op.drop_table("orphan_sightings")
    op.drop_table("leases")
    op.drop_table("lease_status")
    op.drop_table("leader_election")
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index("ix_executions_state_id")
        batch_op.drop_index(batch_op.f("ix_executions_lease_name"))

    op.drop_table("executions")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_lease_name"))
        batch_op.drop_index(batch_op.f("ix_events_at"))

    op.drop_table("events")
