"""The ``lease_overview`` view: one row per lease, desired and observed state side by side.

The view is created by the migrations from :data:`LEASE_OVERVIEW_SQL`; :data:`lease_overview` is a
selectable for queries. It lives in its own MetaData so autogenerate never mistakes it for a table.
"""

from __future__ import annotations

import sqlalchemy as sa

from models.base import UTCDateTime

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

_view_metadata = sa.MetaData()

lease_overview = sa.Table(
    "lease_overview",
    _view_metadata,
    sa.Column("name", sa.String),
    sa.Column("desired_state", sa.String),
    sa.Column("paused", sa.Boolean),
    sa.Column("expires_at", UTCDateTime),
    sa.Column("phase", sa.String),
    sa.Column("observed_state", sa.String),
    sa.Column("sandbox_id", sa.String),
    sa.Column("sandbox_name", sa.String),
    sa.Column("message", sa.Text),
    sa.Column("failures", sa.Integer),
    sa.Column("next_attempt_at", UTCDateTime),
    sa.Column("ready_at", UTCDateTime),
    sa.Column("workspace_path", sa.String),
    sa.Column("last_reconciled_at", UTCDateTime),
    sa.Column("created_at", UTCDateTime),
    sa.Column("updated_at", UTCDateTime),
    sa.Column("status_updated_at", UTCDateTime),
    sa.Column("pool", sa.String),
    sa.Column("claimed_by", sa.String),
)
