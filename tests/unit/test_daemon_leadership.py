"""The daemon's leader job and the reconcile job it gates (issue: a daemon started after a SIGKILLed
leader, with a 1 s lease, reconciled once and then sat idle).

Two things made that possible: the leader job renewed every ``max(1 s, lease/3)``, i.e. every 1 s
for a 1 s lease, while a renewal lets a replica act for only ``lease * SAFETY`` = 0.8 s, so its
leadership lapsed for 0.2 s of every second; and a reconcile run that found itself not leading
returned without a pass and without the follow-up its pool needed. A follow-up (0.3 s after a busy
pass) that landed in the lapse fixed the reconcile job's phase there: both jobs run every second, so
every later run fell in the lapse too. These tests count lapses and wake-ups on a fake clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controller import db as dbmod
from controller.config import load_settings
from controller.daemon import WAKE_AGAIN_SECONDS, Daemon
from controller.errors import NotLeaderError
from controller.leader import LeaderElector
from controller.providers.memory import MemoryProvider
from models import LeaderElection, utcnow


@pytest.fixture
def database(tmp_path: Path) -> Iterator[dbmod.Database]:
    db = dbmod.connect(f"sqlite:///{tmp_path / 'd.db'}")
    dbmod.upgrade(db)
    yield db
    db.dispose()


def _daemon(database: dbmod.Database, lease: float, interval: float = 3600) -> Daemon:
    settings = load_settings(
        None,
        {
            "server": {"listen": "127.0.0.1:0"},
            "controller": {"leader_lease_seconds": lease, "reconcile_interval_seconds": interval},
        },
    )
    daemon = Daemon(settings, database, MemoryProvider())
    daemon._add_jobs(utcnow())
    return daemon


def _leading_with_no_pass_due(database: dbmod.Database) -> tuple[Daemon, Any]:
    """A leading daemon whose reconcile job is an hour away and no wake pending: any pass sooner
    is one the code under test asked for."""
    daemon = _daemon(database, lease=1.0)
    daemon.job_leader()
    reconcile = daemon.scheduler.get_job("reconcile")
    assert reconcile is not None
    reconcile.modify(next_run_time=utcnow() + timedelta(seconds=3600))
    daemon._wake.clear()
    return daemon, reconcile


def _interval(daemon: Daemon, job_id: str) -> float:
    job = daemon.scheduler.get_job(job_id)
    assert job is not None
    return float(job.trigger.interval_length)


@pytest.mark.parametrize("lease", [1.0, 1.2, 2.0, 3.0, 15.0])  # config: at least 1 s
def test_a_leader_renewing_on_the_daemons_schedule_never_lapses(
    database: dbmod.Database, lease: float
) -> None:
    """Renew at the leader job's interval, sample is_leader() at ten points of every period (the last
    just before the next renewal): no sample may find the leader not leading."""
    every = _interval(_daemon(database, lease), "leader")
    mono = [0.0]
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    elector = LeaderElector(
        database, "cadence", lease, holder="a", clock=lambda: now[0], monotonic=lambda: mono[0]
    )
    lapses = 0
    for period in range(30):
        renewed_at = 1000.0 + period * every
        mono[0] = renewed_at
        now[0] = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=period * every)
        assert elector.try_acquire()
        for step in range(1, 11):  # up to just before the next renewal
            mono[0] = renewed_at + every * step / 10 - (1e-6 if step == 10 else 0.0)
            lapses += not elector.is_leader()
    assert lapses == 0


def _counting_wakes(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    wakes: list[int] = []
    real = daemon.wake_reconcile

    def counted() -> None:
        wakes.append(1)
        real()

    monkeypatch.setattr(daemon, "wake_reconcile", counted)
    return wakes


def test_taking_over_from_a_killed_leader_reconciles_at_once(
    database: dbmod.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row of a SIGKILLed leader expires; the replica that takes it over wakes its reconcile job
    (not after the interval: 3600 s here) once, and not again on its renewals."""
    with database.session() as session:
        past = utcnow() - timedelta(seconds=1)
        session.add(
            LeaderElection(
                instance="default",
                holder="killed",
                term=4,
                acquired_at=past,
                renewed_at=past,
                expires_at=past,
            )
        )
    daemon = _daemon(database, lease=1.0)
    wakes = _counting_wakes(daemon, monkeypatch)
    reconcile = daemon.scheduler.get_job("reconcile")
    assert reconcile is not None
    reconcile.modify(next_run_time=utcnow() + timedelta(seconds=3600))  # a run skipped while not leading

    daemon.job_leader()
    assert daemon.elector.term == 5
    assert len(wakes) == 1
    assert reconcile.next_run_time <= utcnow()
    for _ in range(3):
        daemon.job_leader()  # renewals
    assert len(wakes) == 1


