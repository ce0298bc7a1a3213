"""PostgreSQL: NOTIFY leasectl_leases on every change to leases, so the daemon wakes at once.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 19:40:00

A statement-level trigger: one notification per statement, whatever it touched. SQLite has no
NOTIFY; there the daemon's reconcile interval is the only wake-up (it is the guarantee anyway).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION leasectl_notify_leases() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('leasectl_leases', TG_OP);
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER leases_notify AFTER INSERT OR UPDATE OR DELETE ON leases "
        "FOR EACH STATEMENT EXECUTE FUNCTION leasectl_notify_leases()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS leases_notify ON leases")
    op.execute("DROP FUNCTION IF EXISTS leasectl_notify_leases()")
