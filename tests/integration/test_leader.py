"""Leader election on SQLite and PostgreSQL: one winner, expiry takeover, fencing, release."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from controller.db import Database
from controller.errors import NotLeaderError
from controller.leader import LeaderElector


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


def elector(db: Database, holder: str, clock: Clock, lease: float = 10) -> LeaderElector:
    return LeaderElector(
        db, "default", lease, holder=holder, clock=lambda: clock.now, monotonic=lambda: clock.mono
    )


def test_one_leader_then_takeover_after_expiry(db: Database) -> None:
    clock = Clock()
    a, b = elector(db, "a", clock), elector(db, "b", clock)
    assert a.try_acquire() and a.term == 1
    assert not b.try_acquire()
    clock.advance(5)
    assert a.try_acquire() and a.term == 1  # renewal keeps the term
    assert not b.try_acquire()

    clock.advance(10.5)  # a stopped renewing; its lease expired
    assert not a.is_leader()  # and a already stopped acting (SAFETY margin) before that
    assert b.try_acquire() and b.term == 2
    assert not a.try_acquire()
    assert b.current() is not None and b.current().holder == "b"  # type: ignore[union-attr]


def test_leader_stops_acting_before_its_lease_can_expire(db: Database) -> None:
    clock = Clock()
    a = elector(db, "a", clock, lease=10)
    assert a.try_acquire()
    clock.advance(7.9)
    assert a.is_leader()
    clock.advance(0.2)  # 8.1 s > 0.8 * lease: nobody else can hold it yet, but a must stop acting
    assert not a.is_leader()


def test_fencing_refuses_writes_of_a_deposed_leader(db: Database) -> None:
    clock = Clock()
    a, b = elector(db, "a", clock), elector(db, "b", clock)
    assert a.try_acquire()
    with db.session() as session:
        a.fence(session)  # fine while leading

    # a's process stalls (GC pause, partition) past expiry; b takes over.
    clock.advance(11)
    assert b.try_acquire()
    # a's clock did not move (it was stalled): it still believes it leads, but the fence says no.
    a._valid_until = clock.mono + 5
    with pytest.raises(NotLeaderError), db.session() as session:
        a.fence(session)
    assert not a.is_leader()


def test_release_hands_over_at_once(db: Database) -> None:
    clock = Clock()
    a, b = elector(db, "a", clock), elector(db, "b", clock)
    assert a.try_acquire()
    a.release()
    assert not a.is_leader()
    assert b.try_acquire() and b.term == 2


def test_concurrent_acquire_has_exactly_one_winner(db: Database) -> None:
    clock = Clock()
    electors = [elector(db, f"r{i}", clock) for i in range(8)]
    results: dict[str, bool] = {}
    barrier = threading.Barrier(len(electors))

    def run(e: LeaderElector) -> None:
        barrier.wait()
        results[e.holder] = e.try_acquire()

    threads = [threading.Thread(target=run, args=(e,)) for e in electors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results.values()) == 1


def test_hold_refuses_beside_a_leader_and_releases_after(db: Database) -> None:
    clock = Clock()
    a, b = elector(db, "a", clock), elector(db, "b", clock)
    with a.hold():
        assert a.is_leader()
        with pytest.raises(NotLeaderError, match="led by a"), b.hold():
            pass
    assert not a.is_leader()
    with b.hold():
        assert b.term == 2


def test_fence_term_refuses_a_deposed_or_re_elected_replica(db: Database) -> None:
    """The applier's fence: leader on the local clock, same holder and term in the row, not expired."""
    clock = Clock()
    a, b = elector(db, "a", clock), elector(db, "b", clock)
    assert a.try_acquire()
    planned = a.term
    a.fence_term(planned)  # leading in the term the plan was made under: the call may go

    # a's host is suspended (its monotonic clock does not move) past expiry; b takes over.
    clock.now += timedelta(seconds=11)
    assert b.try_acquire()
    assert a.is_leader()  # a's local clock still says yes ...
    with pytest.raises(NotLeaderError):
        a.fence_term(planned)  # ... the row says no
    assert not a.is_leader()

    # b goes away, a is elected again in a new term: the old plan stays refused.
    b.release()
    assert a.try_acquire() and a.term is not None and a.term > (planned or 0)
    with pytest.raises(NotLeaderError):
        a.fence_term(planned)
    a.fence_term(a.term)


def test_fence_term_refuses_after_a_pause_without_a_query(db: Database) -> None:
    clock = Clock()
    a = elector(db, "a", clock)
    assert a.try_acquire()
    term = a.term
    clock.advance(9)  # SIGSTOP or a long wait: the local deadline (0.8 of the lease) has passed
    statements: list[str] = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    sa.event.listen(db.engine, "before_cursor_execute", listener)
    try:
        with pytest.raises(NotLeaderError):
            a.fence_term(term)
        with pytest.raises(NotLeaderError):
            a.fence_term(None)
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", listener)
    assert statements == []  # refused on the local clock alone
