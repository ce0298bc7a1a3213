"""Sandbox names are unique per lease, and a create loop on a taken name backs off (issue 17)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import db as dbmod
from controller.applier import Applier, ApplierConfig
from controller.config import load_settings
from controller.planner import sandbox_name
from controller.providers.base import LABEL_INSTANCE, LABEL_LEASE, LABEL_SPEC
from controller.providers.memory import MemoryProvider
from controller.reconciler import Reconciler
from controller.specs import NAME_RE
from models import Event, Lease, LeaseStatus

SPEC = "0123456789abcdef"
_slug = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
_instance = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?", fullmatch=True)


def test_the_colliding_pair_of_the_issue_is_apart() -> None:
    a = sandbox_name("default", "nightly-integration-test-runner-pool-41567", SPEC)
    b = sandbox_name("default", "nightly-integration-test-runner-pool-41919", SPEC)
    assert a != b
    assert len(a) <= 63 and len(b) <= 63


@pytest.mark.parametrize(
    ("instance", "lease", "expected"),
    [
        # names that fit keep the format (and the value) they always had
        ("default", "web", "default-web-01234567-"),
        ("prod-eu", "agent-7", "prod-eu-agent-7-01234567-"),
    ],
)
def test_names_that_fit_are_unchanged(instance: str, lease: str, expected: str) -> None:
    name = sandbox_name(instance, lease, SPEC)
    assert name.startswith(expected)
    assert len(name) == len(expected) + 6  # the 6-hex digest of before


def test_cut_names_carry_a_16_hex_digest() -> None:
    name = sandbox_name("a" * 32, "b" * 63, SPEC)
    assert len(name) == 63 and NAME_RE.fullmatch(name)
    assert len(name.rsplit("-", 1)[1]) == 16


def test_ten_thousand_long_names_with_one_prefix_are_distinct() -> None:
    """The shape of a pool: a long shared prefix and a counter, cut to the same readable part in
    groups of a thousand; a 6-hex digest expects a few collisions at this size, 16 hex none."""
    names = {
        sandbox_name("default", f"nightly-integration-test-runner-pool-{n}", SPEC) for n in range(10_000)
    }
    assert len(names) == 10_000


@settings(max_examples=300, derandomize=True, deadline=None)
@given(a=st.tuples(_instance, _slug), b=st.tuples(_instance, _slug))
def test_distinct_leases_get_distinct_names(a: tuple[str, str], b: tuple[str, str]) -> None:
    name_a, name_b = sandbox_name(*a, SPEC), sandbox_name(*b, SPEC)
    for name in (name_a, name_b):
        assert len(name) <= 63 and NAME_RE.fullmatch(name), name
    assert (name_a == name_b) == (a == b)


# -- a create that keeps hitting a taken name backs off -------------------------------------------

T0 = datetime(2026, 5, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_create_409_then_lookup_loop_backs_off(tmp_path: object) -> None:
    db = dbmod.connect(f"sqlite:///{tmp_path}/names.db")
    dbmod.upgrade(db)
    settings_ = load_settings(None, {"controller": {"instance": "me"}})
    with db.session() as session:
        session.add(Lease(name="victim", desired_state="running"))
    clock = Clock()
    provider = MemoryProvider()
    applier = Applier(
        provider, ApplierConfig(backoff_base_seconds=10, backoff_max_seconds=10_000), clock=clock
    )
    reconciler = Reconciler(db, provider, settings_, applier=applier, clock=clock)
    # Someone else holds the very name the lease wants (a collision, however it came about).
    wanted = reconciler.plan_pass()[0].actions[0].sandbox_name
    assert wanted is not None
    squatter = provider.add_sandbox(wanted, {LABEL_INSTANCE: "me", LABEL_LEASE: "other", LABEL_SPEC: "x"}).id
    failures: list[int] = []
    kinds: list[str] = []
    try:
        for _ in range(12):
            result = reconciler.run_pass()
            kinds += [o.action.kind for o in result.outcomes]
            with db.session() as session:
                row = session.get(LeaseStatus, "victim")
                assert row is not None
                failures.append(row.failures)
                wait = row.next_attempt_at
            clock.now = max(clock.now + timedelta(seconds=1), wait or clock.now)
    finally:
        applier.shutdown(timeout=5)
    assert "create" in kinds and "lookup" in kinds
    # the count never goes back to 0 while the name stays taken, and it keeps growing
    assert 0 not in failures
    assert failures == sorted(failures)
    assert failures[-1] >= 4
    assert squatter in provider.sandboxes  # never touched
    with db.session() as session:
        creates = session.scalars(
            sa.select(Event).where(
                Event.lease_name == "victim", Event.action == "create", Event.outcome != "attempt"
            )
        ).all()
    assert len(creates) == failures[-1]
    db.dispose()
