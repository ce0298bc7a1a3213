"""The tables of leasectl's database and the value sets the database itself enforces.

Ownership: operators own ``leases`` and ``pools`` (the controller never writes their columns except
through ``leasectl apply``). Pool member rows (``leases.pool`` set) are the exception: the controller
inserts, retires and removes them, and claimers write their claim columns. The controller owns
``lease_status``, ``events``, ``orphan_sightings``, ``change_counter`` and ``leader_election``;
``executions`` is shared (operators insert queued rows, the controller runs them and writes the
results).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime

DESIRED_STATES = ("running", "stopped", "archived", "absent")
LANGUAGES = ("python", "typescript", "javascript")
PHASES = (
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
    "Blocked",
    "Idle",
)
EXECUTION_STATES = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "error",
    "cancelled",
    "interrupted",
    "unknown",
)
EXECUTION_TERMINAL_STATES = (
    "succeeded",
    "failed",
    "timed_out",
    "error",
    "cancelled",
    "interrupted",
    "unknown",
)

# Integer primary keys that autoincrement on both SQLite (INTEGER PRIMARY KEY) and PostgreSQL.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Lease(Base):
    """Desired state of one sandbox, owned by the operator."""

    __tablename__ = "leases"
    __table_args__ = (
        sa.CheckConstraint(_in("desired_state", DESIRED_STATES), name="desired_state"),
        sa.CheckConstraint("snapshot IS NULL OR image IS NULL", name="snapshot_xor_image"),
        sa.CheckConstraint(
            "image IS NOT NULL OR (cpu IS NULL AND memory IS NULL AND disk IS NULL AND gpu IS NULL)",
            name="resources_need_image",
        ),
        sa.CheckConstraint("language IS NULL OR " + _in("language", LANGUAGES), name="language"),
        sa.CheckConstraint("cpu IS NULL OR cpu > 0", name="cpu_positive"),
        sa.CheckConstraint("memory IS NULL OR memory > 0", name="memory_positive"),
        sa.CheckConstraint("disk IS NULL OR disk > 0", name="disk_positive"),
        sa.CheckConstraint("gpu IS NULL OR gpu > 0", name="gpu_positive"),
        sa.CheckConstraint("auto_stop_interval IS NULL OR auto_stop_interval >= 0", name="auto_stop"),
        sa.CheckConstraint(
            "auto_archive_interval IS NULL OR auto_archive_interval >= 0", name="auto_archive"
        ),
        sa.CheckConstraint("auto_delete_interval IS NULL OR auto_delete_interval >= -1", name="auto_delete"),
        sa.CheckConstraint("length(name) BETWEEN 1 AND 63", name="name_length"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(63), unique=True)
    desired_state: Mapped[str] = mapped_column(sa.String(16), server_default="running")
    snapshot: Mapped[str | None] = mapped_column(sa.String(255))
    image: Mapped[str | None] = mapped_column(sa.String(1024))
    target: Mapped[str | None] = mapped_column(sa.String(64))
    language: Mapped[str | None] = mapped_column(sa.String(16))
    cpu: Mapped[int | None] = mapped_column(sa.Integer)
    memory: Mapped[int | None] = mapped_column(sa.Integer)
    disk: Mapped[int | None] = mapped_column(sa.Integer)
    gpu: Mapped[int | None] = mapped_column(sa.Integer)
    env: Mapped[dict[str, str]] = mapped_column(sa.JSON, server_default=sa.text("'{}'"))
    labels: Mapped[dict[str, str]] = mapped_column(sa.JSON, server_default=sa.text("'{}'"))
    auto_stop_interval: Mapped[int | None] = mapped_column(sa.Integer)
    auto_archive_interval: Mapped[int | None] = mapped_column(sa.Integer)
    auto_delete_interval: Mapped[int | None] = mapped_column(sa.Integer)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    paused: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    # `leasectl rollout` (or an UPDATE ... SET rollout_requested_at = now()): a sandbox created before
    # this time is replaced, delete-then-create like a spec change. Not part of the spec hash.
    rollout_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    # The whole sandbox (issue 15); NULL = Daytona's default (nothing sent, left out of the hashes).
    # No CHECK constraints: adding one on SQLite rebuilds the table; a row that breaks LeaseSpec's
    # rules is reported Failed by the reconciler (lease_rows) like any other bad row.
    os_user: Mapped[str | None] = mapped_column(sa.String(32))
    public: Mapped[bool | None] = mapped_column(sa.Boolean)
    network_block_all: Mapped[bool | None] = mapped_column(sa.Boolean)
    network_allow_list: Mapped[list[str] | None] = mapped_column(sa.JSON)  # IPv4 CIDRs
    domain_allow_list: Mapped[list[str] | None] = mapped_column(sa.JSON)
    gpu_type: Mapped[str | None] = mapped_column(sa.String(32))
    spot: Mapped[bool | None] = mapped_column(sa.Boolean)
    auto_pause_interval: Mapped[int | None] = mapped_column(sa.Integer)
    ephemeral: Mapped[bool | None] = mapped_column(sa.Boolean)
    secrets: Mapped[dict[str, str] | None] = mapped_column(sa.JSON)  # env variable -> Daytona secret name
    # [{"volume": name, "mount_path": "/data", "subpath"?: "x"}]: Daytona volumes mounted by name
    volumes: Mapped[list[dict[str, str]] | None] = mapped_column(sa.JSON)
    # {"dockerfile": content, "context": [absolute paths], "context_sha256": {path: digest}}: what
    # `apply` read (the image Daytona builds); NULL when the lease uses a snapshot or an image name
    build: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    # Pool members (``pool`` set) are rows the controller inserts for a pool; the claim columns say
    # who holds one (``claimed_at`` NULL with ``claimed_by`` set: reserved by a waiting claimer),
    # until when, and when it was given back. Plain leases leave them all NULL.
    pool: Mapped[str | None] = mapped_column(sa.String(63), index=True)
    claimed_by: Mapped[str | None] = mapped_column(sa.String(255))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # controller.schedules: {"timezone": ..., "entries": [{"cron": ..., "state": ...}]}; NULL = none.
    schedule: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)


class Pool(Base):
    """A warm pool, owned by the operator: a lease template and how many members to keep.

    ``template`` is the YAML form of a lease without ``name`` and ``state`` (as in ``pools:`` of a
    lease file); ``max_size`` NULL means no cap; ``claim_ttl_seconds`` NULL means claims never expire.
    """

    __tablename__ = "pools"
    __table_args__ = (
        sa.CheckConstraint("min_ready >= 0", name="min_ready"),
        sa.CheckConstraint("max_size IS NULL OR (max_size >= 1 AND max_size >= min_ready)", name="max_size"),
        sa.CheckConstraint("claim_ttl_seconds IS NULL OR claim_ttl_seconds > 0", name="claim_ttl"),
        sa.CheckConstraint("length(name) BETWEEN 1 AND 54", name="name_length"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(54), unique=True)
    template: Mapped[dict[str, Any]] = mapped_column(sa.JSON, server_default=sa.text("'{}'"))
    min_ready: Mapped[int] = mapped_column(sa.Integer, server_default="0")
    max_size: Mapped[int | None] = mapped_column(sa.Integer)
    claim_ttl_seconds: Mapped[int | None] = mapped_column(sa.Integer)
    # controller.schedules: {"timezone": ..., "entries": [{"cron": ..., "min_ready": ...}]}; NULL = none.
    schedule: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())


VOLUME_STATES = ("present", "absent")


class Volume(Base):
    """A Daytona volume leasectl manages, owned by the operator (top-level ``volumes:`` of a lease
    file). The reconciler creates a ``present`` one that Daytona lacks and deletes an ``absent`` one
    once no lease mounts it; a volume no row names is never touched."""

    __tablename__ = "volumes"
    __table_args__ = (sa.CheckConstraint(_in("desired_state", VOLUME_STATES), name="desired_state"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(63), unique=True)
    desired_state: Mapped[str] = mapped_column(sa.String(16), server_default="present")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())


class ChangeCounter(Base):
    """One row whose ``counter`` SQLite triggers bump on every change to ``leases`` and ``pools``.

    The daemon reads it every few hundred milliseconds (after a ``PRAGMA data_version`` gate) to
    wake up at once on SQLite, where there is no NOTIFY. PostgreSQL uses NOTIFY and leaves it alone.
    """

    __tablename__ = "change_counter"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    counter: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")


class LeaseStatus(Base):
    """What the controller last observed and did for one lease. Owned by the controller.

    Not a foreign key to ``leases``: an operator may delete a lease row with SQL while its sandbox
    still exists; the status row is what lets the controller find and remove that sandbox.
    """

    __tablename__ = "lease_status"
    # On PostgreSQL, half of each page is kept free (fillfactor 50, migration 0011; SQLAlchemy 2.0
    # has no table option for it): every pass rewrites last_reconciled_at, then in place (HOT).
    __table_args__ = (sa.CheckConstraint(_in("phase", PHASES), name="phase"),)

    lease_name: Mapped[str] = mapped_column(sa.String(63), primary_key=True)
    sandbox_id: Mapped[str | None] = mapped_column(sa.String(128))
    sandbox_name: Mapped[str | None] = mapped_column(sa.String(128))
    observed_state: Mapped[str | None] = mapped_column(sa.String(32))
    # When the recorded sandbox was first seen in observed_state (None with no state): how long a
    # sandbox has been starting, say; the planner says "stuck" past controller.stuck_after_seconds.
    observed_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    phase: Mapped[str] = mapped_column(sa.String(16), server_default="Pending")
    spec_hash: Mapped[str | None] = mapped_column(sa.String(64))
    failed_spec_hash: Mapped[str | None] = mapped_column(sa.String(64))
    message: Mapped[str | None] = mapped_column(sa.Text)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    failures: Mapped[int] = mapped_column(sa.Integer, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    workspace_path: Mapped[str | None] = mapped_column(sa.String(1024))
    create_attempt_name: Mapped[str | None] = mapped_column(sa.String(128))
    create_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Per spec field a short digest of the value the sandbox was created or updated with (never the
    # value): what `plan` names when it says which fields a change touches.
    spec_fields: Mapped[dict[str, str] | None] = mapped_column(sa.JSON)
    last_reconciled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())


class Execution(Base):
    """A command for a lease: queued by an operator (SQL or CLI), run and recorded by the controller.

    ``env`` and ``stdin`` carry what the command needs while it waits; the dispatcher clears both
    when the row reaches a terminal state, so secrets do not stay in the database.
    """

    __tablename__ = "executions"
    __table_args__ = (
        sa.CheckConstraint(_in("state", EXECUTION_STATES), name="state"),
        sa.CheckConstraint("timeout_seconds IS NULL OR timeout_seconds > 0", name="timeout_positive"),
        sa.Index("ix_executions_state_id", "state", "id"),
        sa.Index("ix_executions_lease_name_state", "lease_name", "state"),
        # the claim's order over queued rows only: a claim reads n rows, not the whole queue
        sa.Index(
            "ix_executions_queued",
            "created_at",
            "id",
            postgresql_where=sa.text("state = 'queued'"),
            sqlite_where=sa.text("state = 'queued'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    lease_name: Mapped[str] = mapped_column(sa.String(63))  # ix_executions_lease_name_state leads with it
    command: Mapped[str] = mapped_column(sa.Text)
    cwd: Mapped[str | None] = mapped_column(sa.String(1024))
    env: Mapped[dict[str, str] | None] = mapped_column(sa.JSON)
    stdin: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    timeout_seconds: Mapped[int | None] = mapped_column(sa.Integer)
    state: Mapped[str] = mapped_column(sa.String(16), server_default="queued")
    exit_code: Mapped[int | None] = mapped_column(sa.Integer)
    output: Mapped[str | None] = mapped_column(sa.Text)
    output_truncated: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    error: Mapped[str | None] = mapped_column(sa.Text)
    claimed_by: Mapped[str | None] = mapped_column(sa.String(128))
    sandbox_id: Mapped[str | None] = mapped_column(sa.String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Retries of attempts that provably did not start the command (see controller.execution).
    attempts: Mapped[int] = mapped_column(sa.Integer, server_default="0")
    attempt_log: Mapped[list[dict[str, str]] | None] = mapped_column(sa.JSON)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The Daytona session command the row runs as: another worker can re-attach to it.
    session_id: Mapped[str | None] = mapped_column(sa.String(128))
    command_id: Mapped[str | None] = mapped_column(sa.String(128))
    # False: the row does not wait for earlier rows of its lease (exec.per_lease_concurrency).
    ordered: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.true())


class Event(Base):
    """Append-only history: one row per action and outcome. Never holds a secret."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now(), index=True)
    lease_name: Mapped[str | None] = mapped_column(sa.String(63), index=True)
    sandbox_id: Mapped[str | None] = mapped_column(sa.String(128))
    action: Mapped[str] = mapped_column(sa.String(32))
    outcome: Mapped[str] = mapped_column(sa.String(32))
    message: Mapped[str | None] = mapped_column(sa.Text)
    controller_id: Mapped[str | None] = mapped_column(sa.String(128))
    pass_id: Mapped[str | None] = mapped_column(sa.String(32))


