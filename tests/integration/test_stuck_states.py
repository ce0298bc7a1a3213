"""A sandbox Daytona keeps in a transitional state: the lease says for how long, on both backends.

``lease_status.observed_since`` is when the recorded sandbox entered its observed state (migration
0012); past ``controller.stuck_after_seconds`` the lease's message calls it stuck (and the gauge
``leasectl_leases_stuck`` counts it), the controller still waits (Daytona refuses other changes
while one is pending), and the record moves on with the state once the sandbox gets out of it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from controller import db as dbmod
from controller.config import load_settings
from controller.metrics import Metrics
from controller.providers.memory import MemoryProvider
from controller.reconciler import build_reconciler
from models import Lease, LeaseStatus

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def status(db: dbmod.Database) -> LeaseStatus:
    with db.session() as session:
        row = session.get(LeaseStatus, "web")
        assert row is not None
        return row


def test_a_sandbox_stuck_starting_is_reported_and_the_record_follows_its_state(db: dbmod.Database) -> None:
    settings = load_settings(None, {"controller": {"instance": "fleet", "stuck_after_seconds": 600}})
    with db.engine.begin() as conn:
        conn.execute(sa.insert(Lease).values(name="web", desired_state="running", env={}, labels={}))
    provider = MemoryProvider()
    now = [T0]
    metrics = Metrics()
    reconciler = build_reconciler(db, provider, settings, metrics=metrics)
    reconciler.clock = lambda: now[0]
    try:
        reconciler.run_pass()  # creates the sandbox: started, Ready
        ready = status(db)
        assert (ready.phase, ready.observed_state, ready.observed_since) == ("Ready", "started", T0)
        sandbox_id = ready.sandbox_id
        assert sandbox_id is not None

        now[0] = T0 + timedelta(minutes=1)
        provider.set_state(sandbox_id, "stopped")  # stopped behind our back: the pass starts it
        provider.stick_next("start", "starting")
        reconciler.run_pass()
        now[0] = T0 + timedelta(minutes=2)
        reconciler.run_pass()  # sees it starting, since this pass
        starting = status(db)
        assert (starting.observed_state, starting.observed_since) == ("starting", T0 + timedelta(minutes=2))
        assert starting.message is not None and "is stuck" not in starting.message
        assert metrics.value("leasectl_leases_stuck") == 0

        now[0] = T0 + timedelta(minutes=14)  # 12 minutes in the state: more than 600 s
        result = reconciler.run_pass()
        stuck = status(db)
        assert not result.plan.actions  # still waiting: nothing else is allowed while it starts
        assert metrics.value("leasectl_leases_stuck") == 1
        assert stuck.phase == "Provisioning" and stuck.observed_since == T0 + timedelta(minutes=2)
        assert stuck.message is not None
        assert "is stuck: starting for 12 min (more than controller.stuck_after_seconds, 600 s)" in (
            stuck.message
        )
        with db.engine.connect() as conn:  # what an operator asks with SQL
            stuck_since = conn.scalar(
                sa.select(LeaseStatus.lease_name).where(
                    LeaseStatus.observed_state == "starting",
                    LeaseStatus.observed_since < T0 + timedelta(minutes=14) - timedelta(seconds=600),
                )
            )
        assert stuck_since == "web"

        provider.release(sandbox_id)
        now[0] = T0 + timedelta(minutes=15)
        reconciler.run_pass()
        after = status(db)
        assert (after.phase, after.observed_state) == ("Ready", "started")
        assert after.observed_since == T0 + timedelta(minutes=15)
        assert after.message is not None and "is stuck" not in after.message
        assert metrics.value("leasectl_leases_stuck") == 0
    finally:
        reconciler.applier.shutdown(timeout=5)
