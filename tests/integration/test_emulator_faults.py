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


def test_rate_limit_uses_named_throttlers_and_is_not_replayed(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    client.create(CreateSandboxFromSnapshotParams(name="rl"), timeout=10)
    emulator.set_faults(fail_rate={"get": {"429": 1.0}}, retry_after=7)
    emulator.reset_stats()
    with pytest.raises(DaytonaRateLimitError) as info:
        client.get("rl")
    # urllib3 replays a GET only on a plain Retry-After; Daytona's named header is not one.
    assert emulator.stats()["get"] == 1
    headers = {k.lower(): v for k, v in (info.value.headers or {}).items()}
    assert headers["retry-after-authenticated"] == "7"
    assert "retry-after" not in headers

    emulator.replace_faults(fail_rate={"*": {"429": 1.0}}, retry_after=2)
    expected = {
        ("POST", "/api/sandbox"): "sandbox-create",
        ("POST", "/api/sandbox/rl/stop"): "sandbox-lifecycle",
        ("POST", "/api/sandbox/rl/start"): "sandbox-lifecycle",
        ("DELETE", "/api/sandbox/rl"): "sandbox-lifecycle",
        ("PUT", "/api/sandbox/rl/labels"): "sandbox-lifecycle",
        ("GET", "/api/sandbox"): "authenticated",
        ("GET", "/api/sandbox/rl"): "authenticated",
    }
    for (method, path), name in expected.items():
        answer = emulator.call(method, path, {} if method in ("POST", "PUT") else None)
        assert answer.status == 429, (method, path)
        assert answer.body["message"] == "ThrottlerException: Too Many Requests"
        got = {k.lower(): v for k, v in answer.headers.items()}
        assert got[f"retry-after-{name}"] == "2"
        assert {f"x-ratelimit-{part}-{name}" for part in ("limit", "remaining", "reset")} <= set(got)
        assert "retry-after" not in got, (method, path)
    emulator.reset_faults()
    assert client.get("rl").state == "started"  # nothing happened behind the 429s


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
    emulator.set_faults(latency={"get": 1.0})
    started = time.monotonic()
    client.get("lat")
    assert time.monotonic() - started >= 1.0
    started = time.monotonic()
    list(client.list())
    assert time.monotonic() - started < 1.0  # not delayed (a list takes milliseconds; room for load)


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
        args=[
            *("--quota", "2", "--list-lag", "1.5", "--fail-rate", "get:429=0.25", "--latency", "list=0.1"),
            *("--quota-cpu", "8", "--quota-memory", "16", "--quota-disk", "30", "--no-runners", "0.5"),
            *("--build-failed", "0.2", "--start-wait-seconds", "5", "--time-scale", "600"),
        ],
    )
    with emu:
        settings = emu.faults()
        assert settings["quota"] == 2 and settings["list_lag"] == 1.5
        assert settings["fail_rate"] == {"get": {"429": 0.25}}
        assert settings["latency"] == {"list": 0.1}
        assert (settings["quota_cpu"], settings["quota_memory"], settings["quota_disk"]) == (8, 16, 30)
        assert (settings["no_runners"], settings["build_failed"]) == (0.5, 0.2)
        assert (settings["start_wait_seconds"], settings["time_scale"]) == (5.0, 600.0)


def test_start_flags_are_validated(tmp_path: object) -> None:
    from pathlib import Path

    emu = EmulatorProcess(Path(str(tmp_path)) / "bad", args=["--time-scale", "0"], startup_timeout=20)
    with pytest.raises(EmulatorError, match="time_scale must be positive"):
        emu.start()


def test_new_settings_are_validated(emulator: EmulatorProcess) -> None:
    for bad in (
        {"no_runners": 1.5},
        {"build_failed": -0.1},
        {"time_scale": 0},
        {"start_wait_seconds": -1},
        {"quota_cpu": -2},
        {"quota_disk": 1.5},
        {"list_lag": "soon"},
    ):
        with pytest.raises(EmulatorError, match="400"):
            emulator.set_faults(**bad)
    assert emulator.set_faults(no_runners=True)["no_runners"] == 1.0
