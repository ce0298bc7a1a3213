"""collect_garbage against the memory provider and a real database (SQLite and PostgreSQL).

Asserts on the provider's state and on the rows, not on mocks: orphans are collected after the
grace (also across a "restart"), dry runs change nothing, stale status rows go only once their
sandbox is gone, retention deletes old rows in bounded batches, and a replica that is not the leader
writes and deletes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from controller import db as dbmod
from controller.config import Settings, load_settings
from controller.errors import NotLeaderError, RateLimitedError, TransientError
from controller.gc import GC_DELETE_ACTION, collect_garbage
from controller.leader import LeaderElector
from controller.providers.base import LABEL_INSTANCE, LABEL_LEASE, LABEL_SPEC, ObservedSandbox
from controller.providers.memory import MemoryProvider
from models import Event, Execution, LeaderElection, Lease, LeaseStatus, OrphanSighting, metadata

ME = "unit"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
GRACE = 600.0


def make_settings(**controller: Any) -> Settings:
    return load_settings(None, {"controller": {"instance": ME, "orphan_grace_seconds": GRACE, **controller}})


def labels(lease: str | None = None, instance: str | None = ME) -> dict[str, str]:
    result = {"team": "t"}
    if instance is not None:
        result[LABEL_INSTANCE] = instance
    if lease is not None:
        result[LABEL_LEASE] = lease
        result[LABEL_SPEC] = "0123abcd"
    return result


def add_lease(db: dbmod.Database, name: str, desired: str = "running", **status: Any) -> None:
    with db.session() as session:
        session.add(Lease(name=name, desired_state=desired))
        if status:
            session.add(LeaseStatus(lease_name=name, **status))


def table_rows(db: dbmod.Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table gc may touch, for before/after comparisons."""
    snapshot: dict[str, list[tuple[Any, ...]]] = {}
    with db.session() as session:
        for name in ("leases", "lease_status", "events", "executions", "orphan_sightings"):
            table = metadata.tables[name]
            snapshot[name] = sorted((tuple(row) for row in session.execute(sa.select(table)).all()), key=repr)
    return snapshot


def sightings(db: dbmod.Database) -> dict[str, OrphanSighting]:
    with db.session() as session:
        return {row.sandbox_id: row for row in session.scalars(sa.select(OrphanSighting))}


def gc_events(db: dbmod.Database) -> list[Event]:
    with db.session() as session:
        return list(
            session.scalars(sa.select(Event).where(Event.action == GC_DELETE_ACTION).order_by(Event.id))
        )


@pytest.fixture
def provider() -> MemoryProvider:
    return MemoryProvider()


@pytest.fixture
def fleet(db: dbmod.Database, provider: MemoryProvider) -> dict[str, str]:
    """A wanted sandbox, a deleted lease's sandbox, a ghost, another instance's and an unlabelled one."""
    add_lease(db, "alpha")
    ids = {
        "wanted": provider.add_sandbox("lease-alpha", labels("alpha")).id,
        "deleted": provider.add_sandbox("lease-gone", labels("gone")).id,
        "ghost": provider.add_sandbox("ghost", labels()).id,
        "foreign": provider.add_sandbox("foreign", labels("gone", instance="other")).id,
        "unlabelled": provider.add_sandbox("unlabelled", {"team": "t"}).id,
    }
    return ids


def live(provider: MemoryProvider) -> set[str]:
    return set(provider.sandboxes)


# -- orphans ----------------------------------------------------------------------------------------