class OrphanSighting(Base):
    """When the controller first saw a sandbox of its own that no lease wants (GC grace clock)."""

    __tablename__ = "orphan_sightings"

    sandbox_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    sandbox_name: Mapped[str | None] = mapped_column(sa.String(128))
    lease_label: Mapped[str | None] = mapped_column(sa.String(63))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LeaderElection(Base):
    """One row per controller instance: who leads, until when, and the fencing term."""

    __tablename__ = "leader_election"

    instance: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(sa.String(128))
    term: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    acquired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    renewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Quota(Base):
    """A limit, owned by the operator (``quotas:`` of a lease file, or SQL). See controller.quotas.

    ``label`` '' is the whole instance; ``label`` set and ``value`` '' applies to every value of the
    label on its own (each team); both set applies to that value only. A NULL limit is no limit.
    """

    __tablename__ = "quotas"
    __table_args__ = (
        sa.UniqueConstraint("label", "value"),
        sa.CheckConstraint("label <> '' OR value = ''", name="value_needs_label"),
        *(
            sa.CheckConstraint(f"{col} IS NULL OR {col} >= 0", name=f"{col}_non_negative")
            for col in ("sandboxes", "cpu", "memory", "disk", "gpu")
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    label: Mapped[str] = mapped_column(sa.String(63), server_default="")
    value: Mapped[str] = mapped_column(sa.String(255), server_default="")
    sandboxes: Mapped[int | None] = mapped_column(sa.Integer)
    cpu: Mapped[int | None] = mapped_column(sa.Integer)
    memory: Mapped[int | None] = mapped_column(sa.Integer)  # GiB
    disk: Mapped[int | None] = mapped_column(sa.Integer)  # GiB
    gpu: Mapped[int | None] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=sa.func.now())


class Usage(Base):
    """What the reconciler observed, as segments: one lease's sandbox in one state with one set of
    resources from ``started_at`` to ``ended_at`` (the last pass that saw it so). Owned by the
    controller (controller.usage); ``closed`` segments are never written again."""

    __tablename__ = "usage"
    # fillfactor 50 on PostgreSQL (migration 0011): every pass rewrites ended_at of the open segments.
    __table_args__ = (sa.Index("ix_usage_closed_lease_name", "closed", "lease_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    lease_name: Mapped[str] = mapped_column(sa.String(63))
    sandbox_id: Mapped[str | None] = mapped_column(sa.String(128))
    state: Mapped[str] = mapped_column(sa.String(32))
    labels: Mapped[dict[str, str]] = mapped_column(sa.JSON, server_default=sa.text("'{}'"))
    cpu: Mapped[int] = mapped_column(sa.Integer, server_default="0")
    memory: Mapped[int] = mapped_column(sa.Integer, server_default="0")
    disk: Mapped[int] = mapped_column(sa.Integer, server_default="0")
    gpu: Mapped[int] = mapped_column(sa.Integer, server_default="0")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime)  # not indexed: moved by every pass (0008)
    closed: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
