"""A lease or pool member is claimable within one create latency (issue 12), on SQLite and PostgreSQL.

Two things the reconciler does for that, each counted here (memory provider, real database):

* a create answered ``started`` realizes the workspace in the same action: a new lease is ``Ready``
  after ONE pass (one create and one make_dir per lease, no ``realize_workspace`` pass after it);
* each lease's status and event are written as soon as its action finishes, in a transaction of its
  own: a lease whose quick action is done shows ``Ready`` while a slow create of the same pass is
  still waiting at the server; an early write refused by the leader fence is left to the end of the
  pass (which is fenced the same way), so nothing is written by a deposed replica.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from controller import db as dbmod
from controller.config import Settings, load_settings
from controller.errors import NotLeaderError, TransientError
from controller.providers.memory import MemoryProvider
from controller.reconciler import Reconciler, build_reconciler
from models import Event, LeaseStatus
from tests.unit.test_bad_rows import insert_raw

ME = "early"


def make_settings() -> Settings:
    return load_settings(None, {"controller": {"instance": ME, "backoff_base_seconds": 0.01}})


def phases(db: dbmod.Database) -> dict[str, str | None]:
    with db.session(readonly=True) as session:
        return {row.lease_name: row.phase for row in session.scalars(sa.select(LeaseStatus))}


def events(db: dbmod.Database, lease: str) -> list[tuple[str, str]]:
    with db.session(readonly=True) as session:
        rows = session.scalars(sa.select(Event).where(Event.lease_name == lease).order_by(Event.id))
        return [(e.action, e.outcome) for e in rows]


def add(db: dbmod.Database, *names: str) -> None:
    for name in names:
        insert_raw(db, name=name, desired_state="running", env="{}", labels="{}")


@pytest.fixture
def reconcilers() -> Iterator[list[Reconciler]]:
    made: list[Reconciler] = []
    yield made
    for r in made:
        r.applier.shutdown(timeout=5)


def test_new_leases_are_ready_after_one_pass(db: dbmod.Database, reconcilers: list[Reconciler]) -> None:
    names = [f"box-{i}" for i in range(6)]
    add(db, *names)
    provider = MemoryProvider()
    r = build_reconciler(db, provider, make_settings())
    reconcilers.append(r)
    result = r.run_pass()
    assert sorted(o.action.kind for o in result.outcomes) == ["create"] * 6
    assert phases(db) == dict.fromkeys(names, "Ready")
    assert provider.counters["create"] == 6 and provider.counters["make_dir"] == 6
    with db.session(readonly=True) as session:
        rows = list(session.scalars(sa.select(LeaseStatus)))
    assert all(row.workspace_path and row.ready_at and row.sandbox_id for row in rows)
    # one create attempt and one create event per lease; the next pass has nothing to do
    assert events(db, "box-0") == [("create", "attempt"), ("create", "ok")]
    assert r.run_pass().outcomes == []
    assert provider.counters["make_dir"] == 6


def test_a_workspace_that_fails_after_create_is_realized_next_pass(
    db: dbmod.Database, reconcilers: list[Reconciler]
) -> None:
    add(db, "flaky")
    provider = MemoryProvider()
    provider.fail_next("make_dir", TransientError("toolbox not up yet"))
    r = build_reconciler(db, provider, make_settings())
    reconcilers.append(r)
    [outcome] = r.run_pass().outcomes
    assert outcome.ok and outcome.workspace_path is None  # the create itself succeeded
    assert phases(db) == {"flaky": "Provisioning"}
    assert [o.action.kind for o in r.run_pass().outcomes] == ["realize_workspace"]
    assert phases(db) == {"flaky": "Ready"}
    assert provider.counters["create"] == 1


def _gate_creates_of(provider: MemoryProvider, lease: str) -> tuple[threading.Event, threading.Event]:
    """The create of ``lease`` waits at the server until ``release`` is set; ``entered`` says it is."""
    entered, release = threading.Event(), threading.Event()

    def on_call(op: str, key: str) -> None:
        if op == "create" and lease in key:
            entered.set()
            assert release.wait(30), "gate never opened"

    provider.on_call = on_call
    return entered, release


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_each_status_is_written_when_its_action_finishes(
    db: dbmod.Database, reconcilers: list[Reconciler]
) -> None:
    provider = MemoryProvider()
    r = build_reconciler(db, provider, make_settings())
    reconcilers.append(r)
    add(db, "quick")
    provider.fail_next("make_dir", TransientError("toolbox not up yet"))
    r.run_pass()  # quick: created, workspace not realized yet (Provisioning)
    assert phases(db) == {"quick": "Provisioning"}
    add(db, "slow", "also-quick")
    entered, release = _gate_creates_of(provider, "slow")
    thread, errors = _in_thread(r.run_pass)
    try:
        assert entered.wait(10)
        # The pass is still running (slow's create is held at the server), yet the quick ones are
        # recorded, each with its event.
        deadline = threading.Event()
        for _ in range(200):
            now = phases(db)
            if now.get("quick") == "Ready" and now.get("also-quick") == "Ready":
                break
            deadline.wait(0.05)
        assert phases(db) == {"quick": "Ready", "also-quick": "Ready", "slow": "Provisioning"}
        assert thread.is_alive()
        assert events(db, "quick")[-1] == ("realize_workspace", "ok")
        assert events(db, "slow") == [("create", "attempt")]
    finally:
        release.set()
        thread.join(30)
    assert not errors
    assert phases(db) == dict.fromkeys(("quick", "also-quick", "slow"), "Ready")
    # written once: one event per action, none repeated by the end-of-pass write
    assert events(db, "quick") == [("create", "attempt"), ("create", "ok"), ("realize_workspace", "ok")]
    assert events(db, "slow") == [("create", "attempt"), ("create", "ok")]


class _Deposable:
    """A stand-in leader elector: leads until ``depose()``; counts the fenced writes it refused."""

    holder = "test-holder"
    term = 1

    def __init__(self) -> None:
        self.leading = True
        self.refused = 0

    def is_leader(self) -> bool:
        return self.leading

    def depose(self) -> None:
        self.leading = False

    def fence(self, session: object) -> None:
        if not self.leading:
            self.refused += 1
            raise NotLeaderError("deposed")

    def fence_term(self, term: int | None) -> None:
        if not self.leading:
            raise NotLeaderError("deposed")


def test_a_replica_deposed_during_the_pass_writes_nothing_after(
    db: dbmod.Database, reconcilers: list[Reconciler]
) -> None:
    """Deposed while a create is held at the server: the create's early write and the end-of-pass
    write are both refused by the fence; the pass fails with NotLeaderError."""
    provider = MemoryProvider()
    elector = _Deposable()
    r = build_reconciler(db, provider, make_settings(), elector=elector)  # type: ignore[arg-type]
    reconcilers.append(r)
    add(db, "held")
    entered, release = _gate_creates_of(provider, "held")
    thread, errors = _in_thread(r.run_pass)
    try:
        assert entered.wait(10)
        elector.depose()
    finally:
        release.set()
        thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], NotLeaderError)
    assert elector.refused == 2  # the early write, then the end-of-pass write
    assert phases(db) == {"held": "Provisioning"}  # as the create attempt left it
    assert events(db, "held") == [("create", "attempt")]