def test_deleted_lease_sandbox_is_collected_after_grace(
    db: dbmod.Database, provider: MemoryProvider, fleet: dict[str, str]
) -> None:
    settings = make_settings()
    first = collect_garbage(db, provider, settings, dry_run=False, now=T0)
    assert first.deleted == ()
    assert {o.sandbox.id for o in first.report.in_grace} == {fleet["deleted"], fleet["ghost"]}
    assert set(sightings(db)) == {fleet["deleted"], fleet["ghost"]}
    assert live(provider) == set(fleet.values())

    second = collect_garbage(db, provider, settings, dry_run=False, now=T0 + timedelta(seconds=GRACE))
    assert {o.sandbox.id for o in second.deleted} == {fleet["deleted"], fleet["ghost"]}
    assert live(provider) == {fleet["wanted"], fleet["foreign"], fleet["unlabelled"]}
    assert sightings(db) == {}
    events = gc_events(db)
    assert {(e.sandbox_id, e.lease_name, e.outcome) for e in events} == {
        (fleet["deleted"], "gone", "ok"),
        (fleet["ghost"], None, "ok"),
    }
    assert all("orphan" in (e.message or "") for e in events)
    # GC only listed with the instance filter, confirmed each orphan by id and deleted it
    assert {op for op, _ in provider.calls} == {"list", "get", "delete"}
    assert sorted(key for op, key in provider.calls if op == "get") == sorted(
        [fleet["deleted"], fleet["ghost"]]
    )
    assert sorted(key for op, key in provider.calls if op == "delete") == sorted(
        [fleet["deleted"], fleet["ghost"]]
    )


def test_grace_survives_a_restart(database_url: str, provider: MemoryProvider, fleet: dict[str, str]) -> None:
    settings = make_settings()
    for offset, expect_deleted in ((0, False), (300, False), (GRACE - 1, False), (GRACE + 1, True)):
        db = dbmod.connect(database_url)  # a new process: only the database remembers
        try:
            result = collect_garbage(
                db, provider, settings, dry_run=False, now=T0 + timedelta(seconds=offset)
            )
            assert bool(result.deleted) is expect_deleted, offset
            if not expect_deleted:
                rows = sightings(db)
                assert rows[fleet["deleted"]].first_seen_at == T0
                assert rows[fleet["deleted"]].last_seen_at == T0 + timedelta(seconds=offset)
        finally:
            db.dispose()
    assert fleet["deleted"] not in provider.sandboxes


def test_sandbox_age_bounds_the_clock(db: dbmod.Database, provider: MemoryProvider) -> None:
    """A sighting older than the sandbox (e.g. clock skew) does not make it deletable early."""
    provider.advance((T0 - datetime(2026, 1, 1, tzinfo=UTC)).total_seconds() - 100)  # created at T0-100s
    sandbox = provider.add_sandbox("young", labels("gone"))
    with db.session() as session:
        first = T0 - timedelta(days=1)
        session.add(OrphanSighting(sandbox_id=sandbox.id, first_seen_at=first, last_seen_at=first))
    result = collect_garbage(db, provider, make_settings(), dry_run=False, now=T0)
    assert result.deleted == () and sandbox.id in provider.sandboxes
    result = collect_garbage(db, provider, make_settings(), dry_run=False, now=T0 + timedelta(seconds=500))
    assert [o.sandbox.id for o in result.deleted] == [sandbox.id]


def test_dry_run_changes_nothing(db: dbmod.Database, provider: MemoryProvider, fleet: dict[str, str]) -> None:
    add_lease(db, "old", desired="absent", phase="Deleted", updated_at=T0 - timedelta(days=90))
    with db.session() as session:
        session.add(Event(at=T0 - timedelta(days=90), action="create", outcome="ok"))
        session.add(LeaseStatus(lease_name="vanished", phase="Ready", sandbox_id="sb-none"))
        session.execute(sa.update(Lease).values(updated_at=T0 - timedelta(days=90)))
    before = table_rows(db)
    settings = make_settings(deleted_lease_retention_days=1)
    for grace in (0.0, GRACE):
        result = collect_garbage(db, provider, settings, dry_run=True, now=T0, grace_seconds=grace)
        assert result.dry_run and result.deleted == ()
        ids = {o.sandbox.id: o.status for o in result.report.orphans}
        expected = "deletable" if grace == 0 else "in_grace"
        assert ids == {fleet["deleted"]: expected, fleet["ghost"]: expected}
        assert result.cleanup.stale_status_rows == 1
        assert result.cleanup.purged_leases == 1
        assert result.cleanup.events == 1
    assert table_rows(db) == before
    assert live(provider) == set(fleet.values())
    assert {op for op, _ in provider.calls} == {"list"}


