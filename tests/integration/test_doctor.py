"""`leasectl doctor [--probe]` against the local Daytona API: reports, masks the key, cleans up."""

from __future__ import annotations

import pytest
from daytona import ListSandboxesQuery
from typer.testing import CliRunner

from controller.cli import app
from tests.support.emulator import EmulatorProcess


def test_doctor_probe_reports_and_leaves_nothing(
    emulator: EmulatorProcess, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAYTONA_API_URL", emulator.api_url)
    monkeypatch.setenv("DAYTONA_API_KEY", emulator.api_key)
    result = CliRunner().invoke(app, ["--database-url", database_url, "doctor", "--probe"])
    assert result.exit_code == 0, result.stdout + result.stderr
    out = result.stdout
    assert emulator.api_key not in out and "**********" in out
    for line in ("ok   schema", "ok   Daytona API", "ok   probe: created", "ok   probe cleanup"):
        assert line in out, out
    assert emulator.stats().get("execute", 0) == 1
    assert list(emulator.client().list(ListSandboxesQuery())) == []


def test_doctor_fails_without_key_or_when_unreachable(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = CliRunner().invoke(app, ["--database-url", database_url, "doctor"])
    assert result.exit_code == 1 and "no Daytona API key" in result.stdout
    monkeypatch.setenv("DAYTONA_API_KEY", "k")
    monkeypatch.setenv("DAYTONA_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("LEASECTL_DAYTONA__REQUEST_TIMEOUT_SECONDS", "2")
    result = CliRunner().invoke(app, ["--database-url", database_url, "doctor"])
    assert result.exit_code == 1 and "FAIL Daytona API" in result.stdout
