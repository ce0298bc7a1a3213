"""The scenarios that matter, against a real Daytona (``make test-live``; see tests/live/conftest.py).

One lease walks through create -> Ready -> exec -> stop -> start -> spec change (replacement) ->
absent; an orphan with this run's instance label is collected by ``gc``; ``doctor --probe`` creates,
runs in and deletes a throwaway sandbox. Everything goes through the CLI as an operator runs it, on
an SQLite database of the run. The same suite runs in CI against the local Daytona API
(tests/integration/test_live_suite.py), so it cannot rot unseen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.planner import ownership_labels
from controller.providers.base import CreateRequest
from tests.live.conftest import Live

LEASE = "live-web"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("live")


@pytest.fixture
def leasectl(live: Live, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DAYTONA_API_URL", live.api_url)
    monkeypatch.setenv("DAYTONA_API_KEY", live.api_key)
    if live.target:
        monkeypatch.setenv("DAYTONA_TARGET", live.target)
    monkeypatch.setenv("LEASECTL_DATABASE_URL", f"sqlite:///{workdir / 'live.db'}")
    monkeypatch.setenv("LEASECTL_CONTROLLER__INSTANCE", live.instance)
    monkeypatch.setenv("LEASECTL_CONTROLLER__BACKOFF_BASE_SECONDS", "1")
    monkeypatch.setenv("LEASECTL_CONTROLLER__BACKOFF_MAX_SECONDS", "10")

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, list(args))
        return result.exit_code, result.stdout + result.stderr

    code, out = run("db", "upgrade")
    assert code == 0, out
    return run


def write(workdir: Path, state: str, env_value: str = "one") -> Path:
    path = workdir / "leases.yaml"
    path.write_text(
        f"leases:\n  - name: {LEASE}\n    state: {state}\n    env: {{LIVE_MARK: {env_value}}}\n"
        f"    labels: {{purpose: leasectl-live-test}}\n"
    )
    return path


def lease_row(leasectl: Any) -> dict[str, Any]:
    code, out = leasectl("get", LEASE, "-o", "json")
    assert code == 0, out
    [row] = json.loads(out)
    return dict(row)


def converge(leasectl: Any, live: Live, phase: str) -> dict[str, Any]:
    deadline = time.monotonic() + live.wait
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        code, out = leasectl("reconcile", "--once")
        assert code in (0, 1), out
        row = lease_row(leasectl)
        if row["phase"] == phase:
            return row
        time.sleep(live.poll)
    raise AssertionError(
        f"{LEASE} not {phase} after {live.wait:.0f}s: {row.get('phase')}: {row.get('message')}"
    )


def test_lease_lifecycle(live: Live, leasectl: Any, workdir: Path) -> None:
    provider = live.provider()
    code, out = leasectl("apply", "-f", str(write(workdir, "running")))
    assert code == 0, out
    row = converge(leasectl, live, "Ready")
    first_id = row["sandbox_id"]
    observed = provider.get(first_id)
    assert observed is not None and observed.labels["leasectl-instance"] == live.instance

    code, out = leasectl("exec", LEASE, "--", "sh", "-c", 'echo "mark=$LIVE_MARK"; exit 3')
    assert code == 3 and "mark=one" in out, out

    leasectl("apply", "-f", str(write(workdir, "stopped")))
    converge(leasectl, live, "Stopped")
    leasectl("apply", "-f", str(write(workdir, "running")))
    assert converge(leasectl, live, "Ready")["sandbox_id"] == first_id

    leasectl("apply", "-f", str(write(workdir, "running", env_value="two")))
    row = converge(leasectl, live, "Ready")
    assert row["sandbox_id"] != first_id  # a spec change replaced the sandbox
    assert provider.get(first_id) is None or provider.get(first_id).state in ("destroying", "destroyed")  # type: ignore[union-attr]
    code, out = leasectl("exec", LEASE, "--", "sh", "-c", 'echo "mark=$LIVE_MARK"')
    assert code == 0 and "mark=two" in out, out

    leasectl("apply", "-f", str(write(workdir, "absent")))
    converge(leasectl, live, "Deleted")


def test_gc_collects_an_orphan_of_this_instance(live: Live, leasectl: Any) -> None:
    provider = live.provider()
    labels = ownership_labels(live.instance, "live-orphan-of-no-lease", "0" * 16)
    orphan = provider.create(
        CreateRequest(name=f"{live.instance}-orphan", labels=labels, auto_stop_interval=0)
    )
    deadline = time.monotonic() + live.wait
    while time.monotonic() < deadline:
        code, out = leasectl("gc", "--grace", "0")
        assert code in (0, 1), out
        found = provider.get(orphan.id)
        if found is None or found.state in ("destroying", "destroyed"):
            return
        time.sleep(live.poll)
    raise AssertionError(f"orphan {orphan.id} not collected after {live.wait:.0f}s")


def test_doctor_probe(leasectl: Any) -> None:
    code, out = leasectl("doctor", "--probe")
    assert code == 0, out
