"""Room on each page for the rows every pass rewrites, so that PostgreSQL updates them in place.

Revision ID: 0011_hot_updates
Revises: 0010_executions_lease_index
Create Date: 2026-11-27 17:10:00

Each reconcile pass moves ``lease_status.last_reconciled_at`` of every lease and ``usage.ended_at``
of every open segment (one per sandbox). Neither column is indexed, so PostgreSQL could write each
new row version on the same page as a heap-only tuple (HOT), with no new index entry, and prune the
old one on the page without VACUUM, but only if the page has room: with the default fillfactor of
100 the pages are full, and 99 % of those updates were not HOT (3,000 leases, four passes): every
pass wrote a new entry into every index of both tables for every lease, and the tables grew until
vacuum caught up. A fillfactor of 50 keeps half of each page for the next versions
(tests/integration/test_pass_cost.py counts the HOT updates of a pass). It applies to pages
written from now on (a ``VACUUM FULL`` of the two tables applies it at once). SQLite has no such
setting: nothing to do there.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011_hot_updates"
down_revision: str | Sequence[str] | None = "0010_executions_lease_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("lease_status", "usage")
FILLFACTOR = 50


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
