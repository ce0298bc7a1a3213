"""local-daytona's pure parts: derived list states, the versions a lagging list reads, settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.emulator.faults import Faults, FaultSettings, throttler_for, validate
from controller.emulator.lifecycle import Lifecycle
from controller.emulator.state import SandboxRecord, Store, list_state


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("state", "desired", "shown"),
    [
        ("started", "started", "started"),
        ("started", "stopped", "stopping"),
        ("stopped", "started", "starting"),
        ("archived", "started", "restoring"),
        ("stopped", "destroyed", "destroying"),
        ("archived", "destroyed", "destroying"),
        ("error", "destroyed", "error"),
        ("unknown", "started", "creating"),
        ("stopped", "stopped", "stopped"),
        ("error", "started", "error"),
    ],
)
def test_list_state(state: str, desired: str, shown: str) -> None:
    assert list_state(state, desired) == shown


def test_versions_show_each_sandbox_as_it_was(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path, clock=clock)
    lifecycle = Lifecycle(store, Faults(FaultSettings(list_lag=5)), clock=clock)
    record = lifecycle.create({"name": "v"})
    assert record.state == "started"
    clock.now += 10
    lifecycle.stop(record)
    clock.now += 10
    lifecycle.delete(record)
    assert store.find("v") is None and store.count() == 0

    def seen(at: float) -> list[tuple[str, str]]:
        return [(r.name, r.state) for r in store.as_of(at)]

    assert seen(999.0) == []  # before the create
    assert seen(1005.0) == [("v", "started")]
    assert seen(1015.0) == [("v", "stopped")]
    assert seen(1025.0) == []  # destroyed sandboxes are never listed

    store.prune_versions(1015.0)
    assert seen(1015.0) == [("v", "stopped")]  # what a list lagging to the horizon needs is kept
    assert store.versions[record.id][0][0] == 1010.0  # older versions are gone
    store.prune_versions(1025.0)
    assert record.id not in store.versions


def test_versions_are_pruned_to_one_per_live_sandbox(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path, clock=clock)
    lifecycle = Lifecycle(store, Faults(), clock=clock)
    record = lifecycle.create({"name": "p"})
    for _ in range(5):
        clock.now += 1
        lifecycle.touch(record)
    assert len(store.versions[record.id]) > 1
    store.prune_versions(clock.now)
    assert [copy.last_activity_ts for _, copy in store.versions[record.id]] == [clock.now]


def test_loaded_sandboxes_are_listed_at_once_and_not_stopped_as_idle(tmp_path: Path) -> None:
    store = Store(tmp_path)
    old = SandboxRecord(id="x", name="x", seq=1, created_ts=1.0, created_at="t", updated_at="t")
    store.save_many([old])
    store.close()
    clock = Clock()
    reloaded = Store(tmp_path, clock=clock)
    assert [r.name for r in reloaded.as_of(0.0)] == ["x"]
    assert reloaded.by_id["x"].last_activity_ts == clock.now
    Lifecycle(reloaded, Faults(), clock=clock).sweep()
    assert reloaded.by_id["x"].state == "started"


def test_auto_stop_uses_the_time_scale(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path, clock=clock)
    lifecycle = Lifecycle(store, Faults(FaultSettings(time_scale=60)), clock=clock)  # a minute = 1 s
    idle = lifecycle.create({"name": "idle", "autoStopInterval": 2})
    off = lifecycle.create({"name": "off", "autoStopInterval": 0})
    clock.now += 1.5
    lifecycle.sweep()
    assert idle.state == "started"
    clock.now += 1.0
    lifecycle.sweep()
    assert (idle.state, idle.desired_state, off.state) == ("stopped", "stopped", "started")


def test_throttler_names() -> None:
    assert throttler_for("create") == "sandbox-create"
    assert {throttler_for(op) for op in ("start", "stop", "archive", "recover", "delete", "labels")} == {
        "sandbox-lifecycle"
    }
    assert {throttler_for(op) for op in ("get", "list", "execute", "download")} == {"authenticated"}


@pytest.mark.parametrize(
    "raw",
    [
        {"time_scale": 0},
        {"no_runners": 2},
        {"build_failed": "often"},
        {"quota_memory": -1},
        {"start_wait_seconds": -0.5},
        {"error_recoverable": "yes"},
        {"whatever": 1},
    ],
)
def test_settings_refuse_bad_values(raw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        validate(raw)


def test_settings_round_trip() -> None:
    settings = FaultSettings(quota=2, quota_cpu=4, no_runners=0.5, time_scale=600, start_wait_seconds=1)
    assert validate(settings.to_json()) == settings
    assert settings.patched({"no_runners": True}).no_runners == 1.0
