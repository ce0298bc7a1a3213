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

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller import db as dbmod
from controller.config import load_settings
from controller.daemon import Daemon
from controller.leader import LeaderElector
from controller.providers.memory import MemoryProvider
from models import utcnow


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


def _interval(daemon: Daemon, job_id: str) -> float:
    job = daemon.scheduler.get_job(job_id)
    assert job is not None
    return float(job.trigger.interval_length)


@pytest.mark.parametrize("lease", [0.3, 1.0, 1.2, 3.0, 15.0])
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
