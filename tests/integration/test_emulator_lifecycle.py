"""The unmodified sync Daytona SDK against local-daytona: lifecycle, list, errors, persistence.

Every response is also validated with the SDK's own generated models, so a field the SDK requires
can never go missing.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from daytona import (
    CreateSandboxFromImageParams,
    CreateSandboxFromSnapshotParams,
    DaytonaAuthenticationError,
    DaytonaBadRequestError,
    DaytonaConflictError,
    DaytonaNotFoundError,
    ListSandboxesQuery,
    Resources,
    SandboxState,
)
from daytona_api_client.models.list_sandboxes_response import ListSandboxesResponse
from daytona_api_client.models.sandbox import Sandbox as SandboxModel
from daytona_api_client.models.sandbox_labels import SandboxLabels

from tests.support.emulator import EmulatorError, EmulatorProcess

pytestmark = pytest.mark.timeout(120)


def raw(emu: EmulatorProcess, method: str, path: str, body: Any = None) -> Any:
    return emu.request(method, "/api" + path, body)


def test_full_lifecycle_with_sdk(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    sandbox = client.create(
        CreateSandboxFromSnapshotParams(name="life-1", labels={"team": "a"}, env_vars={"FOO": "bar"}),
        timeout=10,
    )
    assert sandbox.state == SandboxState.STARTED
    assert sandbox.name == "life-1"
    assert sandbox.labels["team"] == "a"
    assert sandbox.env == {"FOO": "bar"}
    assert sandbox.toolbox_proxy_url == emulator.toolbox_url

    assert client.get("life-1").id == sandbox.id
    assert client.get(sandbox.id).name == "life-1"

    sandbox.stop(timeout=10)
    assert sandbox.state == SandboxState.STOPPED
    sandbox.start(timeout=10)
    assert sandbox.state == SandboxState.STARTED
    sandbox.stop(timeout=10)
    sandbox.archive()
    sandbox.refresh_data()
    assert sandbox.state == SandboxState.ARCHIVED
    sandbox.start(timeout=10)
    assert sandbox.state == SandboxState.STARTED

    labels = sandbox.set_labels({"team": "b", "code-toolbox-language": "python"})
    assert labels == {"team": "b", "code-toolbox-language": "python"}
    assert client.get(sandbox.id).labels == labels

    client.delete(sandbox, timeout=10)
    with pytest.raises(DaytonaNotFoundError):
        client.get(sandbox.id)


def test_create_from_image_with_resources_and_defaults(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    sandbox = client.create(
        CreateSandboxFromImageParams(image="python:3.12-slim", resources=Resources(cpu=2, memory=4, disk=8)),
        timeout=10,
    )
    assert (sandbox.cpu, sandbox.memory, sandbox.disk) == (2, 4, 8)
    assert sandbox.name == sandbox.id  # the server defaults the name to the id
    body = raw(emulator, "GET", f"/sandbox/{sandbox.id}")
    assert body["buildInfo"]["dockerfileContent"] == "FROM python:3.12-slim\n"
    default = client.create(timeout=10)
    assert default.snapshot


def test_responses_match_sdk_models(emulator: EmulatorProcess) -> None:
    created = raw(emulator, "POST", "/sandbox", {"name": "m1", "labels": {"x": "1"}, "env": {}})
    for key in ("cpu", "gpu", "memory", "disk"):
        assert type(created[key]) is int
    model = SandboxModel.from_dict(created)
    assert model is not None and model.state is not None and model.state.value == "started"
    assert SandboxModel.from_dict(raw(emulator, "GET", "/sandbox/m1")) is not None
    for action in ("stop", "archive", "start"):
        assert SandboxModel.from_dict(raw(emulator, "POST", f"/sandbox/m1/{action}")) is not None
    page = ListSandboxesResponse.from_dict(raw(emulator, "GET", "/sandbox"))
    assert page is not None and len(page.items) == 1 and page.next_cursor is None
    assert SandboxLabels.from_dict(raw(emulator, "PUT", "/sandbox/m1/labels", {"labels": {"a": "b"}}))
    url = raw(emulator, "GET", "/sandbox/m1/toolbox-proxy-url")
    assert url == {"url": emulator.toolbox_url}
    deleted = raw(emulator, "DELETE", "/sandbox/m1")
    assert SandboxModel.from_dict(deleted) is not None and deleted["state"] in ("destroying", "destroyed")


def test_list_pagination_and_filters(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    for i in range(7):
        team = "a" if i % 2 == 0 else "b"
        raw(
            emulator, "POST", "/sandbox", {"name": f"p-{i}", "labels": {"team": team, "n": str(i)}, "env": {}}
        )
    emulator.reset_stats()
    oldest_first = ListSandboxesQuery(limit=2, sort="createdAt", order="asc")
    names = [s.name for s in client.list(oldest_first)]
    assert names == [f"p-{i}" for i in range(7)]
    assert emulator.stats()["list"] == 4  # 2 + 2 + 2 + 1

    team_a = [
        s.name
        for s in client.list(ListSandboxesQuery(labels={"team": "a"}, limit=1, sort="createdAt", order="asc"))
    ]
    assert team_a == ["p-0", "p-2", "p-4", "p-6"]
    both = [s.name for s in client.list(ListSandboxesQuery(labels={"team": "a", "n": "2"}))]
    assert both == ["p-2"]

    client.stop(client.get("p-1"), timeout=10)
    client.stop(client.get("p-3"), timeout=10)
    stopped = [s.name for s in client.list(ListSandboxesQuery(states=[SandboxState.STOPPED]))]
    assert sorted(stopped) == ["p-1", "p-3"]
    either = client.list(ListSandboxesQuery(states=[SandboxState.STOPPED, SandboxState.STARTED]))
    assert len(list(either)) == 7

    by_name = [s.name for s in client.list(ListSandboxesQuery(sort="name", order="desc", limit=3))]
    assert by_name == [f"p-{i}" for i in range(6, -1, -1)]

    page = raw(emulator, "GET", "/sandbox?limit=3")
    assert isinstance(page["nextCursor"], str)
    assert "env" not in page["items"][0]


def test_list_limit_bounds(emulator: EmulatorProcess) -> None:
    with pytest.raises(EmulatorError, match="400"):
        raw(emulator, "GET", "/sandbox?limit=201")
    assert raw(emulator, "GET", "/sandbox?limit=200")["items"] == []


def test_transitional_states_visible_with_latency(emulator: EmulatorProcess) -> None:
    # The server answers create/start when started, or with the sandbox as it is after its wait.
    emulator.set_faults(transition_latency={"*": 0.5}, start_wait_seconds=0.1)
    body = raw(emulator, "POST", "/sandbox", {"name": "slow", "env": {}, "labels": {}})
    assert body["state"] == "creating"
    client = emulator.client()
    sandbox = client.get("slow")
    sandbox.wait_for_sandbox_start(timeout=10)
    assert sandbox.state == SandboxState.STARTED

    sandbox.stop(timeout=10)
    assert sandbox.state == SandboxState.STOPPED
    body = raw(emulator, "POST", "/sandbox/slow/start")
    assert body["state"] == "starting"
    with pytest.raises(DaytonaConflictError, match="state change in progress"):
        client.delete(client.get("slow"))
    time.sleep(0.7)  # advances without requests (timer)
    assert raw(emulator, "GET", "/sandbox/slow")["state"] == "started"
    emulator.set_faults(start_wait_seconds=30)
    client.get("slow").stop(timeout=10)
    assert raw(emulator, "POST", "/sandbox/slow/start")["state"] == "started"  # waited for it

    created = client.create(CreateSandboxFromSnapshotParams(name="slow-2"), timeout=10)
    assert created.state == SandboxState.STARTED
    deleting = raw(emulator, "DELETE", "/sandbox/slow-2")
    assert deleting["state"] == "destroying" and deleting["name"].startswith("DESTROYED_slow-2_")
    with pytest.raises(DaytonaConflictError, match="state change in progress"):
        client.delete(created)  # a repeated delete while destroying
    with pytest.raises(DaytonaNotFoundError):
        client.get("slow-2")  # the name is free at once
    time.sleep(0.7)
    with pytest.raises(DaytonaNotFoundError):
        client.get(created.id)


def test_state_machine_refusals(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    sandbox = client.create(CreateSandboxFromSnapshotParams(name="sm"), timeout=10)
    with pytest.raises(DaytonaBadRequestError, match="Sandbox is not stopped"):
        sandbox.archive()  # only from stopped
    with pytest.raises(DaytonaConflictError):
        client.create(CreateSandboxFromSnapshotParams(name="sm"), timeout=10)
    with pytest.raises(EmulatorError, match="400"):
        raw(emulator, "POST", "/sandbox/sm/recover")
    emulator.force_state("sm", "error", recoverable=True, error_reason="disk full")
    got = client.get("sm")
    assert got.state == SandboxState.ERROR and got.error_reason == "disk full" and got.recoverable
    got.recover(timeout=10)
    assert got.state == SandboxState.STARTED
    emulator.force_state("sm", "error", recoverable=False)
    with pytest.raises(EmulatorError, match="400"):
        raw(emulator, "POST", "/sandbox/sm/recover")
    client.delete(client.get("sm"))  # delete is allowed from error


def test_error_mapping(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    with pytest.raises(DaytonaNotFoundError):
        client.get("missing")
    bad = emulator.client(api_key="wrong-key")
    with pytest.raises(DaytonaAuthenticationError):
        bad.get("missing")
    with pytest.raises(DaytonaAuthenticationError):
        list(bad.list())
    client.create(CreateSandboxFromSnapshotParams(name="dup"), timeout=10)
    with pytest.raises(DaytonaConflictError):
        client.create(CreateSandboxFromSnapshotParams(name="dup"), timeout=10)


def test_unauthorized_envelope_and_socketio(emulator: EmulatorProcess) -> None:
    import json
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(emulator.api_url + "/sandbox", timeout=5)
    assert info.value.code == 401
    assert info.value.headers["Content-Type"].startswith("application/json")
    body = json.loads(info.value.read())
    assert body["statusCode"] == 401 and body["path"] == "/api/sandbox"
    assert {"message", "error", "timestamp"} <= set(body)
    started = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as socket_info:
        urllib.request.urlopen(emulator.api_url + "/socket.io/?EIO=4&transport=websocket", timeout=5)
    assert socket_info.value.code == 404 and time.monotonic() - started < 1


def test_quota_is_a_bad_request(emulator: EmulatorProcess) -> None:
    emulator.set_faults(quota=1)
    client = emulator.client()
    first = client.create(timeout=10)
    with pytest.raises(DaytonaBadRequestError, match=r"Total sandbox limit exceeded. Maximum allowed: 1\."):
        client.create(timeout=10)
    client.delete(first)
    client.create(timeout=10)  # the quota counts live sandboxes only


def test_injected_sandbox_error_and_stuck_starting(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    emulator.set_faults(sandbox_error={"create": 1.0}, error_recoverable=True)
    with pytest.raises(DaytonaBadRequestError, match="Sandbox failed to start: injected fault"):
        client.create(CreateSandboxFromSnapshotParams(name="broken"), timeout=10)
    broken = client.get("broken")
    assert broken.state == SandboxState.ERROR and broken.recoverable
    emulator.replace_faults(stuck_starting={"recover": 1.0})
    assert raw(emulator, "POST", "/sandbox/broken/recover")["state"] == "starting"
    time.sleep(0.3)
    assert client.get("broken").state == SandboxState.STARTING
    with pytest.raises(DaytonaConflictError):
        client.delete(client.get("broken"))


def test_restart_persistence(emulator: EmulatorProcess) -> None:
    client = emulator.client()
    kept = client.create(CreateSandboxFromSnapshotParams(name="keep", labels={"k": "v"}), timeout=10)
    kept.fs.upload_file(b"persisted", "note.txt")
    stopped = client.create(CreateSandboxFromSnapshotParams(name="stopped"), timeout=10)
    stopped.stop(timeout=10)
    emulator.set_faults(transition_latency={"create": 0.5})
    raw(emulator, "POST", "/sandbox", {"name": "mid-create", "env": {}, "labels": {}})

    emulator.restart(kill=True)  # a crash
    again = client.get("keep")
    assert again.id == kept.id and again.labels["k"] == "v"
    assert again.fs.download_file("note.txt") == b"persisted"
    assert client.get("stopped").state == SandboxState.STOPPED
    time.sleep(0.6)
    assert client.get("mid-create").state == SandboxState.STARTED  # finished after the restart
    stats = emulator.stats()  # counters start again with the process
    assert (stats["get"], stats["download"], stats["create"]) == (3, 1, 0)
    emulator.restart()
    assert sorted(s.name for s in client.list()) == ["keep", "mid-create", "stopped"]
