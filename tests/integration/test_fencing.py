"""A deposed leader never acts on Daytona (issue 17): two daemons on PostgreSQL, the leader is
SIGSTOPped while a planned delete waits out a 429 pause, the other takes over, the operator sets the
lease back to running and it is Ready; when the first resumes, its delete is fenced, not sent."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from controller import db as dbmod
from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.test_daemon import apply, daemon_env, ours, phases, query, wait_for
from tests.support.daemon import DaemonProcess
from tests.support.emulator import EmulatorProcess

PAUSE = 20  # Retry-After of the injected 429: how long the leader's next calls wait


def is_leader(d: DaemonProcess) -> bool:
    return "leasectl_leader 1.0" in d.http("/metrics")[1]


def test_deposed_leader_does_not_delete_the_new_leaders_sandbox(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    url = create_pg_database("leasectl_fence")
    daemons: list[DaemonProcess] = []
    stopped: DaemonProcess | None = None
    try:
        database = dbmod.connect(url)
        dbmod.upgrade(database)
        database.dispose()
        apply(url, tmp_path, "leases:\n  - name: victim\n  - name: trigger\n")
        env = daemon_env(emulator, url)
        a = DaemonProcess(tmp_path / "a.log", env).start()
        b = DaemonProcess(tmp_path / "b.log", env).start()
        daemons += [a, b]
        wait_for(lambda: phases(url) == {"victim": "Ready", "trigger": "Ready"} or None, what="convergence")
        leader = wait_for(lambda: next((d for d in (a, b) if is_leader(d)), None), what="a leader")
        standby = b if leader is a else a
        victim = {s.id for s in ours(emulator) if s.labels["leasectl-lease"] == "victim"}
        assert len(victim) == 1

        # 1. The leader's next stop answers 429 with a long Retry-After: every further call of its
        #    applier waits. Then the victim is set absent: its delete is planned and waits too.
        emulator.set_faults(fail_rate={"stop": {"429": 1.0}}, retry_after=PAUSE)
        query(url, "UPDATE leases SET desired_state = 'stopped' WHERE name = 'trigger'")
        wait_for(
            lambda: query(
                url, "SELECT 1 FROM events WHERE lease_name = 'trigger' AND outcome = 'rate_limited'"
            ),
            timeout=10,
            what="the 429",
        )
        emulator.reset_faults()
        query(url, "UPDATE leases SET desired_state = 'absent' WHERE name = 'victim'")
        time.sleep(2.5)  # a pass or two: the delete is planned and waiting for the pause to end

        # 2. The leader freezes; the operator changes their mind; the standby takes over.
        assert leader.process is not None
        os.killpg(leader.process.pid, signal.SIGSTOP)
        stopped = leader
        query(url, "UPDATE leases SET desired_state = 'running' WHERE name = 'victim'")
        wait_for(lambda: is_leader(standby), timeout=15, what="takeover")
        time.sleep(3)  # a few passes of the new leader
        assert phases(url)["victim"] == "Ready"

        # 3. The old leader resumes; its pause ends; its delete must not be sent.
        os.killpg(leader.process.pid, signal.SIGCONT)
        stopped = None

        def victims() -> set[str]:
            return {s.id for s in ours(emulator) if s.labels["leasectl-lease"] == "victim"}

        wait_for(
            lambda: "provider call not sent" in leader.log() or victims() != victim,
            timeout=PAUSE + 15,
            what="the old leader's delete, fenced or sent",
        )
        time.sleep(2)
        assert victims() == victim, "the deposed leader deleted the new leader's sandbox"
        assert "delete not sent" in leader.log()
        assert phases(url)["victim"] == "Ready"
        deletes = query(
            url, "SELECT controller_id FROM events WHERE lease_name = 'victim' AND action = 'delete'"
        )
        assert deletes == []
        assert is_leader(standby) and not is_leader(leader)
        assert "Traceback" not in leader.log() and "Traceback" not in standby.log()
    finally:
        if stopped is not None and stopped.process is not None:
            os.killpg(stopped.process.pid, signal.SIGCONT)
        for d in daemons:
            d.kill()
        drop_pg_database(url)
