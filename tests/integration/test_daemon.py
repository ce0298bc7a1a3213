"""`leasectl run` as a subprocess against the local Daytona API: convergence, SQL edits, the
execution queue, health and metrics, SIGTERM, two replicas on PostgreSQL, and outages."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from daytona import ListSandboxesQuery
from typer.testing import CliRunner

from controller import db as dbmod
from controller.cli import app
from tests.conftest import PG_ADMIN_URL, create_pg_database, drop_pg_database
from tests.support.daemon import DaemonProcess, TcpProxy
from tests.support.emulator import EmulatorProcess

LEASES = """\
leases:
  - name: alpha
  - name: beta
  - name: gamma
    state: stopped
"""


def wait_for(predicate: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


def query(url: str, statement: str, **params: Any) -> list[Any]:
    database = dbmod.connect(url)
    try:
        with database.engine.begin() as conn:
            result = conn.execute(sa.text(statement), params)
            return list(result) if result.returns_rows else []
    finally:
        database.dispose()


def phases(url: str) -> dict[str, str]:
    return {r.name: r.phase for r in query(url, "SELECT name, phase FROM lease_overview")}


def apply(url: str, tmp_path: Path, text: str = LEASES) -> None:
    path = tmp_path / "leases.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["--database-url", url, "apply", "-f", str(path)])
    assert result.exit_code == 0, result.stdout + result.stderr


def daemon_env(emulator: EmulatorProcess, url: str) -> dict[str, str]:
    return {
        "DAYTONA_API_URL": emulator.api_url,
        "DAYTONA_API_KEY": emulator.api_key,
        "LEASECTL_DATABASE_URL": url,
    }


def ours(emulator: EmulatorProcess) -> list[Any]:
    return list(
        emulator.client().list(ListSandboxesQuery(labels={"leasectl-instance": "default"}, limit=200))
    )


def test_daemon_end_to_end(
    emulator: EmulatorProcess, database_url: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    apply(database_url, tmp_path)
    d = DaemonProcess(tmp_path / "daemon.log", daemon_env(emulator, database_url)).start()
    daemons.append(d)

    wait_for(
        lambda: phases(database_url) == {"alpha": "Ready", "beta": "Ready", "gamma": "Stopped"} or None,
        what="convergence",
    )
    assert d.http("/healthz")[0] == 200
    _, body = wait_for(lambda: (r := d.http("/readyz"))[0] == 200 and r, what="/readyz 200")
    assert json.loads(body)["leader"] is True
    metrics = d.http("/metrics")[1]
    for name in (
        "leasectl_passes_total",
        "leasectl_pass_duration_seconds_bucket",
        "leasectl_actions_total",
        'leasectl_leases{phase="Ready"} 2.0',
        "leasectl_api_requests_total",
        "leasectl_leader 1.0",
        "leasectl_executions",
        "leasectl_orphans_collected_total",
    ):
        assert name in metrics, name

    # An UPDATE in SQL is acted on within an interval or two.
    query(database_url, "UPDATE leases SET desired_state = 'stopped' WHERE name = 'beta'")
    wait_for(lambda: phases(database_url)["beta"] == "Stopped", timeout=15, what="beta stopped")

    # A queued execution is run once and its output is readable with SQL.
    query(database_url, "INSERT INTO executions (lease_name, command) VALUES ('alpha', 'echo hi from $HOME')")
    row = wait_for(
        lambda: next(
            iter(
                query(
                    database_url,
                    "SELECT state, exit_code, output FROM executions "
                    "WHERE state NOT IN ('queued', 'running')",
                )
            ),
            None,
        ),
        timeout=30,
        what="execution finished",
    )
    assert row.state == "succeeded" and row.exit_code == 0 and row.output.startswith("hi from /")

    # SIGUSR1: every thread's stack in the log, and the daemon goes on.
    assert d.dump_stacks()
    assert "(most recent call first)" in d.log()
    assert d.http("/healthz")[0] == 200

    assert d.terminate(timeout=20) == 0
    assert "leasectl daemon stopped" in d.log()
    holder = query(database_url, "SELECT holder FROM leader_election")
    assert holder and holder[0].holder is None  # leadership released


def test_two_replicas_on_postgres_fail_over_without_duplicates(
    emulator: EmulatorProcess, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    url = create_pg_database("leasectl_ha")
    try:
        database = dbmod.connect(url)
        dbmod.upgrade(database)
        database.dispose()
        apply(url, tmp_path, "leases:\n" + "".join(f"  - name: box-{i}\n" for i in range(6)))
        env = daemon_env(emulator, url)
        a = DaemonProcess(tmp_path / "a.log", env).start()
        b = DaemonProcess(tmp_path / "b.log", env).start()
        daemons += [a, b]

        wait_for(lambda: set(phases(url).values()) == {"Ready"}, what="convergence")
        leaders = [d for d in (a, b) if "leasectl_leader 1.0" in d.http("/metrics")[1]]
        assert len(leaders) == 1
        leader = leaders[0]
        standby = b if leader is a else a
        term = query(url, "SELECT term FROM leader_election")[0].term

        leader.kill()
        wait_for(lambda: "leasectl_leader 1.0" in standby.http("/metrics")[1], timeout=10, what="failover")
        assert query(url, "SELECT term FROM leader_election")[0].term == term + 1

        query(url, "INSERT INTO leases (name) VALUES ('after-failover')")
        wait_for(lambda: phases(url).get("after-failover") == "Ready", timeout=30, what="new lease Ready")
        counts: dict[str, int] = {}
        for sandbox in ours(emulator):
            counts[sandbox.labels["leasectl-lease"]] = counts.get(sandbox.labels["leasectl-lease"], 0) + 1
        assert counts == {**{f"box-{i}": 1 for i in range(6)}, "after-failover": 1}
        creates = query(url, "SELECT count(*) AS n FROM events WHERE action = 'create' AND outcome = 'ok'")
        assert creates[0].n == 7
    finally:
        for d in daemons:
            d.kill()
        drop_pg_database(url)


def test_survives_api_and_postgres_outages(
    emulator: EmulatorProcess, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    url = create_pg_database("leasectl_outage")
    target = sa.make_url(PG_ADMIN_URL)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432).start()
    proxied = sa.make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        database = dbmod.connect(url)
        dbmod.upgrade(database)
        database.dispose()
        apply(url, tmp_path, "leases:\n  - name: one\n  - name: two\n")
        d = DaemonProcess(tmp_path / "d.log", daemon_env(emulator, proxied)).start()
        daemons.append(d)
        wait_for(lambda: set(phases(url).values()) == {"Ready"}, what="convergence")

        # The Daytona API goes away: passes fail, /readyz says so, and it resumes by itself.
        emulator.stop()
        wait_for(lambda: d.http("/readyz")[0] == 503 or None, timeout=30, what="/readyz 503 (API down)")
        query(url, "INSERT INTO leases (name) VALUES ('three')")
        time.sleep(2)
        emulator.start()
        wait_for(lambda: phases(url).get("three") == "Ready", timeout=40, what="resume after API outage")

        # PostgreSQL becomes unreachable for 30 s (every connection cut, new ones refused).
        proxy.cut()
        cut_at = time.monotonic()
        wait_for(lambda: d.http("/readyz")[0] == 503 or None, timeout=30, what="/readyz 503 (DB down)")
        time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
        assert d.process is not None and d.process.poll() is None  # still running
        proxy.restore()
        query(url, "INSERT INTO leases (name) VALUES ('four')")
        wait_for(lambda: phases(url).get("four") == "Ready", timeout=60, what="resume after DB outage")
        wait_for(lambda: d.http("/readyz")[0] == 200 or None, timeout=40, what="/readyz 200 again")
        counts: dict[str, int] = {}
        for sandbox in ours(emulator):
            counts[sandbox.labels["leasectl-lease"]] = counts.get(sandbox.labels["leasectl-lease"], 0) + 1
        assert counts == {"one": 1, "two": 1, "three": 1, "four": 1}
        assert d.terminate() == 0
    finally:
        for d in daemons:
            d.kill()
        proxy.stop()
        drop_pg_database(url)


def test_postgres_notify_wakes_the_daemon_before_its_interval(
    emulator: EmulatorProcess, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    url = create_pg_database("leasectl_notify")
    try:
        database = dbmod.connect(url)
        dbmod.upgrade(database)
        database.dispose()
        apply(url, tmp_path, "leases:\n  - name: quick\n")
        env = {**daemon_env(emulator, url), "LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS": "120"}
        d = DaemonProcess(tmp_path / "n.log", env).start()
        daemons.append(d)
        # The first pass runs right after start; after that only a NOTIFY can wake it early.
        wait_for(lambda: phases(url).get("quick") in ("Provisioning", "Ready"), timeout=15, what="first pass")
        started = time.monotonic()
        query(url, "UPDATE leases SET desired_state = 'absent' WHERE name = 'quick'")
        wait_for(
            lambda: phases(url).get("quick") in ("Deleting", "Deleted"), timeout=20, what="woken by NOTIFY"
        )
        assert time.monotonic() - started < 20  # far below the 120 s interval
    finally:
        for d in daemons:
            d.kill()
        drop_pg_database(url)