def test_leadership_back_after_a_lapse_reconciles_at_once(
    database: dbmod.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal that comes after the leader stopped acting (a late renewal, a database blip) wakes the
    reconcile job: the runs in between returned without a pass or a follow-up."""
    daemon = _daemon(database, lease=1.0)
    mono = [1000.0]
    monkeypatch.setattr(daemon.elector, "_monotonic", lambda: mono[0])
    wakes = _counting_wakes(daemon, monkeypatch)
    daemon.job_leader()
    assert len(wakes) == 1  # the first acquisition
    mono[0] += 0.3
    daemon.job_leader()
    assert len(wakes) == 1  # a renewal in time
    mono[0] += 0.9  # past lease * SAFETY: the local lease lapsed, the row is still ours
    assert not daemon.elector.is_leader()
    daemon.job_reconcile()  # returns without a pass
    daemon.job_leader()
    assert daemon.elector.term == 1
    assert len(wakes) == 2


def test_a_standby_is_not_woken(database: dbmod.Database, monkeypatch: pytest.MonkeyPatch) -> None:
    with database.session() as session:
        soon = utcnow() + timedelta(seconds=60)
        session.add(
            LeaderElection(
                instance="default",
                holder="alive",
                term=1,
                acquired_at=utcnow(),
                renewed_at=utcnow(),
                expires_at=soon,
            )
        )
    daemon = _daemon(database, lease=1.0)
    wakes = _counting_wakes(daemon, monkeypatch)
    daemon.job_leader()
    daemon.job_leader()
    assert not daemon.elector.is_leader()
    assert wakes == []


@pytest.mark.parametrize("woken", [False, True])
def test_a_wake_during_a_failed_pass_is_not_lost(database: dbmod.Database, woken: bool) -> None:
    """A wake that arrives while a pass runs is left to that job (it runs one more pass); when the
    pass fails instead (its leadership lapsed mid-way), the job schedules a pass within
    WAKE_AGAIN_SECONDS (not at once: a run due while the job still runs would be skipped by the
    scheduler and moved to the interval). A failed pass that nothing woke waits as before."""
    daemon, reconcile = _leading_with_no_pass_due(database)
    passes: list[int] = []

    def failing_pass() -> None:
        passes.append(1)
        if woken:
            daemon.wake_reconcile()  # e.g. the leader job, leading again after a lapse
        raise NotLeaderError("leadership of instance default moved on; write refused")

    daemon.reconciler.run_pass = failing_pass  # type: ignore[method-assign,assignment]
    with pytest.raises(NotLeaderError):
        daemon.job_reconcile()
    assert len(passes) == 1
    assert (reconcile.next_run_time <= utcnow() + timedelta(seconds=WAKE_AGAIN_SECONDS)) is woken


class _WakeOnClear(threading.Event):
    """A ``_reconciling`` flag whose first clear() is preceded by a wake from another thread: the
    wake arrives after the job's last look at ``_wake`` and while the job still counts as running."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__()
        self.daemon, self.woken = daemon, False

    def clear(self) -> None:
        if not self.woken:
            self.woken = True
            waker = threading.Thread(target=self.daemon.wake_reconcile)
            waker.start()
            waker.join()
        super().clear()


def test_a_wake_just_before_the_job_ends_is_not_lost(database: dbmod.Database) -> None:
    """The waker sees the job running and leaves the pass to it; the job has already decided it is
    done. The job looks at ``_wake`` once more after it stops counting as running."""
    daemon, reconcile = _leading_with_no_pass_due(database)
    flag = _WakeOnClear(daemon)
    daemon._reconciling = flag
    passes: list[int] = []
    real_pass = daemon.reconciler.run_pass  # an empty fleet: nothing to do, nothing to follow up

    def quiet_pass() -> Any:
        passes.append(1)
        return real_pass()

    daemon.reconciler.run_pass = quiet_pass  # type: ignore[method-assign,assignment]
    daemon.job_reconcile()
    assert flag.woken and len(passes) == 1
    assert reconcile.next_run_time <= utcnow() + timedelta(seconds=WAKE_AGAIN_SECONDS)
