"""The controller against the local Daytona API behaving as the real server does (issue 11): quota
400s that come and go, creates that fail late, refused repeats seen through a lagging list, auto-stop
and Idle leases, ephemeral rows, named throttlers, and a list walked in creation order. The real
SDK over HTTP; SQLite and PostgreSQL where the database matters."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from daytona import ListSandboxesQuery

from controller.errors import RateLimitedError
from controller.providers import daytona as daytona_provider
from controller.providers.base import CreateRequest
from controller.providers.daytona import DaytonaProvider
from tests.integration.test_reconcile_emulator import INSTANCE, cli, get, ours, reconcile, sql, write_leases
from tests.support.emulator import EmulatorProcess, point_leasectl_at


@pytest.fixture
def env(emulator: EmulatorProcess, monkeypatch: pytest.MonkeyPatch) -> EmulatorProcess:
    return point_leasectl_at(
        emulator,
        monkeypatch,
        INSTANCE,
        backoff_base_seconds="0.01",
        backoff_max_seconds="0.05",
        blocked_backoff_max_seconds="0.05",
    )


def upgraded(database_url: str) -> str:
    code, out, err = cli(database_url, "db", "upgrade")
    assert code == 0, out + err
    return database_url


def apply(database_url: str, path: Path) -> None:
    code, out, err = cli(database_url, "apply", "-f", str(path))
    assert code == 0, out + err


def passes(database_url: str, n: int, pause: float = 0.06) -> dict[str, dict[str, Any]]:
    for _ in range(n):
        reconcile(database_url)
        time.sleep(pause)
    return get(database_url)


def live_by_lease(emu: EmulatorProcess) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for sb in ours(emu):
        if sb.state not in ("destroying", "destroyed"):
            found.setdefault(sb.labels["leasectl-lease"], []).append(sb.id)
    return found


def test_quota_exhaustion_blocks_then_converges_untouched_when_released(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    url = upgraded(database_url)
    env.set_faults(quota=2)
    apply(url, write_leases(tmp_path / "l.yaml", 3))
    rows = passes(url, 4)
    phases = sorted(r["phase"] for r in rows.values())
    assert phases == ["Blocked", "Ready", "Ready"], {n: (r["phase"], r["message"]) for n, r in rows.items()}
    [blocked] = [r for r in rows.values() if r["phase"] == "Blocked"]
    assert blocked["message"].startswith("Blocked: ") and "limit exceeded" in blocked["message"]
    assert "Failed" not in phases and len(ours(env)) == 2

    env.set_faults(quota=None)  # capacity returns: nobody touches the leases
    rows = passes(url, 4)
    assert {r["phase"] for r in rows.values()} == {"Ready"}, {n: r["message"] for n, r in rows.items()}
    assert all(len(ids) == 1 for ids in live_by_lease(env).values()) and len(live_by_lease(env)) == 3


def test_a_create_that_fails_late_leaves_exactly_one_sandbox_per_lease(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    url = upgraded(database_url)
    env.set_faults(sandbox_error={"create": 1.0}, error_recoverable=False)
    apply(url, write_leases(tmp_path / "l.yaml", 3))
    for _ in range(6):
        reconcile(url)
        assert all(len(ids) == 1 for ids in live_by_lease(env).values()), live_by_lease(env)
        time.sleep(0.06)
    rows = get(url)
    assert {r["phase"] for r in rows.values()} <= {"Error", "Provisioning"}, rows
    _, out, _ = cli(url, "events", "-o", "json")
    assert "failed to start" in out and "found sandbox" in out
    env.set_faults(sandbox_error={})
    for _ in range(12):
        reconcile(url)
        assert all(len(ids) == 1 for ids in live_by_lease(env).values()), live_by_lease(env)
        rows = get(url)
        if {r["phase"] for r in rows.values()} == {"Ready"}:
            break
        time.sleep(0.06)
    assert {r["phase"] for r in rows.values()} == {"Ready"}, {n: r["message"] for n, r in rows.items()}
    every = [sb for sb in ours(env) if sb.state not in ("destroying", "destroyed")]
    assert len(every) == 3 and all(sb.state == "started" for sb in every)


def test_a_refused_repeat_from_a_lagging_list_is_not_a_failure(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    url = upgraded(database_url)
    apply(url, write_leases(tmp_path / "l.yaml", 1))
    rows = passes(url, 3)
    assert rows["box-00"]["phase"] == "Ready"
    time.sleep(3.0)
    env.set_faults(list_lag=2.5)  # the list now shows every state as it was 2.5 s ago
    apply(url, write_leases(tmp_path / "l.yaml", 1, state="stopped"))
    reconcile(url)  # stop accepted
    reconcile(url)  # the list still says started: stop again -> 400 -> re-read
    row = get(url)["box-00"]
    assert row["phase"] == "Stopped", row
    assert row["failures"] == 0 and "as listed" in row["message"]
    _, out, _ = cli(url, "events", "box-00", "-o", "json")
    outcomes = [e["outcome"] for e in json.loads(out)]
    assert "reobserved" in outcomes and "conflict" not in outcomes


def test_without_auto_stop_the_sandbox_is_never_stopped_behind_our_back(
    env: EmulatorProcess, tmp_path: Path
) -> None:
    url = upgraded(f"sqlite:///{tmp_path / 'l.db'}")
    env.set_faults(time_scale=6000)  # Daytona's default 15 minutes pass in 0.15 s
    apply(url, write_leases(tmp_path / "l.yaml", 1))
    rows = passes(url, 3)
    assert rows["box-00"]["phase"] == "Ready"
    [sb] = ours(env)
    assert sb.auto_stop_interval == 0
    time.sleep(0.5)
    assert env.client().get(sb.id).state == "started"


def test_auto_stopped_lease_is_idle_and_exec_starts_it_on_demand(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    url = upgraded(database_url)
    path = tmp_path / "l.yaml"
    path.write_text("leases:\n  - name: parked\n    auto_stop_interval: 1\n")
    apply(url, path)
    rows = passes(url, 3)
    assert rows["parked"]["phase"] == "Ready"
    sandbox_id = rows["parked"]["sandbox_id"]
    env.set_faults(time_scale=600)  # one idle minute = 0.1 s
    deadline = time.monotonic() + 10
    while env.client().get(sandbox_id).state != "stopped":
        assert time.monotonic() < deadline, "the local API did not auto-stop the idle sandbox"
        time.sleep(0.1)
    env.reset_stats()
    rows = passes(url, 2)
    assert rows["parked"]["phase"] == "Idle" and "on demand" in rows["parked"]["message"]
    assert env.stats().get("start", 0) == 0  # not drift: the reconciler does not start it
    # Real minutes again, so the woken sandbox is not auto-stopped before the pass below looks.
    env.set_faults(time_scale=1)
    code, out, err = cli(url, "exec", "parked", "--", "echo", "woke")
    assert code == 0 and "woke" in out, out + err
    assert env.stats().get("start", 0) == 1
    rows = passes(url, 1, pause=0)
    assert rows["parked"]["phase"] == "Ready" and rows["parked"]["sandbox_id"] == sandbox_id


def test_an_ephemeral_row_desired_stopped_is_left_running_with_the_reason(
    env: EmulatorProcess, tmp_path: Path
) -> None:
    url = upgraded(f"sqlite:///{tmp_path / 'l.db'}")
    path = tmp_path / "l.yaml"
    path.write_text("leases:\n  - name: eph\n    auto_delete_interval: 0\n")
    apply(url, path)
    assert passes(url, 3)["eph"]["phase"] == "Ready"
    sql(url, "UPDATE leases SET desired_state = 'stopped' WHERE name = 'eph'")  # apply would refuse
    row = passes(url, 2)["eph"]
    assert row["phase"] == "Failed" and "ephemeral" in row["message"]
    [sb] = ours(env)
    assert sb.state == "started"


def test_named_throttlers_reach_the_controller_with_their_scope(env: EmulatorProcess) -> None:
    provider = DaytonaProvider(env.api_url, env.api_key)
    env.set_faults(fail_rate={"create": {"429": 1.0}}, retry_after=7)
    with pytest.raises(RateLimitedError) as info:
        provider.create(CreateRequest(name="t", labels={}))
    assert info.value.scope == "create" and info.value.retry_after == 7
    env.set_faults(fail_rate={"stop": {"429": 1.0}})
    env.set_faults(fail_rate={})
    sb = provider.create(CreateRequest(name="t2", labels={}))
    env.set_faults(fail_rate={"stop": {"429": 1.0}}, retry_after=3)
    with pytest.raises(RateLimitedError) as info:
        provider.stop(sb.id)
    assert info.value.scope == "lifecycle" and info.value.retry_after == 3


def test_the_list_walk_misses_nothing_while_activity_reorders_sandboxes(
    env: EmulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = env.client()
    maker = DaytonaProvider(env.api_url, env.api_key)
    made = [
        maker.create(CreateRequest(name=f"walk-{i}", labels={"leasectl-instance": "walk"})) for i in range(7)
    ]
    monkeypatch.setattr(daytona_provider, "PAGE_SIZE", 2)
    touched: list[int] = []

    def on_request(operation: str, _outcome: str) -> None:
        if operation == "list":  # between pages, the oldest sandboxes see activity
            client.get(made[len(touched) % len(made)].id)
            touched.append(1)

    provider = DaytonaProvider(env.api_url, env.api_key, on_request=on_request)
    listed = provider.list_sandboxes({"leasectl-instance": "walk"})
    assert sorted(sb.id for sb in listed) == sorted(sb.id for sb in made)  # none skipped
    assert len(touched) >= 4
    assert [sb.id for sb in listed] == [sb.id for sb in made]  # creation order
    query = ListSandboxesQuery(labels={"leasectl-instance": "walk"}, limit=200)
    assert len(list(client.list(query))) == 7
