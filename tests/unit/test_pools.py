"""Pure pool planning (controller.pools): a table of cases, and properties over random pools.

Properties: a plan never takes a pool over ``max_size`` (with or without a headroom); driving the
plans (creates become members that turn Ready, retired members go away) converges to ``min_ready``
unclaimed Ready members. The headroom (claims during one refill, times a factor) has a table too.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.pools import Headroom, MemberView, PoolPlan, PoolView, headroom, plan_pools, refill_seconds

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
T = "t" * 16
OLD = "o" * 16


def member(name: str, **kw: Any) -> MemberView:
    values: dict[str, Any] = {"pool": "p", "spec_hash": T, "phase": "Ready", "created_at": NOW}
    values.update(kw)
    return MemberView(name=name, **values)


def one(pool: PoolView, members: list[MemberView], budget: int = 100) -> PoolPlan:
    return plan_pools([pool], members, NOW, create_budget=budget)[pool.name]


def pool(min_ready: int = 2, max_size: int | None = None, template_hash: str | None = T) -> PoolView:
    return PoolView(name="p", template_hash=template_hash, min_ready=min_ready, max_size=max_size)


CASES: list[tuple[str, PoolView, list[MemberView], int, set[tuple[str, str]], set[str]]] = [
    ("empty pool fills to min_ready", pool(3), [], 3, set(), set()),
    ("max_size caps the fill", pool(3, max_size=2), [], 2, set(), set()),
    ("full pool does nothing", pool(2), [member("a"), member("b")], 0, set(), set()),
    ("provisioning counts toward min_ready", pool(2), [member("a", phase="Provisioning")], 1, set(), set()),
    (
        "failing members are not replaced by a create loop",
        pool(1),
        [member("a", phase="Failed")],
        0,
        set(),
        set(),
    ),
    (
        "claimed members do not count toward min_ready",
        pool(1),
        [member("a", claimed_by="me", claimed_at=NOW)],
        1,
        set(),
        set(),
    ),
    (
        "claimed members count toward max_size",
        pool(1, max_size=1),
        [member("a", claimed_by="me", claimed_at=NOW)],
        0,
        set(),
        set(),
    ),
    (
        "released members are retired",
        pool(0),
        [member("a", claimed_by="me", claimed_at=NOW, released_at=NOW)],
        0,
        {("a", "released")},
        set(),
    ),
    (
        "expired claims are retired",
        pool(0),
        [member("a", claimed_by="me", claimed_at=NOW, claim_expires_at=NOW - timedelta(seconds=1))],
        0,
        {("a", "expired")},
        set(),
    ),
    (
        "a reservation of a claimer that died expires",
        pool(0),
        [member("a", claimed_by="me", phase="Provisioning", claim_expires_at=NOW)],
        0,
        {("a", "expired")},
        set(),
    ),
    (
        "unclaimed members of an old template are replaced",
        pool(1),
        [member("a", spec_hash=OLD)],
        1,
        {("a", "template")},
        set(),
    ),
    (
        "a replacement waits for room under max_size",
        pool(1, max_size=1),
        [member("a", spec_hash=OLD)],
        0,
        {("a", "template")},
        set(),
    ),
    (
        "claimed members keep an old template",
        pool(0),
        [member("a", spec_hash=OLD, claimed_by="me", claimed_at=NOW)],
        0,
        set(),
        set(),
    ),
    (
        "surplus goes not-ready first",
        pool(1),
        [member("a"), member("b", phase="Error"), member("c", phase="Provisioning")],
        0,
        {("b", "surplus"), ("c", "surplus")},
        set(),
    ),
    (
        "deleted retiring members are removed, others wait",
        pool(0),
        [
            member("a", desired_state="absent", phase="Deleted"),
            member("b", desired_state="absent", phase="Deleting"),
        ],
        0,
        set(),
        {"a"},
    ),
    (
        "retiring members still count toward max_size",
        pool(1, max_size=1),
        [member("a", desired_state="absent", phase="Deleting")],
        0,
        set(),
        set(),
    ),
    ("an unusable template creates nothing", pool(2, template_hash=None), [], 0, set(), set()),
]


@pytest.mark.parametrize(
    ("title", "the_pool", "members", "creates", "retired", "removed"), CASES, ids=[c[0] for c in CASES]
)
def test_pool_plan_table(
    title: str,
    the_pool: PoolView,
    members: list[MemberView],
    creates: int,
    retired: set[tuple[str, str]],
    removed: set[str],
) -> None:
    plan = one(the_pool, members)
    assert plan.creates == creates
    assert {(r.member, r.reason) for r in plan.retire} == retired
    assert set(plan.remove) == removed


def test_members_of_a_removed_pool_are_retired_unless_claimed() -> None:
    plans = plan_pools([], [member("a"), member("b", claimed_by="me", claimed_at=NOW)], NOW, create_budget=10)
    assert {(r.member, r.reason) for r in plans["p"].retire} == {("a", "pool-removed")}
    assert plans["p"].creates == 0


def test_the_create_budget_is_shared_in_turn() -> None:
    big = PoolView(name="big", template_hash=T, min_ready=50)
    small = PoolView(name="small", template_hash=T, min_ready=2)
    plans = plan_pools([big, small], [], NOW, create_budget=6)
    assert (plans["big"].creates, plans["small"].creates) == (4, 2)


def test_counts() -> None:
    plan = one(
        pool(1),
        [
            member("a"),
            member("b", claimed_by="x", claimed_at=NOW),
            member("c", phase="Provisioning", spec_hash=OLD),
        ],
    )
    c = plan.counts
    assert (c.ready, c.claimed, c.provisioning, c.retiring, c.total) == (1, 1, 0, 1, 3)


# -- properties ----------------------------------------------------------------------------------

phases = st.sampled_from(["Pending", "Provisioning", "Ready", "Error", "Failed", "Deleting", "Deleted"])


@st.composite
def members_st(draw: st.DrawFn) -> list[MemberView]:
    n = draw(st.integers(0, 12))
    out = []
    for i in range(n):
        claimed = draw(st.booleans())
        out.append(
            member(
                f"m{i}",
                phase=draw(phases),
                spec_hash=draw(st.sampled_from([T, OLD])),
                desired_state=draw(st.sampled_from(["running", "running", "absent"])),
                claimed_by="c" if claimed else None,
                claimed_at=NOW if claimed else None,
                released_at=NOW if claimed and draw(st.booleans()) else None,
            )
        )
    return out


@settings(max_examples=300, deadline=None)
@given(
    min_ready=st.integers(0, 8),
    extra=st.one_of(st.none(), st.integers(0, 6)),
    members=members_st(),
    budget=st.integers(0, 20),
)
def test_never_over_max_size(
    min_ready: int, extra: int | None, members: list[MemberView], budget: int
) -> None:
    max_size = None if extra is None else max(1, min_ready + extra)
    plan = one(pool(min_ready, max_size), members, budget)
    assert plan.creates <= budget
    after = len(members) - len(plan.remove) + plan.creates
    if max_size is not None:
        assert after <= max(max_size, len(members) - len(plan.remove))
        if len(members) - len(plan.remove) <= max_size:
            assert after <= max_size


@settings(max_examples=200, deadline=None)
@given(
    min_ready=st.integers(0, 8),
    extra=st.one_of(st.none(), st.integers(0, 6)),
    members=members_st(),
    budget=st.integers(1, 5),
)
def test_converges_to_min_ready(
    min_ready: int, extra: int | None, members: list[MemberView], budget: int
) -> None:
    """Drive plans as the reconciler would: created members turn Ready, retired ones are deleted and
    removed, claims stay. Unclaimed Ready members reach min_ready (within what max_size leaves)."""
    max_size = None if extra is None else max(1, min_ready + extra)
    the_pool = pool(min_ready, max_size)
    current = [replace(m, phase="Ready") if m.phase == "Provisioning" else m for m in members]
    serial = 0
    for _ in range(60):
        plan = one(the_pool, current, budget)
        retired = {r.member for r in plan.retire}
        nxt = []
        for m in current:
            if m.name in plan.remove:
                continue
            if m.name in retired or m.retiring:
                nxt.append(replace(m, desired_state="absent", phase="Deleted"))
            elif m.phase in ("Pending", "Provisioning", "Deleting", "Deleted"):
                nxt.append(replace(m, phase="Ready"))
            else:
                nxt.append(m)
        for _ in range(plan.creates):
            serial += 1
            nxt.append(member(f"n{serial}", phase="Pending"))
        if nxt == current and not plan.creates:
            break
        current = nxt
    live_claimed = sum(1 for m in current if m.claimed and not m.retiring)
    failing = sum(1 for m in current if not m.claimed and not m.retiring and m.phase in ("Error", "Failed"))
    ready = sum(1 for m in current if not m.claimed and not m.retiring and m.ready)
    target = min_ready - min(failing, min_ready)
    if max_size is not None:
        target = min(target, max(0, max_size - live_claimed - failing))
    assert ready == target
    if max_size is not None:
        assert len(current) <= max(max_size, len(members))


# -- headroom: extra unclaimed members while claims come in -------------------------------------------

REFILL = timedelta(seconds=4)


def ready_member(name: str, refill: timedelta = REFILL, **kw: Any) -> MemberView:
    return member(name, created_at=NOW - refill, ready_at=NOW, **kw)


def with_claims(p: PoolView, claims: int) -> PoolView:
    return replace(p, recent_claims=claims)


HOW = Headroom(factor=2.0, claim_window_seconds=60.0)


def test_headroom_is_claims_during_a_refill_times_the_factor() -> None:
    # 30 claims in 60 s = 0.5/s; a refill takes 4 s; factor 2 -> ceil(2 * 0.5 * 4) = 4 above min_ready.
    stock = [ready_member("a"), ready_member("b")]
    plan = plan_pools([with_claims(pool(2), 30)], stock, NOW, create_budget=100, how=HOW)["p"]
    assert (plan.target, plan.creates, plan.retire) == (6, 4, ())
    assert headroom(with_claims(pool(2), 30), stock, HOW) == 4
    assert refill_seconds(stock) == 4.0


@pytest.mark.parametrize(
    ("what", "the_pool", "how", "creates"),
    [
        ("off with factor 0", with_claims(pool(2), 30), Headroom(factor=0.0), 0),
        ("none without claims", pool(2), HOW, 0),
        ("max_size caps it", with_claims(pool(2, max_size=3), 30), HOW, 1),
        ("one claim alone is no rate", with_claims(pool(2), 1), HOW, 0),
        ("min_ready 0 wants no idle sandboxes", with_claims(pool(0), 30), HOW, 0),
        ("two claims in the window round up to one", with_claims(pool(2), 2), HOW, 1),
    ],
)
def test_headroom_table(what: str, the_pool: PoolView, how: Headroom, creates: int) -> None:
    plan = plan_pools([the_pool], [ready_member("a"), ready_member("b")], NOW, create_budget=100, how=how)
    assert plan["p"].creates == creates, what


def test_headroom_is_zero_until_a_member_has_been_ready() -> None:
    assert headroom(with_claims(pool(2), 30), [member("a", phase="Provisioning")], HOW) == 0


def test_the_headroom_goes_as_surplus_once_claims_stop() -> None:
    stock = [ready_member(f"m{i}") for i in range(6)]
    busy = plan_pools([with_claims(pool(2), 30)], stock, NOW, create_budget=100, how=HOW)["p"]
    assert busy.retire == () and busy.creates == 0
    quiet = plan_pools([pool(2)], stock, NOW, create_budget=100, how=HOW)["p"]
    assert sorted(r.reason for r in quiet.retire) == ["surplus"] * 4


@settings(max_examples=300, deadline=None)
@given(
    min_ready=st.integers(0, 8),
    extra=st.one_of(st.none(), st.integers(0, 6)),
    members=members_st(),
    budget=st.integers(0, 20),
    claims=st.integers(0, 500),
    factor=st.sampled_from([0.0, 0.5, 2.0, 10.0]),
    refill=st.integers(0, 120),
)
def test_headroom_never_over_max_size(
    min_ready: int,
    extra: int | None,
    members: list[MemberView],
    budget: int,
    claims: int,
    factor: float,
    refill: int,
) -> None:
    max_size = None if extra is None else max(1, min_ready + extra)
    timed = [replace(m, created_at=NOW - timedelta(seconds=refill), ready_at=NOW) for m in members]
    the_pool = with_claims(pool(min_ready, max_size), claims)
    plan = plan_pools([the_pool], timed, NOW, create_budget=budget, how=Headroom(factor, 60.0))["p"]
    assert plan.creates <= budget
    live = len(timed) - len(plan.remove)
    if max_size is not None and live <= max_size:
        assert live + plan.creates <= max_size