def test_dry_run_needs_no_leadership(
    db: dbmod.Database, provider: MemoryProvider, fleet: dict[str, str]
) -> None:
    elector = LeaderElector(db, ME, 15)
    result = collect_garbage(db, provider, make_settings(), dry_run=True, now=T0, elector=elector)
    assert len(result.report.orphans) == 2


def test_list_happens_before_reading_leases(db: dbmod.Database, provider: MemoryProvider) -> None:
    """A lease inserted while the sandboxes are listed is seen: its sandbox is not an orphan."""
    sandbox = provider.add_sandbox("new", labels("fresh"))

    def insert_lease(op: str, _key: str) -> None:
        if op == "list":
            add_lease(db, "fresh")

    provider.on_call = insert_lease
    result = collect_garbage(db, provider, make_settings(), dry_run=False, now=T0, grace_seconds=0)
    assert result.report.orphans == ()
    assert sandbox.id in provider.sandboxes


def test_sighting_dropped_when_lease_returns(
    db: dbmod.Database, provider: MemoryProvider, fleet: dict[str, str]
) -> None:
    settings = make_settings()
    collect_garbage(db, provider, settings, dry_run=False, now=T0)
    add_lease(db, "gone")
    collect_garbage(db, provider, settings, dry_run=False, now=T0 + timedelta(seconds=GRACE))
    assert sightings(db) == {}  # the lease's is dropped, the ghost's went with its sandbox
    assert fleet["deleted"] in provider.sandboxes
    assert fleet["ghost"] not in provider.sandboxes


def test_delete_failure_is_recorded_and_retried(
    db: dbmod.Database, provider: MemoryProvider, fleet: dict[str, str]
) -> None:
    settings = make_settings()
    provider.fail_next("delete", TransientError("server said 503"))
    result = collect_garbage(db, provider, settings, dry_run=False, now=T0, grace_seconds=0)
    assert len(result.failed) == 1 and len(result.deleted) == 1
    failed_id = result.failed[0].orphan.sandbox.id
    assert failed_id in provider.sandboxes
    assert set(sightings(db)) == {failed_id}
    outcomes = sorted(e.outcome for e in gc_events(db))
    assert outcomes == ["error", "ok"]
    again = collect_garbage(db, provider, settings, dry_run=False, now=T0, grace_seconds=0)
    assert [o.sandbox.id for o in again.deleted] == [failed_id]
    assert sightings(db) == {}


def test_rate_limit_stops_the_run(
    db: dbmod.Database, provider: MemoryProvider, fleet: dict[str, str]
) -> None:
    provider.fail_next("delete", RateLimitedError("429", retry_after=5))
    result = collect_garbage(db, provider, make_settings(), dry_run=False, now=T0, grace_seconds=0)
    assert len(result.failed) == 1 and len(result.skipped) == 1 and result.deleted == ()
    assert provider.counters["delete"] == 1


def test_secrets_never_reach_events(db: dbmod.Database, provider: MemoryProvider) -> None:
    provider.add_sandbox("ghost", labels("gone"))
    settings = load_settings(
        None,
        {"controller": {"instance": ME}, "daytona": {"api_key": "super-secret-key"}},
    )
    collect_garbage(db, provider, settings, dry_run=False, now=T0, grace_seconds=0)
    with db.session() as session:
        text = repr([(e.message, e.lease_name) for e in session.scalars(sa.select(Event))])
    assert "super-secret-key" not in text


# -- stale rows -------------------------------------------------------------------------------------


