"""Policy with the daemon running (`leasectl run` against the local Daytona API, issue 16): a quota
blocks the third lease and lets it go when the first stops, the disk guard archives the oldest
stopped sandbox, usage records what was observed; a schedule flips a lease at its minute."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from controller import db as dbmod
from controller.cli import app
from tests.integration.test_daemon import apply, daemon_env, phases, query, wait_for
from tests.support.daemon import DaemonProcess
from tests.support.emulator import EmulatorProcess

FLEET = """\
leases:
  - {name: a1, labels: {team: a}}
  - {name: a2, labels: {team: a}}
  - {name: a3, labels: {team: a}}
quotas:
  - {label: team, sandboxes: 2}
"""


def status(url: str, name: str) -> tuple[str, str, str]:
    (row,) = query(url, "SELECT phase, observed_state, message FROM lease_overview WHERE name = :n", n=name)
    return row.phase, row.observed_state, row.message or ""


def running_seconds(url: str, name: str) -> float:
    """How long the open usage segment of lease ``name`` has been seen ``started``."""
    from controller.overview import parse_timestamp

    sql = "SELECT started_at, ended_at FROM usage WHERE lease_name = :n AND state = 'started'"
    rows = query(url, sql, n=name)
    return sum((parse_timestamp(r.ended_at) - parse_timestamp(r.started_at)).total_seconds() for r in rows)


def test_quota_disk_guard_and_usage_with_the_daemon(
    emulator: EmulatorProcess, database_url: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    apply(database_url, tmp_path, FLEET)
    env = {
        **daemon_env(emulator, database_url),
        "LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS": "0.5",
        "LEASECTL_POLICY__DISK_GUARD_GIB": "3",  # one stopped sandbox of the local API (3 GiB) fits
    }
    d = DaemonProcess(tmp_path / "daemon.log", env).start()
    daemons.append(d)

    # The quota: two run, the third (last in the documented order: created together, then by name) waits.
    wait_for(
        lambda: phases(database_url) == {"a1": "Ready", "a2": "Ready", "a3": "Blocked"} or None, what="quota"
    )
    assert "quota team=* (team=a) sandboxes: 2/2 in use, this lease needs 1" in status(database_url, "a3")[2]
    # The report rounds to 0.0001 h (0.36 s) and the fleet converges within a second: let a1 and a2
    # be seen running for a while, or what follows may stop a1 after a few milliseconds.
    wait_for(lambda: running_seconds(database_url, "a1") >= 1.0 or None, timeout=30, what="a1 running 1 s")
    # ...and goes once the first is stopped.
    query(database_url, "UPDATE leases SET desired_state = 'stopped' WHERE name = 'a1'")
    wait_for(lambda: phases(database_url)["a3"] == "Ready", timeout=30, what="a3 released by the quota")
    assert phases(database_url)["a1"] == "Stopped"
    assert status(database_url, "a1")[1] == "stopped"  # 3 GiB stopped: under the cap, left alone

    # The disk guard: a second stopped sandbox puts 6 GiB over the 3 GiB cap; the older one (a1) goes.
    query(database_url, "UPDATE leases SET desired_state = 'stopped' WHERE name = 'a2'")
    wait_for(lambda: status(database_url, "a1")[1] == "archived" or None, timeout=30, what="a1 archived")
    wait_for(lambda: status(database_url, "a2")[:2] == ("Stopped", "stopped") or None, timeout=30, what="a2")
    (event,) = query(
        database_url,
        "SELECT message FROM events WHERE action = 'archive' AND outcome = 'ok' AND lease_name = 'a1'",
    )
    assert event.message.startswith("disk guard: stopped sandboxes hold 6 GiB, over the cap of 3 GiB")
    assert not query(database_url, "SELECT id FROM events WHERE action = 'archive' AND lease_name <> 'a1'")
    assert d.terminate(timeout=20) == 0

    # Usage: a1's segments follow what was observed, and the report adds up.
    states = [
        r.state for r in query(database_url, "SELECT state FROM usage WHERE lease_name = 'a1' ORDER BY id")
    ]
    assert states[0] in ("creating", "started") and states[-1] == "archived"
    assert "stopped" in states and states.index("stopped") > states.index("started")
    result = CliRunner().invoke(app, ["--database-url", database_url, "usage", "-o", "json"])
    assert result.exit_code == 0, result.stderr
    lines = {d["group"]: d for d in json.loads(result.stdout)["lines"]}
    assert set(lines) == {"a1", "a2", "a3", "TOTAL"}
    assert all(lines[n]["sandbox_hours"] > 0 for n in ("a1", "a2", "a3"))
    total = sum(lines[n]["sandbox_hours"] for n in ("a1", "a2", "a3"))
    assert abs(lines["TOTAL"]["sandbox_hours"] - total) < 1e-3


def test_a_schedule_flips_a_lease_at_its_minute_without_waiting_for_the_interval(
    emulator: EmulatorProcess, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """The interval is 300 s: the lease starts at the minute its entry fires because the daemon
    passes at the schedule's next change (SQLite; waking is the same code on either backend)."""
    url = f"sqlite:///{tmp_path / 'sched.db'}"
    database = dbmod.connect(url)
    dbmod.upgrade(database)
    database.dispose()
    now = datetime.now(UTC)
    if now.second > 45:  # leave the daemon time for its first pass before the entry fires
        time.sleep(61 - now.second)
        now = datetime.now(UTC)
    flip = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
    apply(
        url,
        tmp_path,
        "leases:\n  - name: office\n    state: stopped\n    schedule:\n      timezone: UTC\n      entries:\n"
        '        - {cron: "* * * * *", state: stopped}\n'
        f'        - {{cron: "{flip.minute} {flip.hour} * * *", state: running}}\n',
    )
    env = {**daemon_env(emulator, url), "LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS": "300"}
    d = DaemonProcess(tmp_path / "daemon.log", env).start()
    daemons.append(d)
    wait_for(lambda: d.http("/readyz")[0] == 200, what="daemon ready")
    # /readyz is 200 before the first pass while the replica is not the leader yet (no pass owed):
    # wait for the first pass's status instead of reading it once (it read Pending under load).
    wait_for(lambda: phases(url).get("office") == "Stopped", timeout=30, what="office Stopped (first pass)")
    assert datetime.now(UTC) < flip, "the first pass came after the flip; the test proves nothing"
    # The next pass comes at the flip (not after the 300 s interval): it creates the sandbox.
    # Waits for the create's event, not a phase: the create attempt is recorded before the call.
    created_sql = "SELECT at FROM events WHERE lease_name = 'office' AND action = 'create' AND outcome = 'ok'"
    wait_for(lambda: len(query(url, created_sql)) == 1, timeout=75, what="office created by its schedule")
    (created,) = query(url, created_sql)
    at = created.at if isinstance(created.at, datetime) else datetime.fromisoformat(str(created.at))
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
    assert flip <= at < flip + timedelta(seconds=10)
