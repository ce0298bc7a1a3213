"""The reconciler's pool step: plan pools purely (``controller.pools``) and write what it decided.

Called by ``controller.reconciler`` at the start of every pass, before leases are loaded, so members
inserted here are created in the same pass. Without pools or members it is one read (an EXISTS);
otherwise one write transaction: it locks the ``pools`` rows (a claimer reserving a member for a
cold claim takes the same lock, see ``controller.claims``), reads the claim events of the last
``claim_window_seconds`` when the headroom is on (``controller.pools.Headroom``), counts members,
inserts new member rows, retires members (desired ``absent``: the ordinary planner deletes
their sandboxes) and removes the rows of members whose sandbox is gone, with one event each.

Crash safety: member rows are inserted in the same transaction that counted them, under the pool
lock, and a sandbox is only ever created for a row (its name is deterministic), so a daemon killed
at any instant never leaves a pool with more than ``max_size`` members. An unclaimed member is
retired only if it is still unclaimed at the moment of the UPDATE, so a claim that won the race keeps
its member.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.orm import Session

from controller.db import Database
from controller.metrics import Metrics
from controller.pools import Headroom, MemberView, PoolPlan, PoolView, plan_pools
from controller.schedules import earliest, in_force, pool_schedule
from controller.specs import MEMBER_ID_LENGTH, SPEC_COLUMNS, PoolSpec, spec_hash
from models import Event, Lease, LeaseStatus, Pool

log = logging.getLogger(__name__)

_MEMBER_EXISTS = sa.select(Lease.id).where(Lease.pool.is_not(None))
MEMBER_STATES = ("ready", "claimed", "provisioning", "failing", "retiring")
# Phases a member can keep for a while without the controller having anything to look at soon.
SETTLED_PHASES = frozenset({"Ready", "Error", "Failed", "Blocked", "Paused", "Idle", "Stopped", "Archived"})


@dataclass
class PoolSyncResult:
    plans: dict[str, PoolPlan] = field(default_factory=dict)
    members: set[str] = field(default_factory=set)  # every member row after the step
    created: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    settling: bool = False  # a member, claimed or not, is on its way to Ready or to gone
    next_change: datetime | None = None  # the next time a pool's schedule changes its min_ready

    @property
    def busy(self) -> bool:
        """Worth another pass soon (``pool_busy_interval_seconds``) rather than after an interval."""
        return self.settling or any(p.busy for p in self.plans.values())


def new_member_name(pool: str, taken: Collection[str]) -> str:
    """``<pool>-<8 random lowercase hex>``, not in ``taken``."""
    while True:
        name = f"{pool}-{secrets.token_hex(MEMBER_ID_LENGTH // 2)}"
        if name not in taken:
            return name


def member_row(spec: PoolSpec, name: str, now: datetime, **claim: Any) -> Lease:
    """A new member row: the template as a lease, desired running, ``pool`` set."""
    values = spec.member(name).to_row()
    return Lease(**values, pool=spec.name, created_at=now, updated_at=now, **claim)


def pool_view(row: Pool, now: datetime | None = None) -> tuple[PoolView, PoolSpec | None]:
    """The planner's view of a pool row; a template that is not a valid lease (written with SQL) gives
    a view with ``template_hash`` None and the problem, so nothing is created from it. With ``now``,
    ``min_ready`` is the one the pool's schedule puts in force then (controller.schedules)."""
    try:
        spec = PoolSpec.from_row(
            {
                "name": row.name,
                "template": row.template,
                "min_ready": row.min_ready,
                "max_size": row.max_size,
                "claim_ttl_seconds": row.claim_ttl_seconds,
                "schedule": row.schedule,
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        problem = f"pool {row.name!r} is unusable: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        return PoolView(row.name, None, max(0, row.min_ready or 0), row.max_size, problem), None
    return PoolView(spec.name, spec.template_hash(), effective_min_ready(spec, now), spec.max_size), spec


def next_min_ready_change(spec: PoolSpec, now: datetime) -> datetime | None:
    schedule = pool_schedule(spec.schedule)
    return None if schedule is None else in_force(schedule, now, spec.min_ready).next_change


def effective_min_ready(spec: PoolSpec, now: datetime | None) -> int:
    """``min_ready`` in force at ``now``: the schedule's latest entry, else the pool's own value."""
    schedule = pool_schedule(spec.schedule)
    if schedule is None or now is None:
        return spec.min_ready
    return int(in_force(schedule, now, spec.min_ready).value)


def member_view(row: Lease, phase: str | None, ready_at: datetime | None = None) -> MemberView:
    assert row.pool is not None
    return MemberView(
        name=row.name,
        pool=row.pool,
        spec_hash=spec_hash({col: getattr(row, col) for col in SPEC_COLUMNS}),
        desired_state=row.desired_state,
        phase=phase,
        claimed_by=row.claimed_by,
        claimed_at=row.claimed_at,
        claim_expires_at=row.claim_expires_at,
        released_at=row.released_at,
        created_at=row.created_at,
        ready_at=ready_at,
    )


def load_members(session: Session, pool: str | None = None) -> list[MemberView]:
    query = (
        sa.select(Lease, LeaseStatus.phase, LeaseStatus.ready_at)
        .outerjoin(LeaseStatus, LeaseStatus.lease_name == Lease.name)
        .where(Lease.pool.is_not(None))
        .order_by(Lease.name)
    )
    if pool is not None:
        query = query.where(Lease.pool == pool)
    return [member_view(row, phase, ready_at) for row, phase, ready_at in session.execute(query)]


def recent_claims(session: Session, since: datetime) -> dict[str, tuple[int, datetime]]:
    """Claims (warm and cold) per pool since ``since`` and the time of the oldest, from the claim
    events (indexed by time); a member's pool is its name without the ``-<id>`` suffix, so claims of
    removed members count too."""
    found: dict[str, tuple[int, datetime]] = {}
    query = sa.select(Event.lease_name, Event.at).where(
        Event.action == "claim", Event.outcome.in_(("warm", "cold")), Event.at >= since
    )
    for name, at in session.execute(query):
        if name and "-" in name:
            pool = name.rsplit("-", 1)[0]
            n, oldest = found.get(pool, (0, at))
            found[pool] = (n + 1, min(oldest, at))
    return found


def sync_pools(
    db: Database,
    *,
    now: datetime,
    create_budget: int,
    controller_id: str,
    pass_id: str | None = None,
    fence: Callable[[Session], None] | None = None,
    metrics: Metrics | None = None,
    headroom: Headroom | None = None,
) -> PoolSyncResult:
    result = PoolSyncResult()
    with db.session(readonly=True) as session:  # no pools: no write lock, one cheap statement
        if not session.scalar(sa.select(sa.exists(sa.select(Pool.id)) | sa.exists(_MEMBER_EXISTS))):
            return result
    with db.session() as session:
        if fence is not None:
            fence(session)
        rows = list(session.scalars(sa.select(Pool).order_by(Pool.name).with_for_update()))
        members = load_members(session)
        if not rows and not members:
            return result
        views: list[PoolView] = []
        specs: dict[str, PoolSpec] = {}
        claims: dict[str, tuple[int, datetime]] = {}
        if headroom is not None and headroom.factor > 0 and rows:
            claims = recent_claims(session, now - timedelta(seconds=headroom.claim_window_seconds))
        for row in rows:
            view, spec = pool_view(row, now)
            if view.name in claims:
                n, oldest = claims[view.name]
                view = replace(view, recent_claims=n, oldest_claim_age_seconds=(now - oldest).total_seconds())
            views.append(view)
            if spec is not None:
                specs[spec.name] = spec
                result.next_change = earliest(result.next_change, next_min_ready_change(spec, now))
            elif view.problem:
                log.warning("%s; fix the row (nothing is created for it meanwhile)", view.problem)
        plans = plan_pools(views, members, now, create_budget=create_budget, how=headroom)
        result.plans = plans
        result.settling = any(m.phase not in SETTLED_PHASES for m in members)
        taken = set(session.scalars(sa.select(Lease.name)))
        by_name = {m.name: m for m in members}

        def event(lease: str, action: str, outcome: str, message: str) -> None:
            session.add(
                Event(
                    at=now,
                    lease_name=lease,
                    action=action,
                    outcome=outcome,
                    message=message,
                    controller_id=controller_id,
                    pass_id=pass_id,
                )
            )

        for name, plan in plans.items():
            for retire in plan.retire:
                stmt = sa.update(Lease).where(
                    Lease.name == retire.member, Lease.pool == name, Lease.desired_state != "absent"
                )
                if not retire.claimed:
                    stmt = stmt.where(Lease.claimed_by.is_(None))
                done = session.execute(
                    stmt.values(desired_state="absent", updated_at=now),
                    execution_options={"synchronize_session": False},
                )
                if getattr(done, "rowcount", 0) != 1:
                    continue  # claimed meanwhile: it stays
                result.retired.append(retire.member)
                member = by_name[retire.member]
                if retire.reason == "expired":
                    until = member.claim_expires_at.isoformat() if member.claim_expires_at else "?"
                    event(
                        retire.member,
                        "expire",
                        "ok",
                        f"claim by {member.claimed_by} expired at {until}; deleting",
                    )
                else:
                    event(
                        retire.member,
                        "retire",
                        retire.reason,
                        f"pool {name}: member retired ({retire.reason})",
                    )
            for member_name in plan.remove:
                session.execute(
                    sa.delete(Lease).where(
                        Lease.name == member_name, Lease.pool == name, Lease.desired_state == "absent"
                    ),
                    execution_options={"synchronize_session": False},
                )
                session.execute(
                    sa.delete(LeaseStatus).where(
                        LeaseStatus.lease_name == member_name, LeaseStatus.phase == "Deleted"
                    ),
                    execution_options={"synchronize_session": False},
                )
                taken.discard(member_name)
                result.removed.append(member_name)
                event(member_name, "pool-remove", "ok", f"pool {name}: member gone; row removed")
            spec = specs.get(name)
            for _ in range(plan.creates if spec is not None else 0):
                assert spec is not None
                member_name = new_member_name(name, taken)
                taken.add(member_name)
                session.add(member_row(spec, member_name, now))
                result.created.append(member_name)
                wanted = effective_min_ready(spec, now)
                event(member_name, "pool-add", "ok", f"pool {name}: new member (min_ready {wanted})")
        session.flush()
        result.members = set(session.scalars(sa.select(Lease.name).where(Lease.pool.is_not(None))))
    if metrics is not None:
        for name, plan in plans.items():
            c = plan.counts
            for state, value in zip(
                MEMBER_STATES, (c.ready, c.claimed, c.provisioning, c.failing, c.retiring), strict=True
            ):
                metrics.pool_members.labels(pool=name, state=state).set(value)
    if result.created or result.retired or result.removed:
        log.info(
            "pools: %d member(s) added, %d retired, %d removed",
            len(result.created),
            len(result.retired),
            len(result.removed),
        )
    return result
