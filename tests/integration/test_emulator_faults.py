"""Fault injection and request counters of local-daytona, seen through the unmodified SDK."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from daytona import (
    CreateSandboxFromSnapshotParams,
    DaytonaInternalServerError,
    DaytonaNotFoundError,
    DaytonaRateLimitError,
    DaytonaServiceUnavailableError,
    DaytonaTimeoutError,
    ListSandboxesQuery,
)

from tests.support.emulator import EmulatorError, EmulatorProcess

pytestmark = pytest.mark.timeout(120)


def test_rate_limit_maps_and_is_retried_by_urllib3(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    client.create(CreateSandboxFromSnapshotParams(name="rl"), timeout=10)
    emulator.set_faults(fail_rate={"get": {"429": 1.0}}, retry_after=0)
    emulator.reset_stats()
    with pytest.raises(DaytonaRateLimitError):
        client.get("rl")
    assert emulator.stats()["get"] == 4  # the SDK's urllib3 retries a GET 3 times on Retry-After
    emulator.set_faults(fail_rate={"create": {"429": 1.0}})
    with pytest.raises(DaytonaRateLimitError):
        client.create(timeout=10)
    assert emulator.stats()["create"] == 1  # POST is not retried


def test_5xx_and_timeouts(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    emulator.set_faults(fail_rate={"create": {"500": 1.0}, "list": {"503": 1.0}})
    with pytest.raises(DaytonaInternalServerError):
        client.create(CreateSandboxFromSnapshotParams(name="x"), timeout=10)
    with pytest.raises(DaytonaServiceUnavailableError):
        list(client.list())
    emulator.replace_faults(fail_rate={"create": {"timeout": 1.0}}, hang_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(DaytonaTimeoutError):
        client.create(CreateSandboxFromSnapshotParams(name="lost-answer"), timeout=10)
    assert time.monotonic() - started >= 0.3
    emulator.reset_faults()
    # the create happened; only its answer was lost (find it by name, as the controller does)
    assert client.get("lost-answer").name == "lost-answer"
    with pytest.raises(DaytonaNotFoundError):
        client.get("x")  # an injected 500 has no side effect


def test_latency_per_operation(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    client.create(CreateSandboxFromSnapshotParams(name="lat"), timeout=10)
    emulator.set_faults(latency={"get": 0.4})
    started = time.monotonic()
    client.get("lat")
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    list(client.list())
    assert time.monotonic() - started < 0.4


def test_seeded_faults_repeat(emulator: EmulatorProcess) -> None:
    def outcomes() -> list[bool]:
        emulator.replace_faults(seed=7, fail_rate={"list": {"500": 0.5}})
        result = []
        for _ in range(20):
            try:
                emulator.request("GET", "/api/sandbox")
                result.append(True)
            except EmulatorError:
                result.append(False)
        return result

    first = outcomes()
    assert first == outcomes()
    assert True in first and False in first


def test_list_lags_behind_creates_and_deletes(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    emulator.set_faults(list_lag=0.6)
    sandbox = client.create(CreateSandboxFromSnapshotParams(name="lagging"), timeout=10)
    assert list(client.list()) == []
    assert client.get("lagging").id == sandbox.id  # get is consistent
    time.sleep(0.7)
    assert [s.name for s in client.list()] == ["lagging"]
    client.delete(sandbox, wait=True)
    assert [s.name for s in client.list(ListSandboxesQuery(labels={}))] == ["lagging"]
    time.sleep(0.7)
    assert list(client.list()) == []


def test_stats_count_sdk_calls(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    sandbox = client.create(CreateSandboxFromSnapshotParams(name="counted"), timeout=10)
    client.get("counted")
    list(client.list())
    sandbox.process.exec("true")
    sandbox.fs.upload_file(b"1", "one.txt")
    sandbox.fs.download_file("one.txt")
    sandbox.set_labels({"a": "b"})
    sandbox.stop(timeout=10)
    sandbox.archive()
    sandbox.start(timeout=10)
    client.delete(sandbox)
    stats = emulator.stats()
    expected = {
        "create": 1,
        "list": 1,
        "execute": 1,
        "upload": 1,
        "download": 1,
        "labels": 1,
        "stop": 1,
        "archive": 1,
        "start": 1,
        "delete": 1,
        "recover": 0,
    }
    assert {k: stats[k] for k in expected} == expected
    # get: client.get, then one GET after stop and one after archive (the SDK's refresh)
    assert stats["get"] == 3
    emulator.reset_stats()
    assert set(emulator.stats().values()) == {0}


def test_admin_needs_the_key_and_validates(emulator: EmulatorProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(emulator.base_url + "/_emulator/stats", timeout=5)
    assert info.value.code == 401
    with pytest.raises(EmulatorError, match="400"):
        emulator.set_faults(latency={"nonsense": 1})
    with pytest.raises(EmulatorError, match="400"):
        emulator.set_faults(unknown_knob=1)
    assert emulator.faults()["quota"] is None


def test_start_flags_set_faults(tmp_path: object) -> None:
    from pathlib import Path

    emu = EmulatorProcess(
        Path(str(tmp_path)) / "flags",
        args=["--quota", "2", "--list-lag", "1.5", "--fail-rate", "get:429=0.25", "--latency", "list=0.1"],
    )
    with emu:
        settings = emu.faults()
        assert settings["quota"] == 2 and settings["list_lag"] == 1.5
        assert settings["fail_rate"] == {"get": {"429": 0.25}}
        assert settings["latency"] == {"list": 0.1}
