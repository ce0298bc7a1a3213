"""The reconciler end to end: `leasectl reconcile --once` with the real SDK against the local Daytona
API, on SQLite and PostgreSQL. Observed through the SDK and the server's request counters."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from daytona import ListSandboxesQuery
from typer.testing import CliRunner

from controller import db as dbmod
from controller.cli import app
from tests.support.emulator import EmulatorProcess, point_leasectl_at

INSTANCE = "itest"


@pytest.fixture
def env(emulator: EmulatorProcess, monkeypatch: pytest.MonkeyPatch) -> EmulatorProcess:
    return point_leasectl_at(
        emulator,
        monkeypatch,
        INSTANCE,
        backoff_base_seconds="0.01",
        backoff_max_seconds="0.05",
        leader_lease_seconds="5",
    )


def cli(database_url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["--database-url", database_url, *args])
    return result.exit_code, result.stdout, result.stderr


def reconcile(database_url: str) -> int:
    code, out, err = cli(database_url, "reconcile", "--once")
    assert code in (0, 1), out + err
    return code


def get(database_url: str) -> dict[str, dict[str, Any]]:
    code, out, err = cli(database_url, "get", "-o", "json")
    assert code == 0, err
    return {r["name"]: r for r in json.loads(out)}


def converge(
    database_url: str, expected: dict[str, str], passes: int = 8, pause: float = 0.0
) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(passes):
        time.sleep(pause)
        reconcile(database_url)
        rows = get(database_url)
        if all(rows[name]["phase"] == phase for name, phase in expected.items()):
            return rows
    raise AssertionError({n: (r["phase"], r["message"]) for n, r in rows.items()})


def ours(emu: EmulatorProcess) -> list[Any]:
    return list(emu.client().list(ListSandboxesQuery(labels={"leasectl-instance": INSTANCE}, limit=200)))


def sql(database_url: str, statement: str) -> None:
    database = dbmod.connect(database_url)
    try:
        with database.engine.begin() as conn:
            conn.execute(sa.text(statement))
    finally:
        database.dispose()


def write_leases(path: Path, count: int, state: str = "running") -> Path:
    lines = ["leases:"]
    for i in range(count):
        lines += [f"  - name: box-{i:02d}", f"    state: {state}", "    labels: {team: t}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fleet_converges_and_a_converged_pass_only_lists(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    n = 24
    cli(database_url, "apply", "-f", str(write_leases(tmp_path / "l.yaml", n)))
    rows = converge(database_url, {f"box-{i:02d}": "Ready" for i in range(n)})

    sandboxes = ours(env)
    assert len(sandboxes) == n
    by_lease = {s.labels["leasectl-lease"]: s for s in sandboxes}
    assert set(by_lease) == set(rows)
    for name, sandbox in by_lease.items():
        assert sandbox.state == "started"
        assert sandbox.labels["leasectl-instance"] == INSTANCE
        assert len(sandbox.labels["leasectl-spec"]) >= 8
        assert sandbox.labels["team"] == "t"
        assert rows[name]["sandbox_id"] == sandbox.id
        assert rows[name]["workspace_path"]

    env.reset_stats()
    assert reconcile(database_url) == 0
    stats = env.stats()
    assert stats.get("list", 0) == math.ceil(n / 200)
    assert sum(v for k, v in stats.items() if k != "list") == 0, stats


def test_out_of_band_changes_are_repaired_and_spec_change_replaces(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    cli(database_url, "apply", "-f", str(write_leases(tmp_path / "l.yaml", 3)))
    rows = converge(database_url, {"box-00": "Ready", "box-01": "Ready", "box-02": "Ready"})
    client = env.client()

    client.stop(client.get(rows["box-00"]["sandbox_id"]))
    client.delete(client.get(rows["box-01"]["sandbox_id"]))
    after = converge(database_url, {"box-00": "Ready", "box-01": "Ready"})
    assert client.get(after["box-00"]["sandbox_id"]).state == "started"
    assert after["box-00"]["sandbox_id"] == rows["box-00"]["sandbox_id"]  # started, not replaced
    assert after["box-01"]["sandbox_id"] != rows["box-01"]["sandbox_id"]  # re-created

    old_id = after["box-02"]["sandbox_id"]
    sql(database_url, "UPDATE leases SET env = '{\"NEW\": \"1\"}' WHERE name = 'box-02'")
    replaced = converge(database_url, {"box-02": "Ready"})
    assert replaced["box-02"]["sandbox_id"] != old_id
    lease_sandboxes = [s for s in ours(env) if s.labels["leasectl-lease"] == "box-02"]
    assert [s.id for s in lease_sandboxes] == [replaced["box-02"]["sandbox_id"]]
    assert (
        lease_sandboxes[0].env == {}
        or lease_sandboxes[0].env is None
        or "NEW" in (lease_sandboxes[0].env or {})
    )
    assert len(ours(env)) == 3


def test_desired_state_edits_in_sql(env: EmulatorProcess, database_url: str, tmp_path: Path) -> None:
    cli(database_url, "apply", "-f", str(write_leases(tmp_path / "l.yaml", 3)))
    converge(database_url, {"box-00": "Ready", "box-01": "Ready", "box-02": "Ready"})
    sql(database_url, "UPDATE leases SET desired_state = 'stopped' WHERE name = 'box-00'")
    sql(database_url, "UPDATE leases SET desired_state = 'archived' WHERE name = 'box-01'")
    sql(database_url, "UPDATE leases SET desired_state = 'absent' WHERE name = 'box-02'")
    rows = converge(database_url, {"box-00": "Stopped", "box-01": "Archived", "box-02": "Deleted"})
    client = env.client()
    assert client.get(rows["box-00"]["sandbox_id"]).state == "stopped"
    assert client.get(rows["box-01"]["sandbox_id"]).state == "archived"
    assert {s.labels["leasectl-lease"] for s in ours(env)} == {"box-00", "box-01"}

    sql(database_url, "UPDATE leases SET desired_state = 'running'")
    converge(database_url, {"box-00": "Ready", "box-01": "Ready", "box-02": "Ready"})
    assert len(ours(env)) == 3


def test_converges_through_api_faults(env: EmulatorProcess, database_url: str, tmp_path: Path) -> None:
    env.set_faults(
        fail_rate={
            "create": {"429": 0.15, "500": 0.1},
            "start": {"503": 0.2},
            "list": {"500": 0.1},
            "get": {"429": 0.1},
        },
        retry_after=1,
        list_lag=0.5,
        latency={"create": 0.02},
        seed=7,
    )
    n = 12
    cli(database_url, "apply", "-f", str(write_leases(tmp_path / "l.yaml", n)))
    # Faulty passes fail whole (a list error) or leave leases backing off; give it ~20 s.
    converge(database_url, {f"box-{i:02d}": "Ready" for i in range(n)}, passes=80, pause=0.2)
    env.reset_faults()
    for _ in range(3):  # let the lagging list catch up, then count
        reconcile(database_url)
    by_lease: dict[str, int] = {}
    for sandbox in ours(env):
        by_lease[sandbox.labels["leasectl-lease"]] = by_lease.get(sandbox.labels["leasectl-lease"], 0) + 1
    assert by_lease == {f"box-{i:02d}": 1 for i in range(n)}


def test_sandbox_falling_into_error_is_recovered_or_replaced(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    cli(database_url, "apply", "-f", str(write_leases(tmp_path / "l.yaml", 2)))
    rows = converge(database_url, {"box-00": "Ready", "box-01": "Ready"})
    env.force_state(rows["box-00"]["sandbox_id"], "error", recoverable=True, error_reason="disk hiccup")
    env.force_state(rows["box-01"]["sandbox_id"], "error", recoverable=False, error_reason="host lost")
    after = converge(database_url, {"box-00": "Ready", "box-01": "Ready"})
    assert after["box-00"]["sandbox_id"] == rows["box-00"]["sandbox_id"]  # recovered in place
    assert after["box-01"]["sandbox_id"] != rows["box-01"]["sandbox_id"]  # replaced
    _, out, _ = cli(database_url, "events", "box-01", "-o", "json")
    assert any(
        "host lost" in (e["message"] or "") or "recoverable" in (e["message"] or "") for e in json.loads(out)
    )
    assert len(ours(env)) == 2


def test_plan_takes_no_action_and_reports_changes(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    cli(database_url, "apply", "-f", str(write_leases(tmp_path / "l.yaml", 2)))
    code, out, _ = cli(database_url, "plan", "--detailed-exitcode")
    assert code == 2 and "create" in out
    assert ours(env) == []
    converge(database_url, {"box-00": "Ready", "box-01": "Ready"})
    code, _, _ = cli(database_url, "plan", "--detailed-exitcode")
    assert code == 0


def test_bad_rows_among_good_ones_with_the_real_sdk(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    """Issue 17: rows written with SQL that break the lease rules do not stop `reconcile`, `plan` or
    `get`; the good leases converge through the real SDK and the bad ones say what is wrong."""
    from tests.unit.test_bad_rows import insert_raw

    assert cli(database_url, "db", "upgrade")[0] == 0
    db = dbmod.connect(database_url)
    try:
        for name in ("ok-1", "ok-2"):
            insert_raw(db, name=name, desired_state="running", env="{}", labels="{}")
        insert_raw(db, name="typo", desired_state="running", env='"oops"', labels="{}")
        insert_raw(db, name="Not_A_Slug", desired_state="running", env="{}", labels="{}")
        insert_raw(
            db, name="big-env", desired_state="running", env=json.dumps({"V": "x" * 300_000}), labels="{}"
        )
        insert_raw(db, name="list-labels", desired_state="running", env="{}", labels='["a", "b"]')
    finally:
        db.dispose()
    code, out, err = cli(database_url, "plan")
    assert code == 0 and "Traceback" not in out + err
    assert "skip" in out and "typo" in out
    rows = converge(database_url, {"ok-1": "Ready", "ok-2": "Ready"})
    for name, why in (
        ("typo", "env must be a JSON object of strings"),
        ("Not_A_Slug", "lowercase slug"),
        ("big-env", "bytes"),
        ("list-labels", "labels must be a JSON object of strings"),
    ):
        assert rows[name]["phase"] == "Failed", rows[name]
        assert rows[name]["message"].startswith("invalid lease row: ") and why in rows[name]["message"]
    sandboxes = list(env.client().list(ListSandboxesQuery(labels={"leasectl-instance": INSTANCE})))
    assert sorted(s.labels["leasectl-lease"] for s in sandboxes) == ["ok-1", "ok-2"]
    code, out, err = cli(database_url, "export")
    assert code == 0 and "skipped lease 'typo'" in err and "ok-1" in out