def test_stale_status_rows_go_only_once_the_sandbox_is_gone(
    db: dbmod.Database, provider: MemoryProvider, fleet: dict[str, str]
) -> None:
    gone_sb = fleet["deleted"]
    out_of_band = provider.add_sandbox("lease-oob", labels("oob")).id
    with db.session() as session:
        session.add(
            LeaseStatus(lease_name="gone", phase="Ready", sandbox_id=gone_sb, sandbox_name="lease-gone")
        )
        session.add(LeaseStatus(lease_name="oob", phase="Ready", sandbox_id=out_of_band))
        session.add(LeaseStatus(lease_name="alpha", phase="Ready", sandbox_id=fleet["wanted"]))
        # a deleted lease whose sandbox is found only by its recorded id (no lease label)
        session.add(LeaseStatus(lease_name="by-id", phase="Ready", sandbox_id=fleet["ghost"]))
        session.add(LeaseStatus(lease_name="never", phase="Pending"))
    settings = make_settings()

    def status_names() -> set[str]:
        with db.session() as session:
            return set(session.scalars(sa.select(LeaseStatus.lease_name)))

    first = collect_garbage(db, provider, settings, dry_run=False, now=T0)
    assert first.cleanup.stale_status_rows == 1  # only "never": every other sandbox still exists
    assert status_names() == {"gone", "oob", "alpha", "by-id"}

    provider.remove(out_of_band)  # deleted behind our back
    second = collect_garbage(db, provider, settings, dry_run=False, now=T0 + timedelta(seconds=1))
    assert second.cleanup.stale_status_rows == 1
    assert status_names() == {"gone", "alpha", "by-id"}

    third = collect_garbage(db, provider, settings, dry_run=False, now=T0 + timedelta(seconds=GRACE))
    assert {o.sandbox.id for o in third.deleted} == {gone_sb, fleet["ghost"]}
    assert third.cleanup.stale_status_rows == 2
    assert status_names() == {"alpha"}


def test_deleted_leases_purged_after_retention(db: dbmod.Database, provider: MemoryProvider) -> None:
    old = T0 - timedelta(days=3)
    recent = T0 - timedelta(hours=1)
    add_lease(db, "old", desired="absent", phase="Deleted", updated_at=old)
    add_lease(db, "recent", desired="absent", phase="Deleted", updated_at=recent)
    add_lease(db, "still-there", desired="absent", phase="Deleted", updated_at=old)
    add_lease(db, "deleting", desired="absent", phase="Deleting", updated_at=old)
    add_lease(db, "stopped", desired="stopped", phase="Deleted", updated_at=old)
    with db.session() as session:
        session.execute(sa.update(Lease).values(updated_at=old))
    provider.add_sandbox("lease-still-there", labels("still-there"))

    def lease_names() -> set[str]:
        with db.session() as session:
            return set(session.scalars(sa.select(Lease.name)))

    off = collect_garbage(db, provider, make_settings(), dry_run=False, now=T0)
    assert off.cleanup.purged_leases == 0
    assert len(lease_names()) == 5

    on = collect_garbage(db, provider, make_settings(deleted_lease_retention_days=2), dry_run=False, now=T0)
    assert on.cleanup.purged_leases == 1
    assert lease_names() == {"recent", "still-there", "deleting", "stopped"}
    with db.session() as session:
        assert session.get(LeaseStatus, "old") is None
        assert session.get(LeaseStatus, "recent") is not None


# -- retention --------------------------------------------------------------------------------------


@pytest.fixture
def count_deletes(db: dbmod.Database) -> Iterator[list[str]]:
    statements: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            statements.append(statement)

    sa.event.listen(db.engine, "before_cursor_execute", before)
    yield statements
    sa.event.remove(db.engine, "before_cursor_execute", before)


