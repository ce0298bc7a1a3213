"""Claim and release pool members: the Python API behind ``leasectl claim`` and ``leasectl release``.

For platforms that embed leasectl::

    from controller.claims import claim, release
    from controller.db import connect

    db = connect("sqlite:///leasectl.db")
    got = claim(db, "agents", owner="ci-job-42", ttl_seconds=3600, wait_seconds=120)
    ...  # use got.sandbox_id / got.lease (``leasectl exec got.lease -- ...``)
    release(db, got.lease)

A claim is one database transaction and never an API call. A **warm** claim takes one unclaimed
member whose phase is ``Ready``: on PostgreSQL the candidate row is locked with ``FOR UPDATE SKIP
LOCKED`` (concurrent claimers skip each other's rows instead of queueing), on SQLite the transaction
holds the write lock from its first statement (``BEGIN IMMEDIATE``). Either way the claim columns
are written only if still empty, so two claimers never get the same member, and a claimer that dies
mid-way leaves nothing behind (the transaction rolls back).

When no member is Ready and ``wait_seconds`` > 0, the claim is **cold**: it reserves a new member
(a row already holding ``claimed_by`` with ``claimed_at`` empty, inserted under the pool's row lock
and only within ``max_size``), which wakes the daemon, and waits until that member, or any other, is
Ready. The reservation expires ``wait_seconds`` + :data:`RESERVATION_GRACE_SECONDS` after it was made,
so the member of a claimer that died is deleted by the pool step; a claimer that gives up hands its
reservation back as ordinary pool stock.

Release sets ``released_at`` and desired ``absent`` in one UPDATE: the member is deleted (never
handed to a second claimer) and the pool refills. SQL users may do the same with
``UPDATE leases SET released_at = CURRENT_TIMESTAMP WHERE name = '...'``.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from controller.db import Database
from controller.errors import LeasectlError, SpecError
from controller.metrics import Metrics
from controller.pool_sync import member_row, new_member_name, pool_view
from models import Event, Lease, LeaseStatus, Pool, utcnow

log = logging.getLogger(__name__)

RESERVATION_GRACE_SECONDS = 60


class UnknownPoolError(SpecError):
    """No pool of that name (exit 2)."""


class NoMemberReadyError(LeasectlError):
    """No member of the pool is Ready (and none became Ready within the wait)."""


class NotClaimedError(SpecError):
    """``release`` of a lease that is not a claimed pool member (exit 2)."""


@dataclass(frozen=True)
class Claim:
    """One claimed member: the lease to use (exec, the queue, SQL) and its sandbox."""

    lease: str
    pool: str
    sandbox_id: str | None
    sandbox_name: str | None
    owner: str
    claimed_at: datetime
    expires_at: datetime | None
    cold: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "lease": self.lease,
            "sandbox_id": self.sandbox_id,
            "sandbox_name": self.sandbox_name,
            "pool": self.pool,
            "owner": self.owner,
            "claimed_at": self.claimed_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "kind": "cold" if self.cold else "warm",
            "seconds": round(self.seconds, 4),
        }


def default_owner() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def _event(session: Session, now: datetime, lease: str, action: str, outcome: str, message: str) -> None:
    session.add(Event(at=now, lease_name=lease, action=action, outcome=outcome, message=message))


def _ready_member(
    session: Session, pool: str, *, name: str | None = None, claimed_by: str | None = None
) -> Any:
    """The oldest Ready member that is unclaimed (or reserved by ``claimed_by`` when ``name`` is given),
    locked for this transaction; concurrent claimers on PostgreSQL skip it."""
    query = (
        sa.select(Lease.id, Lease.name, LeaseStatus.sandbox_id, LeaseStatus.sandbox_name)
        .join(LeaseStatus, LeaseStatus.lease_name == Lease.name)
        .where(
            Lease.pool == pool,
            Lease.desired_state == "running",
            Lease.released_at.is_(None),
            LeaseStatus.phase == "Ready",
            LeaseStatus.sandbox_id.is_not(None),
        )
    )
    if name is None:
        query = query.where(Lease.claimed_by.is_(None))
    else:
        query = query.where(Lease.name == name, Lease.claimed_by == claimed_by, Lease.claimed_at.is_(None))
    query = (
        query.order_by(LeaseStatus.ready_at, Lease.id).limit(1).with_for_update(skip_locked=True, of=Lease)
    )
    return session.execute(query).first()


def _pool_row(session: Session, pool: str, *, lock: bool = False) -> Pool:
    query = sa.select(Pool).where(Pool.name == pool)
    if lock:
        query = query.with_for_update()
    row = session.scalars(query).first()
    if row is None:
        known = sorted(session.scalars(sa.select(Pool.name)))
        hint = f" (pools: {', '.join(known)})" if known else " (there are no pools; declare one under pools:)"
        raise UnknownPoolError(f"no such pool: {pool}{hint}")
    return row


def _take(
    db: Database,
    pool: str,
    owner: str,
    ttl_seconds: int | None,
    clock: Callable[[], datetime],
    *,
    reserved: str | None = None,
) -> tuple[Any, datetime, datetime | None] | None:
    """One claim transaction: a Ready unclaimed member (or our own reservation), or None."""
    with db.session() as session:
        row = _pool_row(session, pool)
        ttl = ttl_seconds if ttl_seconds is not None else row.claim_ttl_seconds
        found = _ready_member(session, pool, name=reserved, claimed_by=owner if reserved else None)
        if found is None:
            return None
        now = clock()
        until = now + timedelta(seconds=ttl) if ttl else None
        stmt = sa.update(Lease).where(Lease.id == found.id)
        stmt = stmt.where(Lease.claimed_by == owner) if reserved else stmt.where(Lease.claimed_by.is_(None))
        done = session.execute(
            stmt.values(claimed_by=owner, claimed_at=now, claim_expires_at=until, updated_at=now),
            execution_options={"synchronize_session": False},
        )
        if getattr(done, "rowcount", 0) != 1:
            return None
        kind = "cold" if reserved else "warm"
        expiry = f", until {until.isoformat()}" if until else ""
        _event(session, now, found.name, "claim", kind, f"claimed by {owner}{expiry}")
        return found, now, until


def _reserve(
    db: Database, pool: str, owner: str, wait_seconds: float, clock: Callable[[], datetime]
) -> str | None:
    """Insert a member already reserved for ``owner`` if ``max_size`` leaves room; its name, or None."""
    with db.session() as session:
        row = _pool_row(session, pool, lock=True)
        view, spec = pool_view(row)
        if spec is None:
            raise UnknownPoolError(view.problem or f"pool {pool} is unusable")
        members = session.scalar(sa.select(sa.func.count()).select_from(Lease).where(Lease.pool == pool)) or 0
        if spec.max_size is not None and members >= spec.max_size:
            return None
        now = clock()
        taken = set(session.scalars(sa.select(Lease.name).where(Lease.pool == pool)))
        name = new_member_name(pool, taken)
        until = now + timedelta(seconds=wait_seconds + RESERVATION_GRACE_SECONDS)
        session.add(member_row(spec, name, now, claimed_by=owner, claim_expires_at=until))
        _event(
            session,
            now,
            name,
            "claim",
            "reserved",
            f"reserved by {owner} for a cold claim (until {until.isoformat()})",
        )
        return name


def _unreserve(db: Database, name: str, owner: str) -> None:
    """Hand a reservation back as ordinary pool stock (the pool step retires it if surplus)."""
    with db.session() as session:
        session.execute(
            sa.update(Lease)
            .where(Lease.name == name, Lease.claimed_by == owner, Lease.claimed_at.is_(None))
            .values(claimed_by=None, claim_expires_at=None),
            execution_options={"synchronize_session": False},
        )


def claim(
    db: Database,
    pool: str,
    *,
    owner: str | None = None,
    ttl_seconds: int | None = None,
    wait_seconds: float = 0.0,
    poll_seconds: float = 0.05,
    clock: Callable[[], datetime] = utcnow,
    metrics: Metrics | None = None,
) -> Claim:
    """Claim one Ready member of ``pool``.

    ``ttl_seconds`` overrides the pool's ``claim_ttl``. With ``wait_seconds`` > 0 and no member Ready,
    reserve a new one (within ``max_size``) and wait for it or any other. Raises
    :class:`UnknownPoolError` or :class:`NoMemberReadyError`.
    """
    who = owner or default_owner()
    started = time.monotonic()
    deadline = started + max(0.0, wait_seconds)
    reserved: str | None = None
    try:
        while True:
            got = _take(db, pool, who, ttl_seconds, clock)
            cold = reserved is not None
            if got is None and reserved is not None:
                got = _take(db, pool, who, ttl_seconds, clock, reserved=reserved)
                if got is not None:
                    reserved = None  # it is ours now
            if got is not None:
                if reserved is not None:  # another member was ready first: ours goes back to stock
                    _unreserve(db, reserved, who)
                    reserved = None
                found, at, until = got
                seconds = time.monotonic() - started
                if metrics is not None:
                    kind = "cold" if cold else "warm"
                    metrics.claims.labels(pool=pool, kind=kind).inc()
                    metrics.claim_seconds.labels(kind=kind).observe(seconds)
                return Claim(
                    found.name, pool, found.sandbox_id, found.sandbox_name, who, at, until, cold, seconds
                )
            if time.monotonic() >= deadline:
                break
            if reserved is None:
                reserved = _reserve(db, pool, who, wait_seconds, clock)
            time.sleep(poll_seconds)
    except UnknownPoolError:
        raise
    except BaseException:
        if reserved is not None:
            _unreserve(db, reserved, who)
        raise
    if reserved is not None:
        _unreserve(db, reserved, who)
    if metrics is not None:
        metrics.claims.labels(pool=pool, kind="failed").inc()
        metrics.claim_seconds.labels(kind="failed").observe(time.monotonic() - started)
    waited = f" within {wait_seconds:g}s" if wait_seconds > 0 else " (use --wait SECONDS to wait for one)"
    raise NoMemberReadyError(f"no member of pool {pool} is ready{waited}")


@dataclass(frozen=True)
class Released:
    lease: str
    pool: str
    owner: str | None
    released_at: datetime


def release(db: Database, lease: str, *, clock: Callable[[], datetime] = utcnow) -> Released:
    """Give a claimed member back: it is deleted (never handed to a second claimer) and the pool
    refills. Raises :class:`NotClaimedError` for anything but a claimed, unreleased member."""
    with db.session() as session:
        now = clock()
        done = session.execute(
            sa.update(Lease)
            .where(
                Lease.name == lease,
                Lease.pool.is_not(None),
                Lease.claimed_by.is_not(None),
                Lease.claimed_at.is_not(None),
                Lease.released_at.is_(None),
            )
            .values(released_at=now, desired_state="absent", updated_at=now),
            execution_options={"synchronize_session": False},
        )
        row = session.scalars(sa.select(Lease).where(Lease.name == lease)).first()
        if getattr(done, "rowcount", 0) != 1 or row is None or row.pool is None:
            raise NotClaimedError(_why_not(row, lease))
        _event(session, now, lease, "release", "ok", f"released by {row.claimed_by}; deleting")
        return Released(lease, row.pool, row.claimed_by, now)


def _why_not(row: Lease | None, lease: str) -> str:
    if row is None:
        return f"no such lease: {lease}"
    if row.pool is None:
        return f"lease {lease} is not a pool member; set its desired state to absent to delete it"
    if row.released_at is not None:
        return f"lease {lease} (pool {row.pool}) was already released at {row.released_at.isoformat()}"
    return f"lease {lease} (pool {row.pool}) is not claimed; only a claimed member can be released"
