"""Warm pools with the daemon running (`leasectl run` as a subprocess): a cold `claim --wait` on an
empty pool, refill after claims, SQL edits woken at once on SQLite, and pool metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller import exitcodes
from controller.cli import app
from tests.integration.test_daemon import daemon_env, phases, query, wait_for
from tests.support.daemon import DaemonProcess
from tests.support.emulator import EmulatorProcess

SLOW_INTERVAL = {"LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS": "3600"}


def cli(url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["--database-url", url, *args])
    return result.exit_code, result.stdout, result.stderr


def apply_pool(url: str, tmp_path: Path, **pool: Any) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text(json.dumps({"pools": [{"name": "agents", **pool}]}))
    code, out, err = cli(url, "apply", "-f", str(path))
    assert code == 0, out + err


def pool_state(url: str) -> dict[str, Any]:
    code, out, err = cli(url, "pools", "-o", "json")
    assert code == 0, err
    found: dict[str, Any] = json.loads(out)[0]
    return found


def started(emulator: EmulatorProcess, url: str, tmp_path: Path, env: dict[str, str]) -> DaemonProcess:
    d = DaemonProcess(tmp_path / "daemon.log", {**daemon_env(emulator, url), **env}).start()
    # The first pass has run (the leader is elected and has reconciled once).
    wait_for(lambda: d.http("/readyz")[0] == 200, what="daemon ready")
    return d


def test_claim_wait_on_an_empty_pool_while_the_daemon_runs(
    emulator: EmulatorProcess,
    database_url: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """min_ready 0: nothing is warm; `claim --wait` reserves a member, the daemon wakes on it (not
    after the 3600 s interval) and creates it; the claim returns it cold, within the wait and far
    within the interval: the create realizes the workspace and its status is written at once."""
    monkeypatch.setenv("DAYTONA_API_URL", emulator.api_url)  # for `exec` in this process
    monkeypatch.setenv("DAYTONA_API_KEY", emulator.api_key)
    apply_pool(database_url, tmp_path, min_ready=0, max_size=2)
    daemons.append(started(emulator, database_url, tmp_path, SLOW_INTERVAL))
    code, _, err = cli(database_url, "claim", "agents")
    assert code == exitcodes.NO_MEMBER_READY, err
    t0 = time.monotonic()
    code, out, err = cli(database_url, "claim", "agents", "--wait", "60", "--owner", "cold-1", "-o", "json")
    assert code == 0, err + daemons[0].log()
    assert time.monotonic() - t0 < 60
    got = json.loads(out)
    assert got["kind"] == "cold" and got["owner"] == "cold-1" and got["sandbox_id"]
    assert phases(database_url)[got["lease"]] == "Ready"
    code, out, err = cli(database_url, "exec", got["lease"], "--", "echo", "warm enough")
    assert code == 0 and out.strip() == "warm enough", err
    code, _, err = cli(database_url, "release", got["lease"])
    assert code == 0, err
    wait_for(
        lambda: pool_state(database_url)["members"] == 0 or None, timeout=60, what="released member gone"
    )


def test_refill_after_claims_with_the_daemon(
    emulator: EmulatorProcess, database_url: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    apply_pool(database_url, tmp_path, min_ready=3, max_size=6, claim_ttl="1h")
    d = started(emulator, database_url, tmp_path, SLOW_INTERVAL)
    daemons.append(d)
    wait_for(lambda: pool_state(database_url)["ready"] == 3 or None, timeout=60, what="pool filled")
    held = []
    for i in range(3):
        code, out, err = cli(database_url, "claim", "agents", "--owner", f"job-{i}", "-o", "json")
        assert code == 0, err
        held.append(json.loads(out)["lease"])
    assert len(set(held)) == 3
    # The claims wake the daemon (interval 3600 s), which refills to min_ready within max_size.
    state = wait_for(
        lambda: (s := pool_state(database_url))["ready"] == 3 and s["claimed"] == 3 and s,
        timeout=60,
        what="refill",
    )
    assert state["members"] == 6
    # The gauge is what the last pass's pool step saw: a pass that planned the refill (and a headroom)
    # from two claims can fill the pool before the next pass sees the third.
    wait_for(
        lambda: 'leasectl_pool_members{pool="agents",state="claimed"} 3.0' in d.http("/metrics")[1] or None,
        timeout=30,
        what="claimed gauge",
    )
    # max_size reached: a further claim takes a warm one, and the pool cannot refill past 6.
    code, out, err = cli(database_url, "claim", "agents", "-o", "json")
    assert code == 0, err
    time.sleep(2)
    assert pool_state(database_url)["members"] == 6


def _sql_wakeup(database_url: str, statement: str, lease: str, predicate: Callable[[str], bool]) -> None:
    query(database_url, statement)
    wait_for(
        lambda: predicate(phases(database_url).get(lease, "")) or None,
        timeout=30,
        what=f"{lease} acted on after a SQL edit (interval is 3600 s)",
    )


def test_sql_edits_wake_the_daemon_on_sqlite(
    emulator: EmulatorProcess, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """With a 3600 s interval, only the change watcher and the daemon's follow-up passes can explain
    these: an inserted row reaches Ready (create + workspace in one action), a stop reaches Stopped
    (the pass after the stop records it) and a start reaches Ready again. The figure itself (well under
    a second) is measured by bench/pools.py, not asserted here."""
    from controller import db as dbmod

    url = f"sqlite:///{tmp_path / 'wake.db'}"
    database = dbmod.connect(url)
    dbmod.upgrade(database)
    database.dispose()
    daemons.append(started(emulator, url, tmp_path, SLOW_INTERVAL))
    _sql_wakeup(url, "INSERT INTO leases (name) VALUES ('by-sql')", "by-sql", lambda p: p == "Ready")
    _sql_wakeup(
        url,
        "UPDATE leases SET desired_state = 'stopped' WHERE name = 'by-sql'",
        "by-sql",
        lambda p: p == "Stopped",
    )
    _sql_wakeup(
        url,
        "UPDATE leases SET desired_state = 'running' WHERE name = 'by-sql'",
        "by-sql",
        lambda p: p == "Ready",
    )


def test_a_daemon_killed_during_refills_never_exceeds_max_size(
    emulator: EmulatorProcess, database_url: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """SIGKILL the daemon again and again while it fills a pool (creates take 0.3 s at the server):
    members and sandboxes never exceed max_size, and the pool converges afterwards."""
    from daytona import ListSandboxesQuery

    emulator.set_faults(latency={"create": 0.3})
    apply_pool(database_url, tmp_path, min_ready=5, max_size=5)
    env = {**daemon_env(emulator, database_url), "LEASECTL_CONTROLLER__LEADER_LEASE_SECONDS": "1"}

    def sandboxes() -> int:
        listed = emulator.client().list(
            ListSandboxesQuery(labels={"leasectl-instance": "default"}, limit=200)
        )
        return sum(1 for sb in listed if sb.state != "destroyed")

    for round_ in range(4):
        d = DaemonProcess(tmp_path / f"daemon-{round_}.log", env).start()
        daemons.append(d)
        time.sleep(0.4 + 0.2 * round_)
        d.kill()
        assert pool_state(database_url)["members"] <= 5
        assert sandboxes() <= 5
    d = DaemonProcess(tmp_path / "daemon-last.log", env).start()
    daemons.append(d)
    state = wait_for(
        lambda: (s := pool_state(database_url))["ready"] == 5 and s, timeout=60, what="pool full"
    )
    assert state["members"] == 5
    wait_for(lambda: sandboxes() == 5 or None, timeout=30, what="5 sandboxes")


def test_a_reservation_of_a_claimer_that_died_expires(database_url: str) -> None:
    """A cold claimer killed while waiting leaves a reserved member; it expires and is retired."""
    from datetime import timedelta

    from controller import db as dbmod
    from controller.claims import RESERVATION_GRACE_SECONDS, _reserve
    from controller.leases import apply_specs
    from controller.pool_sync import sync_pools
    from controller.specs import PoolSpec
    from models import utcnow

    database = dbmod.connect(database_url)
    try:
        apply_specs(database, [], pools=[PoolSpec(name="agents", min_ready=0, max_size=2)])
        name = _reserve(database, "agents", "dead-claimer", 5.0, utcnow)
        assert name is not None
        assert sync_pools(database, now=utcnow(), create_budget=5, controller_id="t").retired == []
        later = utcnow() + timedelta(seconds=5 + RESERVATION_GRACE_SECONDS + 1)
        assert sync_pools(database, now=later, create_budget=5, controller_id="t").retired == [name]
        events = query(database_url, "SELECT action FROM events WHERE lease_name = :n", n=name)
        assert [e.action for e in events] == ["claim", "expire"]
    finally:
        database.dispose()