def test_retention_deletes_old_rows_in_batches(
    db: dbmod.Database, provider: MemoryProvider, count_deletes: list[str]
) -> None:
    old_event = T0 - timedelta(days=31)
    with db.session() as session:
        session.add_all(Event(at=old_event, action="create", outcome="ok") for _ in range(10))
        session.add_all(Event(at=T0 - timedelta(days=29), action="create", outcome="ok") for _ in range(2))
        old, new = T0 - timedelta(days=8), T0 - timedelta(days=6)
        for state, created, finished in (
            ("succeeded", old, old),  # old, terminal: goes
            ("failed", old, None),  # old by created_at: goes
            ("cancelled", old, old),  # goes
            ("timed_out", old, new),  # finished recently: stays
            ("queued", old, None),  # not terminal: stays
            ("running", old, None),  # not terminal: stays
            ("error", new, new),  # recent: stays
        ):
            session.add(
                Execution(
                    lease_name="x", command="true", state=state, created_at=created, finished_at=finished
                )
            )
    settings = make_settings(retention_batch_size=3)
    result = collect_garbage(db, provider, settings, dry_run=True, now=T0)
    assert (result.cleanup.events, result.cleanup.executions) == (10, 3)
    assert count_deletes == []

    result = collect_garbage(db, provider, settings, dry_run=False, now=T0)
    assert (result.cleanup.events, result.cleanup.executions) == (10, 3)
    with db.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Event)) == 2
        states = sorted(session.scalars(sa.select(Execution.state)))
    assert states == ["error", "queued", "running", "timed_out"]
    event_deletes = [s for s in count_deletes if "events" in s]
    execution_deletes = [s for s in count_deletes if "executions" in s]
    assert len(event_deletes) == 4  # 3 + 3 + 3 + 1
    assert len(execution_deletes) == 2  # a full batch of 3, then an empty one ends the loop
    # a second run finds nothing to do
    again = collect_garbage(db, provider, settings, dry_run=False, now=T0)
    assert (again.cleanup.events, again.cleanup.executions) == (0, 0)


# -- fencing ----------------------------------------------------------------------------------------


def test_not_leader_writes_and_deletes_nothing(
    db: dbmod.Database, provider: MemoryProvider, fleet: dict[str, str]
) -> None:
    before = table_rows(db)
    elector = LeaderElector(db, ME, 15)  # never acquired
    with pytest.raises(NotLeaderError):
        collect_garbage(
            db, provider, make_settings(), dry_run=False, now=T0, grace_seconds=0, elector=elector
        )
    assert table_rows(db) == before
    assert live(provider) == set(fleet.values())
    assert provider.counters["delete"] == 0


def test_deposed_leader_writes_and_deletes_nothing(
    db: dbmod.Database, provider: MemoryProvider, fleet: dict[str, str]
) -> None:
    elector = LeaderElector(db, ME, 15)
    assert elector.try_acquire()
    with db.session() as session:  # another replica took over; this one has not noticed yet
        session.execute(sa.update(LeaderElection).values(holder="someone-else", term=LeaderElection.term + 1))
    before = table_rows(db)
    assert elector.is_leader()
    with pytest.raises(NotLeaderError):
        collect_garbage(
            db, provider, make_settings(), dry_run=False, now=T0, grace_seconds=0, elector=elector
        )
    assert table_rows(db) == before
    assert provider.counters["delete"] == 0
    assert live(provider) == set(fleet.values())


def test_leader_collects(db: dbmod.Database, provider: MemoryProvider, fleet: dict[str, str]) -> None:
    elector = LeaderElector(db, ME, 15)
    assert elector.try_acquire()
    result = collect_garbage(
        db, provider, make_settings(), dry_run=False, now=T0, grace_seconds=0, elector=elector
    )
    assert {o.sandbox.id for o in result.deleted} == {fleet["deleted"], fleet["ghost"]}
    assert {e.controller_id for e in gc_events(db)} == {elector.holder}


# -- a list that flaps or lies (issue 17) -----------------------------------------------------------


