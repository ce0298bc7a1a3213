"""local-daytona behaves like the real Daytona server (reference/daytona-server-semantics.md).

Quota and capacity 400s, create/start/recover that wait and fail late with 400 while the errored
sandbox stays, ephemeral sandboxes, auto-stop by inactivity (with ``time_scale``), list order,
derived list states, a list lag that covers states, refused repeats and the error envelope; all
through the unmodified SDK or plain HTTP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from daytona import (
    CreateSandboxFromSnapshotParams,
    DaytonaBadRequestError,
    DaytonaConflictError,
    DaytonaNotFoundError,
    ListSandboxesQuery,
    SandboxState,
)

from tests.support.emulator import EmulatorProcess

pytestmark = pytest.mark.timeout(120)


def create(emu: EmulatorProcess, name: str, **body: Any) -> dict[str, Any]:
    answer = emu.call("POST", "/api/sandbox", {"name": name, "labels": {}, "env": {}, **body})
    assert answer.status == 200, answer.body
    result: dict[str, Any] = answer.body
    return result


def listed(emu: EmulatorProcess, query: str = "") -> dict[str, str]:
    """Name -> state as the list shows them (the list is not activity)."""
    body = emu.request("GET", f"/api/sandbox?limit=200{query}")
    return {item["name"]: item["state"] for item in body["items"]}


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# -- quota and capacity ------------------------------------------------------------------------


def test_resource_quotas_and_no_runners_answer_400(emulator: EmulatorProcess) -> None:
    emulator.set_faults(quota_cpu=3, quota_disk=10)
    create(emulator, "big", cpu=2, disk=4)
    answer = emulator.call("POST", "/api/sandbox", {"name": "more", "cpu": 2, "disk": 4})
    assert answer.status == 400 and answer.body["message"] == "Total CPU limit exceeded. Maximum allowed: 3"
    emulator.request("POST", "/api/sandbox/big/stop")  # stopped: no CPU held, the disk still is
    create(emulator, "more", cpu=2, disk=4)
    answer = emulator.call("POST", "/api/sandbox/big/start")
    assert answer.status == 400 and "Total CPU limit exceeded" in answer.body["message"]
    answer = emulator.call("POST", "/api/sandbox", {"name": "disk", "disk": 4})
    assert answer.status == 400 and answer.body["message"].startswith("Total disk limit exceeded")
    emulator.request("POST", "/api/sandbox/big/archive")  # archived: the disk is released
    create(emulator, "disk", disk=2)

    emulator.replace_faults(no_runners=1.0)
    client = emulator.client()
    with pytest.raises(DaytonaBadRequestError, match="No available runners"):
        client.create(CreateSandboxFromSnapshotParams(name="nowhere"), timeout=10)
    with pytest.raises(DaytonaNotFoundError):
        client.get("nowhere")
    answer = emulator.call("POST", "/api/sandbox/big/start")
    assert answer.status == 400 and answer.body["message"] == "No available runners"
    emulator.reset_faults()
    assert client.get("big").state == SandboxState.ARCHIVED


def test_memory_quota_counts_running_sandboxes(emulator: EmulatorProcess) -> None:
    emulator.set_faults(quota_memory=4)
    create(emulator, "m1", memory=3)
    answer = emulator.call("POST", "/api/sandbox", {"name": "m2", "memory": 2})
    assert answer.status == 400 and answer.body["message"].startswith("Total memory limit exceeded")
    create(emulator, "m3", memory=1)


# -- create, start and recover wait; failing late is a 400 with the sandbox kept ----------------


def test_create_that_fails_late_answers_400_and_keeps_the_errored_sandbox(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    emulator.set_faults(sandbox_error={"create": 1.0}, transition_latency={"create": 0.2})
    with pytest.raises(DaytonaBadRequestError, match="Sandbox failed to start: injected fault"):
        client.create(CreateSandboxFromSnapshotParams(name="late"), timeout=10)
    kept = client.get("late")
    assert kept.state == SandboxState.ERROR and kept.recoverable
    assert listed(emulator) == {"late": "error"}

    emulator.replace_faults(build_failed=1.0)
    answer = emulator.call("POST", "/api/sandbox", {"name": "unbuilt"})
    assert answer.status == 400 and answer.body["message"].startswith("Sandbox failed to start:")
    assert client.get("unbuilt").state == SandboxState.BUILD_FAILED
    client.delete(client.get("unbuilt"))  # delete is allowed from build_failed

    emulator.replace_faults(sandbox_error={"recover": 1.0})
    answer = emulator.call("POST", "/api/sandbox/late/recover")
    assert answer.status == 400 and answer.body["message"].startswith("Sandbox failed to start:")
    emulator.replace_faults(sandbox_error={"start": 1.0})
    create(emulator, "restart-me")
    emulator.request("POST", "/api/sandbox/restart-me/stop")
    answer = emulator.call("POST", "/api/sandbox/restart-me/start")
    assert answer.status == 400 and answer.body["message"].startswith("Sandbox failed to start:")
    assert client.get("restart-me").state == SandboxState.ERROR


def test_create_answers_as_is_after_the_wait(emulator: EmulatorProcess) -> None:
    emulator.set_faults(stuck_starting={"create": 1.0}, start_wait_seconds=0.2)
    body = create(emulator, "stuck")
    assert body["state"] == "starting"


def test_the_wait_does_not_block_other_requests(emulator: EmulatorProcess) -> None:
    emulator.set_faults(transition_latency={"create": 2.0})
    answers: list[dict[str, Any]] = []
    creator = threading.Thread(target=lambda: answers.append(create(emulator, "waiting")))
    creator.start()
    try:
        wait_until(lambda: "waiting" in listed(emulator))
        assert creator.is_alive()  # the create is still waiting while the list was served
        assert listed(emulator) == {"waiting": "creating"}
        assert emulator.request("GET", "/api/sandbox/waiting")["state"] == "creating"
    finally:
        creator.join(30)
    assert answers and answers[0]["state"] == "started"


# -- ephemeral and GPU -------------------------------------------------------------------------


def test_ephemeral_stop_deletes_and_archive_is_refused(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    emulator.set_faults(transition_latency={"delete": 0.3})
    sandbox = client.create(CreateSandboxFromSnapshotParams(name="eph", ephemeral=True), timeout=10)
    assert sandbox.auto_delete_interval == 0
    answer = emulator.call("POST", "/api/sandbox/eph/archive")
    assert answer.status == 400 and "Ephemeral" in answer.body["message"]
    stopped = emulator.request("POST", f"/api/sandbox/{sandbox.id}/stop")
    assert stopped["state"] == "destroying" and stopped["desiredState"] == "destroyed"
    wait_until(lambda: emulator.call("GET", f"/api/sandbox/{sandbox.id}").status == 404)
    assert listed(emulator) == {}


def test_gpu_sandboxes_must_be_ephemeral(emulator: EmulatorProcess) -> None:
    answer = emulator.call("POST", "/api/sandbox", {"name": "gpu", "gpu": 1})
    assert answer.status == 400 and answer.body["message"].startswith("GPU sandboxes must be ephemeral")
    assert create(emulator, "gpu", gpu=1, autoDeleteInterval=0)["gpu"] == 1


# -- auto-stop by inactivity -------------------------------------------------------------------


def test_idle_sandboxes_are_stopped_and_activity_keeps_them_started(emulator: EmulatorProcess) -> None:
    # time_scale 600: one "minute" is 0.1 s, so autoStopInterval 5 is half a second.
    emulator.set_faults(time_scale=600, transition_latency={"stop": 0.3})
    assert create(emulator, "default")["autoStopInterval"] == 15
    create(emulator, "idle", autoStopInterval=5)
    create(emulator, "busy", autoStopInterval=5)
    create(emulator, "never", autoStopInterval=0)
    seen: set[str] = set()

    busy = emulator.request("GET", "/api/sandbox/busy")["id"]

    def idle_stopped() -> bool:
        emulator.request("GET", f"/toolbox/{busy}/work-dir")  # a toolbox call is activity
        state = listed(emulator)["idle"]
        seen.add(state)
        return state == "stopped"

    wait_until(idle_stopped)
    assert "stopping" in seen  # stopped through stopping, as the server does
    states = listed(emulator)
    assert states["busy"] == "started" and states["never"] == "started"
    idle = emulator.request("GET", "/api/sandbox/idle")
    assert idle["desiredState"] == "stopped"


def test_last_activity_moves_on_calls_and_not_on_list(emulator: EmulatorProcess) -> None:
    first = create(emulator, "act")["lastActivityAt"]
    time.sleep(0.01)
    listed(emulator)
    assert emulator.request("GET", "/api/sandbox?limit=5")["items"][0]["lastActivityAt"] == first
    touched = emulator.request("GET", "/api/sandbox/act")["lastActivityAt"]
    assert touched > first


def test_stopped_sandboxes_are_archived_after_their_interval(emulator: EmulatorProcess) -> None:
    emulator.set_faults(time_scale=600)
    create(emulator, "arch", autoArchiveInterval=2)
    emulator.request("POST", "/api/sandbox/arch/stop")
    wait_until(lambda: listed(emulator)["arch"] == "archived")


# -- list --------------------------------------------------------------------------------------


def test_list_default_order_is_last_activity_descending(emulator: EmulatorProcess) -> None:
    for i in range(4):
        create(emulator, f"o-{i}")
    assert list(listed(emulator)) == ["o-3", "o-2", "o-1", "o-0"]
    emulator.request("GET", "/api/sandbox/o-1")  # activity moves it to the front
    assert list(listed(emulator)) == ["o-1", "o-3", "o-2", "o-0"]


def test_created_at_cursor_is_stable_while_activity_changes(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    for i in range(6):
        create(emulator, f"c-{i}")
    names: list[str] = []
    cursor = ""
    while True:
        page = emulator.request("GET", f"/api/sandbox?limit=2&sort=createdAt&order=asc{cursor}")
        names += [item["name"] for item in page["items"]]
        for item in page["items"]:  # activity between pages must not skip or repeat anything
            emulator.request("GET", f"/api/sandbox/{item['id']}")
        if not page["nextCursor"]:
            break
        cursor = f"&cursor={page['nextCursor']}"
    assert names == [f"c-{i}" for i in range(6)]
    query = ListSandboxesQuery(limit=4, sort="createdAt", order="asc")
    assert [s.name for s in client.list(query)] == names


def test_list_shows_derived_states_and_hides_the_destroyed(emulator: EmulatorProcess) -> None:
    for name in ("a", "b", "c", "d", "e", "f"):
        create(emulator, name)
    emulator.force_state("a", "started", desired_state="stopped")
    emulator.request("POST", "/_emulator/sandboxes/b/state", {"state": "stopped", "desiredState": "started"})
    emulator.request("POST", "/_emulator/sandboxes/c/state", {"state": "archived", "desiredState": "started"})
    emulator.request(
        "POST", "/_emulator/sandboxes/d/state", {"state": "stopped", "desiredState": "destroyed"}
    )
    emulator.request("POST", "/_emulator/sandboxes/e/state", {"state": "unknown"})
    emulator.request("POST", "/_emulator/sandboxes/f/state", {"state": "error", "desiredState": "destroyed"})
    assert listed(emulator) == {
        "a": "stopping",
        "b": "starting",
        "c": "restoring",
        "d": "destroying",
        "e": "creating",
    }
    assert listed(emulator, "&includeErroredDeleted=true")["f"] == "error"
    assert emulator.request("GET", "/api/sandbox/a")["state"] == "started"  # get shows the real state
    emulator.request("POST", "/_emulator/sandboxes/e/state", {"state": "destroyed"})
    assert "e" not in listed(emulator) and emulator.call("GET", "/api/sandbox/e").status == 404


def test_list_lag_delays_states_while_get_stays_consistent(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    create(emulator, "lag")
    emulator.set_faults(list_lag=0.8)
    assert listed(emulator) == {}  # created less than 0.8 s ago
    wait_until(lambda: listed(emulator) == {"lag": "started"})
    emulator.request("POST", "/api/sandbox/lag/stop")
    assert client.get("lag").state == SandboxState.STOPPED
    assert listed(emulator) == {"lag": "started"}  # the list still shows the old state
    wait_until(lambda: listed(emulator) == {"lag": "stopped"})
    assert listed(emulator, "&states=stopped") == {"lag": "stopped"}
    emulator.request("DELETE", "/api/sandbox/lag")
    with pytest.raises(DaytonaNotFoundError):
        client.get("lag")
    assert listed(emulator) == {"lag": "stopped"}  # the delete is not visible yet
    wait_until(lambda: listed(emulator) == {})


# -- refused repeats and allowed transitions ---------------------------------------------------


def test_refused_repeats_and_allowed_states(emulator: EmulatorProcess) -> None:
    def answer(method: str, path: str) -> tuple[int, str]:
        got = emulator.call(method, f"/api/sandbox/{path}")
        return got.status, (got.body or {}).get("message", "") if got.status >= 400 else got.body["state"]

    create(emulator, "r")
    assert answer("POST", "r/start") == (200, "started")  # start on started: a no-op
    assert answer("POST", "r/recover") == (400, "Sandbox is not in an errored state")
    assert answer("POST", "r/stop") == (200, "stopped")
    assert answer("POST", "r/stop") == (400, "Sandbox is not in a stoppable state")
    assert answer("POST", "r/archive") == (200, "archived")
    assert answer("POST", "r/archive") == (400, "Sandbox is not stopped")
    assert answer("POST", "r/stop") == (400, "Sandbox is not in a stoppable state")

    for state, start in (("paused", "started"), ("archiving", "started"), ("stopped", "started")):
        emulator.force_state("r", state)
        assert answer("POST", "r/start") == (200, start), state
    emulator.force_state("r", "paused")
    assert answer("POST", "r/stop") == (200, "stopped")
    emulator.force_state("r", "stopping")
    assert answer("POST", "r/start") == (409, "Sandbox state change in progress")
    emulator.force_state("r", "resizing")
    assert answer("POST", "r/start") == (409, "Sandbox state change in progress")
    emulator.force_state("r", "unknown")
    assert answer("POST", "r/start") == (400, "Sandbox is not in valid state")

    emulator.force_state("r", "error", recoverable=False)
    for action in ("start", "stop", "archive"):
        assert answer("POST", f"r/{action}") == (400, "Sandbox is in an errored state"), action
    assert answer("POST", "r/recover")[0] == 400

    for state in ("error", "archiving", "archived", "pending_build", "stopped"):
        create(emulator, f"del-{state}")
        emulator.force_state(f"del-{state}", state)
        status, shown = answer("DELETE", f"del-{state}")
        assert status == 200 and shown in ("destroying", "destroyed"), state


def test_delete_frees_the_name_at_once(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    emulator.set_faults(transition_latency={"delete": 1.0})
    old = create(emulator, "reuse")
    deleting = emulator.request("DELETE", "/api/sandbox/reuse")
    assert deleting["name"].startswith("DESTROYED_reuse_") and deleting["state"] == "destroying"
    again = client.create(CreateSandboxFromSnapshotParams(name="reuse"), timeout=10)
    assert again.id != old["id"]
    assert client.get(old["id"]).state == SandboxState.DESTROYING
    with pytest.raises(DaytonaConflictError, match="state change in progress"):
        client.delete(client.get(old["id"]))
    assert client.get("reuse").id == again.id


def test_error_envelope_everywhere(emulator: EmulatorProcess) -> None:
    create(emulator, "env")
    for method, path in (
        ("GET", "/api/sandbox/nobody"),
        ("POST", "/api/sandbox/env/archive"),
        ("GET", "/api/sandbox?limit=999"),
        ("POST", "/toolbox/nobody/process/execute"),
    ):
        got = emulator.call(method, path, {} if method == "POST" else None)
        assert got.status >= 400
        assert {"path", "timestamp", "statusCode", "error", "message"} <= set(got.body), path
        assert got.body["statusCode"] == got.status and got.body["path"] == path.split("?")[0]
    assert (
        emulator.call("GET", "/api/sandbox/nobody").body["message"]
        == "Sandbox with ID or name nobody not found"
    )
