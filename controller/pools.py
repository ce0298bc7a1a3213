"""Pure pool planning: pools + their member rows + ``now`` -> members to create, retire and remove.

Called by ``controller.pool_sync`` at the start of every reconcile pass. Nothing here does I/O or
reads a clock: frozen dataclasses in, frozen dataclasses out (tests/unit/test_pools.py, table-driven
and with Hypothesis).

A member is an ordinary lease row with ``pool`` set. Its standing, in this order:

* **retiring**: desired ``absent`` (the planner deletes its sandbox); once its phase is ``Deleted``
  the row is **removed**;
* **claimed**: ``claimed_by`` set (``claimed_at`` None = reserved by a waiting claimer). It is retired
  when released (``released_at``) or when its claim expires (``claim_expires_at <= now``; this also
  frees the reservation of a claimer that died). A template change never touches it;
* **unclaimed**: retired when its pool is gone or its spec hash is not the template's (it is replaced),
  or as surplus above ``min_ready`` or above what ``max_size`` leaves beside the claimed members
  (not-ready ones first, newest first).

Then ``creates = min(target - unclaimed, max_size - members, budget)``, never below 0, where
``members`` counts every row not removed, retiring ones included (their sandboxes still exist): a pool
never holds more than ``max_size`` sandboxes, and a member that keeps failing is not replaced by a
create loop (it stays, phase Failed, counted as unclaimed). The create budget is shared by all pools,
one create at a time in turn, so one big pool cannot take it all.

``target`` is ``min_ready`` plus a **headroom** while claims are coming in: a claimed member is
replaced only one refill later (the time from a member row to its ``Ready``), so at a steady claim
rate ``r`` a pool kept at exactly ``min_ready`` sits ``r * refill`` members below it all the time.
The headroom is ``ceil(factor * r * refill)``, with ``r`` the pool's claims of the last
``claim_window_seconds`` (``PoolView.recent_claims``) over the time they span (at least a quarter of
the window, so a claim rate that starts is followed within a quarter window) and ``refill`` the mean
time from row to Ready of its members (``MemberView.created_at`` / ``ready_at``); with no claims in
the window (or only one), and for a pool with ``min_ready`` 0 (no idle sandboxes wanted), it is 0;
the extra members go again as surplus. ``factor`` 0 turns it off.
``max_size`` caps it like the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Final, Literal

RetireReason = Literal["released", "expired", "template", "surplus", "pool-removed"]

READY: Final = "Ready"
FAILING_PHASES: Final = frozenset({"Error", "Failed", "Blocked"})


@dataclass(frozen=True)
class PoolView:
    """One pool as the planner needs it. ``template_hash`` None: the template is unusable (see
    ``problem``); nothing is created or replaced until it is fixed."""

    name: str
    template_hash: str | None
    min_ready: int = 0
    max_size: int | None = None
    problem: str | None = None
    recent_claims: int = 0  # claims of the pool within the planner's claim window
    oldest_claim_age_seconds: float | None = None  # age of the oldest of them


@dataclass(frozen=True)
class MemberView:
    """One member row (``leases`` with ``pool`` set) and its status phase."""

    name: str
    pool: str
    spec_hash: str
    desired_state: str = "running"
    phase: str | None = None
    claimed_by: str | None = None
    claimed_at: datetime | None = None
    claim_expires_at: datetime | None = None
    released_at: datetime | None = None
    created_at: datetime | None = None
    ready_at: datetime | None = None  # lease_status.ready_at: when it became Ready

    @property
    def retiring(self) -> bool:
        return self.desired_state == "absent"

    @property
    def claimed(self) -> bool:
        return self.claimed_by is not None

    @property
    def ready(self) -> bool:
        return self.phase == READY


@dataclass(frozen=True)
class Retire:
    member: str
    reason: RetireReason
    claimed: bool  # the effect must only retire an unclaimed member if it is still unclaimed


@dataclass(frozen=True)
class PoolCounts:
    """What ``leasectl pools`` shows: unclaimed members by readiness, claimed, retiring, in all."""

    ready: int = 0
    claimed: int = 0
    provisioning: int = 0
    failing: int = 0
    retiring: int = 0
    total: int = 0


@dataclass(frozen=True)
class PoolPlan:
    pool: str
    creates: int = 0
    retire: tuple[Retire, ...] = ()
    remove: tuple[str, ...] = ()
    counts: PoolCounts = field(default_factory=PoolCounts)
    message: str = ""
    target: int = 0  # unclaimed members it is filled to: min_ready + headroom (within max_size)

    @property
    def busy(self) -> bool:
        """Members are on their way (to be created or provisioning): worth looking again soon."""
        return self.creates > 0 or self.counts.provisioning > 0 or bool(self.retire)


def _age_key(m: MemberView) -> tuple[float, str]:
    return (m.created_at.timestamp() if m.created_at is not None else 0.0, m.name)


def count(members: Iterable[MemberView]) -> PoolCounts:
    ready = claimed = provisioning = failing = retiring = total = 0
    for m in members:
        total += 1
        if m.retiring:
            retiring += 1
        elif m.claimed:
            claimed += 1
        elif m.ready:
            ready += 1
        elif m.phase in FAILING_PHASES:
            failing += 1
        else:
            provisioning += 1
    return PoolCounts(ready, claimed, provisioning, failing, retiring, total)


@dataclass(frozen=True)
class Headroom:
    """How the planner sizes the headroom (see the module docstring); the default turns it off."""

    factor: float = 0.0
    claim_window_seconds: float = 60.0


def refill_seconds(members: Iterable[MemberView]) -> float | None:
    """Mean time from member row to Ready over the members that have both times; None without any."""
    times = [
        (m.ready_at - m.created_at).total_seconds()
        for m in members
        if m.ready_at is not None and m.created_at is not None and m.ready_at >= m.created_at
    ]
    return sum(times) / len(times) if times else None


def headroom(pool: PoolView, members: Sequence[MemberView], how: Headroom) -> int:
    """Unclaimed members to keep above ``min_ready`` for the claims that arrive during one refill."""
    if how.factor <= 0 or pool.min_ready <= 0 or pool.recent_claims < 2 or how.claim_window_seconds <= 0:
        # Off; a pool that wants no idle sandboxes (min_ready 0: every claim is cold by choice); or no
        # rate to speak of (one claim alone is not worth extra sandboxes).
        return 0
    refill = refill_seconds(members)
    if refill is None:
        return 0
    # Claims over the time they span (at least a quarter of the window, at most all of it): a rate
    # that starts is seen within a quarter window, and one claim alone does not look like a burst.
    window = how.claim_window_seconds
    span = pool.oldest_claim_age_seconds if pool.oldest_claim_age_seconds is not None else window
    rate = pool.recent_claims / min(window, max(span, window / 4))
    return math.ceil(how.factor * rate * refill - 1e-9)


def target(pool: PoolView, members: Sequence[MemberView], how: Headroom) -> int:
    """Unclaimed members the pool is filled to: ``min_ready`` plus the headroom."""
    return pool.min_ready + headroom(pool, members, how)


def _plan_one(
    pool: PoolView | None, name: str, members: Sequence[MemberView], now: datetime, how: Headroom
) -> PoolPlan:
    """Everything but creates (those need the shared budget)."""
    retire: list[Retire] = []
    remove: list[str] = []
    unclaimed: list[MemberView] = []
    for m in members:
        if m.retiring:
            if m.phase == "Deleted":
                remove.append(m.name)
            continue
        if m.claimed:
            if m.released_at is not None:
                retire.append(Retire(m.name, "released", True))
            elif m.claim_expires_at is not None and m.claim_expires_at <= now:
                retire.append(Retire(m.name, "expired", True))
            continue
        if pool is None:
            retire.append(Retire(m.name, "pool-removed", False))
        elif pool.template_hash is not None and m.spec_hash != pool.template_hash:
            retire.append(Retire(m.name, "template", False))
        else:
            unclaimed.append(m)
    keep = target(pool, members, how) if pool is not None else 0
    if pool is not None and pool.max_size is not None:  # max_size lowered under the members held
        live_claimed = sum(1 for m in members if m.claimed and not m.retiring)
        keep = min(keep, max(0, pool.max_size - live_claimed))
    if len(unclaimed) > keep:
        # Surplus goes not-ready first (failing, then provisioning), newest first within each.
        def rank(m: MemberView) -> tuple[int, float, str]:
            level = 0 if m.phase in FAILING_PHASES else 2 if m.ready else 1
            age, member = _age_key(m)
            return (level, -age, member)

        ordered = sorted(unclaimed, key=rank)
        surplus = ordered[: len(unclaimed) - keep]
        retire.extend(Retire(m.name, "surplus", False) for m in surplus)
    after = {r.member for r in retire}
    view = [
        MemberView(m.name, m.pool, m.spec_hash, "absent", m.phase) if m.name in after else m
        for m in members
        if m.name not in remove
    ]
    message = (pool.problem or "") if pool is not None else "pool removed: retiring unclaimed members"
    return PoolPlan(
        pool=name,
        retire=tuple(retire),
        remove=tuple(remove),
        counts=count(view),
        message=message,
        target=keep,
    )


def room(pool: PoolView, plan: PoolPlan) -> int:
    """How many members may be created for ``pool`` now, before the shared budget."""
    if pool.template_hash is None:
        return 0
    c = plan.counts
    unclaimed = c.ready + c.provisioning + c.failing
    want = max(0, plan.target - unclaimed)
    if pool.max_size is not None:
        want = min(want, max(0, pool.max_size - c.total))
    return want


def plan_pools(
    pools: Sequence[PoolView],
    members: Sequence[MemberView],
    now: datetime,
    *,
    create_budget: int,
    how: Headroom | None = None,
) -> dict[str, PoolPlan]:
    """One ``PoolPlan`` per pool, and one per vanished pool that still has members."""
    by_pool: dict[str, list[MemberView]] = {}
    for m in members:
        by_pool.setdefault(m.pool, []).append(m)
    known: Mapping[str, PoolView] = {p.name: p for p in pools}
    how = how or Headroom()
    plans = {name: _plan_one(known.get(name), name, by_pool.get(name, []), now, how) for name in known}
    for name in sorted(set(by_pool) - set(known)):
        plans[name] = _plan_one(None, name, by_pool[name], now, how)
    wants = {p.name: room(p, plans[p.name]) for p in sorted(pools, key=lambda p: p.name)}
    granted = dict.fromkeys(wants, 0)
    budget = max(0, create_budget)
    while budget > 0 and any(wants[n] > granted[n] for n in wants):
        for name in wants:
            if budget > 0 and wants[name] > granted[name]:
                granted[name] += 1
                budget -= 1
    for name, n in granted.items():
        if n:
            p = plans[name]
            plans[name] = replace(p, creates=n)
    return plans
