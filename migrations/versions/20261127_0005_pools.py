"""Warm pools: the ``pools`` table, pool and claim columns on ``leases``, wake-up on change.

Revision ID: 0005_pools
Revises: 0004_exec_queue
Create Date: 2026-11-27 04:20:00

* ``pools``: one row per pool (template, min_ready, max_size, claim_ttl_seconds).
* ``leases``: ``pool`` (member of), ``claimed_by``, ``claimed_at``, ``claim_expires_at``,
  ``released_at``. Columns are added in place (no table copy), so the view needs no rebuild for
  them; it is recreated only to show ``pool`` and ``claimed_by``.
* ``change_counter``: one row; on SQLite, triggers on ``leases`` and ``pools`` bump it so the daemon
  notices a change within a few hundred milliseconds. On PostgreSQL the NOTIFY trigger of 0002 gets
  a twin on ``pools``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_pools"
down_revision: str | Sequence[str] | None = "0004_exec_queue"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of models.views.LEASE_OVERVIEW_SQL at this revision.
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
    s.updated_at AS status_updated_at,
    l.pool AS pool,
    l.claimed_by AS claimed_by
FROM leases l
LEFT JOIN lease_status s ON s.lease_name = l.name
"""

_CLAIM_COLUMNS = ("claimed_by", "claimed_at", "claim_expires_at", "released_at")


def _view_0001() -> str:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("20261126_0001_initial_schema.py")
    spec = importlib.util.spec_from_file_location("leasectl_migration_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.LEASE_OVERVIEW_SQL)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "pools",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("name", sa.String(length=54), nullable=False),
        sa.Column("template", sa.JSON(), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("min_ready", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_size", sa.Integer(), nullable=True),
        sa.Column("claim_ttl_seconds", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("min_ready >= 0", name=op.f("ck_pools_min_ready")),
        sa.CheckConstraint(
            "max_size IS NULL OR (max_size >= 1 AND max_size >= min_ready)", name=op.f("ck_pools_max_size")
        ),
        sa.CheckConstraint(
            "claim_ttl_seconds IS NULL OR claim_ttl_seconds > 0", name=op.f("ck_pools_claim_ttl")
        ),
        sa.CheckConstraint("length(name) BETWEEN 1 AND 54", name=op.f("ck_pools_name_length")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pools")),
        sa.UniqueConstraint("name", name=op.f("uq_pools_name")),
    )
    op.create_table(
        "change_counter",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("counter", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_change_counter")),
    )
    op.execute("DROP VIEW IF EXISTS lease_overview")
    op.add_column("leases", sa.Column("pool", sa.String(length=63), nullable=True))
    op.add_column("leases", sa.Column("claimed_by", sa.String(length=255), nullable=True))
    for column in ("claimed_at", "claim_expires_at", "released_at"):
        op.add_column("leases", sa.Column(column, sa.DateTime(timezone=True), nullable=True))
    op.create_index(op.f("ix_leases_pool"), "leases", ["pool"], unique=False)
    op.execute("CREATE VIEW lease_overview AS " + LEASE_OVERVIEW_SQL)
    if dialect == "sqlite":
        for table in ("leases", "pools"):
            for verb in ("INSERT", "UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_{verb.lower()}_count AFTER {verb} ON {table} "
                    "BEGIN INSERT INTO change_counter (id, counter) VALUES (1, 1) "
                    "ON CONFLICT (id) DO UPDATE SET counter = counter + 1; END"
                )
    elif dialect == "postgresql":
        op.execute(
            "CREATE TRIGGER pools_notify AFTER INSERT OR UPDATE OR DELETE ON pools "
            "FOR EACH STATEMENT EXECUTE FUNCTION leasectl_notify_leases()"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for table in ("leases", "pools"):
            for verb in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_{verb}_count")
    elif dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS pools_notify ON pools")
    op.execute("DELETE FROM leases WHERE pool IS NOT NULL")
    op.execute("DROP VIEW IF EXISTS lease_overview")
    op.drop_index(op.f("ix_leases_pool"), table_name="leases")
    with op.batch_alter_table("leases") as batch:
        for column in ("pool", *_CLAIM_COLUMNS):
            batch.drop_column(column)
    op.execute("CREATE VIEW lease_overview AS " + _view_0001())
    op.drop_table("change_counter")
    op.drop_table("pools")