def test_orphan_missing_from_one_list_restarts_its_grace(
    db: dbmod.Database, provider: MemoryProvider
) -> None:
    orphan = provider.add_sandbox("lease-gone", labels("gone")).id
    settings = make_settings()
    collect_garbage(db, provider, settings, now=T0)
    assert sightings(db)[orphan].first_seen_at == T0
    provider.list_hook = lambda result: [sb for sb in result if sb.id != orphan]  # absent once
    collect_garbage(db, provider, settings, now=T0 + timedelta(seconds=GRACE / 2))
    assert orphan not in sightings(db)
    provider.list_hook = None  # present again: the clock starts over
    back = T0 + timedelta(seconds=GRACE)
    result = collect_garbage(db, provider, settings, now=back)
    assert result.deleted == ()
    assert orphan in provider.sandboxes
    assert sightings(db)[orphan].first_seen_at == back
    later = collect_garbage(db, provider, settings, now=back + timedelta(seconds=GRACE))
    assert [o.sandbox.id for o in later.deleted] == [orphan]
    assert orphan not in provider.sandboxes


def test_stale_list_never_decides_a_delete(db: dbmod.Database, provider: MemoryProvider) -> None:
    """The list still shows old labels; the get by id shows the truth, which wins."""
    add_lease(db, "alpha")
    adopted = provider.add_sandbox("adopted", labels("alpha")).id  # ours and wanted, per get
    moved = provider.add_sandbox("moved", labels("gone", instance="other")).id  # not ours any more
    vanished = provider.add_sandbox("vanished", labels("gone")).id
    stale = {adopted: labels("gone"), moved: labels("gone")}

    def lie(result: list[ObservedSandbox]) -> list[ObservedSandbox]:
        return [dataclasses.replace(sb, labels=stale.get(sb.id, sb.labels)) for sb in result]

    everything = provider.list_sandboxes({})  # taken while all three exist
    provider.list_hook = lambda _result: lie(everything)  # stale labels, and never drops anything
    settings = make_settings()
    first = collect_garbage(db, provider, settings, now=T0)
    assert {o.sandbox.id for o in first.report.in_grace} == {adopted, moved, vanished}
    provider.remove(vanished)
    result = collect_garbage(db, provider, settings, now=T0 + timedelta(seconds=GRACE))
    assert result.deleted == ()
    assert {adopted, moved} <= set(provider.sandboxes)
    assert not any(op == "delete" for op, _ in provider.calls)
    assert sightings(db) == {}  # unconfirmed orphans lose their grace clock
    assert gc_events(db) == []


LONG = "x" * 64 + "-ünïcødé-" + "y" * 200


@pytest.mark.parametrize("label", [LONG, "ünïcødé-lease", "é" * 63, "a" * 63 + "b"])
def test_long_and_non_ascii_lease_labels_are_collected(
    db: dbmod.Database, provider: MemoryProvider, label: str
) -> None:
    other = provider.add_sandbox("other", labels("other-gone")).id
    odd = provider.add_sandbox("odd", labels(label)).id
    settings = make_settings()
    first = collect_garbage(db, provider, settings, now=T0)
    assert {o.sandbox.id for o in first.report.in_grace} == {other, odd}
    stored = sightings(db)[odd].lease_label
    assert stored is not None and len(stored) <= 63
    assert stored == label if len(label) <= 63 else stored.startswith(label[:20])
    second = collect_garbage(db, provider, settings, now=T0 + timedelta(seconds=GRACE))
    assert {o.sandbox.id for o in second.deleted} == {other, odd}
    events = {e.sandbox_id: e for e in gc_events(db)}
    assert events[odd].lease_name is not None and len(events[odd].lease_name) <= 63


def test_bounded_labels_stay_distinct() -> None:
    from controller.gc import bounded

    a, b = "z" * 100 + "a", "z" * 100 + "b"
    assert bounded(a) != bounded(b)
    assert len(bounded(a) or "") == 63
    assert bounded("short") == "short" and bounded(None) is None
