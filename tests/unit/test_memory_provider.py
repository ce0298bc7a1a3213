"""The in-memory provider (controller.providers.memory): lifecycle, uniqueness and the fault hooks."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pytest

from controller.errors import (
    CapacityError,
    ConflictError,
    NotFoundError,
    PermanentError,
    RateLimitedError,
    StartFailedError,
    StateConflictError,
    TransientError,
)
from controller.providers.base import CreateRequest, ExecResult, SandboxProvider
from controller.providers.memory import MemoryProvider

LABELS = {"leasectl-instance": "t", "leasectl-lease": "web", "leasectl-spec": "s1"}


def req(name: str = "t-web", **labels: str) -> CreateRequest:
    return CreateRequest(name=name, labels={**LABELS, **labels}, snapshot="base", cpu=2)


def test_is_a_sandbox_provider() -> None:
    assert isinstance(MemoryProvider(), SandboxProvider)


def test_lifecycle_and_call_log() -> None:
    p = MemoryProvider()
    sb = p.create(req())
    assert (sb.state, sb.labels["leasectl-lease"], sb.cpu, sb.snapshot) == ("started", "web", 2, "base")
    p.stop(sb.id)
    assert p.sandboxes[sb.id].state == "stopped"
    p.archive(sb.id)
    assert p.sandboxes[sb.id].state == "archived"
    p.start(sb.id)
    assert p.sandboxes[sb.id].state == "started"
    p.start(sb.id)  # already started: a no-op, as on Daytona
    p.stop(sb.id)
    with pytest.raises(StateConflictError, match="not in a stoppable state"):
        p.stop(sb.id)  # a repeat is refused, as on Daytona
    with pytest.raises(ConflictError):
        p.recover(sb.id)
    p.delete(sb.id)
    p.delete(sb.id)  # gone: not an error
    assert sb.id not in p.sandboxes and sb.id in p.graveyard
    assert p.calls == [
        ("create", "t-web"),
        ("stop", sb.id),
        ("archive", sb.id),
        ("start", sb.id),
        ("start", sb.id),
        ("stop", sb.id),
        ("stop", sb.id),
        ("recover", sb.id),
        ("delete", sb.id),
        ("delete", sb.id),
    ]
    assert p.counters["stop"] == 3


def test_names_are_unique_and_get_works_by_id_or_name() -> None:
    p = MemoryProvider()
    sb = p.create(req())
    with pytest.raises(ConflictError):
        p.create(req())
    assert p.get(sb.id) == p.get("t-web") == sb
    assert p.get("nope") is None
    p.delete(sb.id)
    assert p.create(req()).id != sb.id  # the name is free again


def test_list_filters_by_labels() -> None:
    p = MemoryProvider()
    a = p.create(req("a"))
    p.create(req("b", **{"leasectl-instance": "other"}))
    p.add_sandbox("c", {"team": "x"})
    assert [s.id for s in p.list_sandboxes({"leasectl-instance": "t"})] == [a.id]
    assert len(p.list_sandboxes({})) == 3


def test_list_lag_hides_new_and_shows_deleted() -> None:
    p = MemoryProvider(list_lag=5)
    sb = p.create(req())
    assert p.list_sandboxes({}) == []
    assert p.get(sb.id) is not None  # get is consistent
    p.advance(5)
    assert [s.id for s in p.list_sandboxes({})] == [sb.id]
    p.stop(sb.id)
    p.delete(sb.id)
    assert [s.state for s in p.list_sandboxes({})] == ["started"]  # stale: as it was 5 s ago
    p.advance(5)
    assert p.list_sandboxes({}) == []


def test_injectable_clock() -> None:
    now = [100.0]
    p = MemoryProvider(clock=lambda: now[0], list_lag=1)
    p.create(req())
    assert p.list_sandboxes({}) == []
    now[0] += 1
    assert len(p.list_sandboxes({})) == 1


@pytest.mark.parametrize(
    "error",
    [
        TransientError("5xx"),
        RateLimitedError("429", retry_after=3),
        PermanentError("400"),
        NotFoundError("x"),
    ],
)
def test_fail_next_raises_before_the_effect(error: Exception) -> None:
    p = MemoryProvider()
    p.fail_next("create", error, times=2)
    for _ in range(2):
        with pytest.raises(type(error)):
            p.create(req())
    assert p.sandboxes == {}
    p.create(req())
    assert len(p.sandboxes) == 1
    assert p.counters["create"] == 3


def test_fail_next_after_effect_loses_the_answer() -> None:
    p = MemoryProvider()
    p.fail_next("create", lambda: TransientError("timed out"), after_effect=True)
    with pytest.raises(TransientError):
        p.create(req())
    assert [s.name for s in p.sandboxes.values()] == ["t-web"]


def test_fail_next_any_operation() -> None:
    p = MemoryProvider()
    p.fail_next("*", RateLimitedError("slow down", retry_after=1))
    with pytest.raises(RateLimitedError):
        p.list_sandboxes({})
    assert p.list_sandboxes({}) == []
    with pytest.raises(ValueError):
        p.fail_next("explode", TransientError("x"))


def test_scripted_create_states() -> None:
    p = MemoryProvider()
    p.script_create("build_failed", reason="bad image")
    p.script_create("error", reason="no runner", recoverable=True)
    p.create_waits = False  # answer with the sandbox as created, not the server's late 400
    a, b, c = p.create(req("a")), p.create(req("b")), p.create(req("c"))
    assert (a.state, a.error_reason) == ("build_failed", "bad image")
    assert (b.state, b.recoverable) == ("error", True)
    assert c.state == "started"
    p.recover(b.id)
    assert p.sandboxes[b.id].state == "started" and p.sandboxes[b.id].error_reason is None


def test_stuck_transitions_conflict_until_released() -> None:
    p = MemoryProvider()
    sb = p.create(req())
    p.stick_next("stop", "stopping")
    p.stop(sb.id)
    assert p.sandboxes[sb.id].state == "stopping"
    with pytest.raises(ConflictError):
        p.start(sb.id)
    p.release(sb.id)
    assert p.sandboxes[sb.id].state == "stopped"
    p.stick(sb.id, "resizing")
    assert p.get(sb.id).state == "resizing"  # type: ignore[union-attr]
    p.release(sb.id)
    assert p.sandboxes[sb.id].state == "stopped"
    p.stick_next("delete", "destroying")
    p.delete(sb.id)
    assert p.get(sb.id).state == "destroying"  # type: ignore[union-attr]
    p.release(sb.id)
    assert p.get(sb.id) is None


def test_out_of_band_changes_are_not_logged() -> None:
    p = MemoryProvider()
    sb = p.create(req())
    p.fall_into_error(sb.id, recoverable=False, reason="oom")
    assert (p.sandboxes[sb.id].state, p.sandboxes[sb.id].error_reason) == ("error", "oom")
    with pytest.raises(ConflictError):
        p.recover(sb.id)
    p.set_state(sb.id, "stopped")
    p.remove(sb.id)
    assert p.get(sb.id) is None
    assert p.find_any(sb.id) is not None and p.find_any("t-web") is not None
    assert [op for op, _ in p.calls] == ["create", "recover", "get"]
    with pytest.raises(NotFoundError):
        p.start(sb.id)


def test_exec_files_and_dirs() -> None:
    seen: list[tuple[str, str | None, Mapping[str, str] | None]] = []

    def hook(
        sid: str, cmd: str, cwd: str | None, env: Mapping[str, str] | None, timeout: int | None
    ) -> ExecResult:
        seen.append((cmd, cwd, env))
        return ExecResult(3, "out")

    p = MemoryProvider(work_dir="/w")
    sb = p.create(req())
    assert p.exec(sb.id, "echo hi") == ExecResult(0, "echo hi")
    p.exec_hook = hook
    assert p.exec(sb.id, "x", cwd="/tmp", env={"A": "1"}) == ExecResult(3, "out")
    assert seen == [("x", "/tmp", {"A": "1"})]
    assert p.work_dir(sb.id) == "/w"
    p.make_dir(sb.id, "/w/workspace")
    p.upload(sb.id, "/tmp/in", b"data")
    assert p.sandboxes[sb.id].files == {"/tmp/in": b"data"}
    assert p.sandboxes[sb.id].dirs == {"/w/workspace"}
    p.delete_file(sb.id, "/tmp/in")
    p.delete_file(sb.id, "/tmp/in")
    assert p.sandboxes[sb.id].files == {}
    p.stop(sb.id)
    with pytest.raises(ConflictError):
        p.exec(sb.id, "x")


def test_thread_safe_creates() -> None:
    p = MemoryProvider()
    errors: list[Exception] = []

    def worker(i: int) -> None:
        for j in range(50):
            try:
                p.create(req(f"n-{j}"))  # every thread races for the same 50 names
            except ConflictError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(p.sandboxes) == 50
    assert len(errors) == 7 * 50
    assert len({s.id for s in p.sandboxes.values()}) == 50


def test_on_call_runs_outside_the_lock() -> None:
    p = MemoryProvider()
    inside: list[str] = []

    def on_call(op: str, key: str) -> None:
        # another thread can use the provider while this call is held here
        t = threading.Thread(target=lambda: inside.append(str(len(p.list_sandboxes({})))))
        if op == "create":
            t.start()
            t.join(timeout=5)

    p.on_call = on_call
    p.create(req())
    assert inside == ["0"]


def test_follows_the_server_on_quota_late_failures_ephemeral_and_lagging_states() -> None:
    p = MemoryProvider(list_lag=5)
    p.quota = 1
    first = p.create(req())
    with pytest.raises(CapacityError, match="limit exceeded"):
        p.create(CreateRequest(name="t-other", labels={"leasectl-lease": "other"}))
    p.quota = None
    p.script_create("error", reason="image pull failed")
    with pytest.raises(StartFailedError, match="failed to start"):
        p.create(CreateRequest(name="t-late", labels={"leasectl-lease": "late"}))
    assert p.get("t-late") is not None  # the errored sandbox stays
    with pytest.raises(StateConflictError, match="errored state"):
        p.start("t-late")
    ephemeral = p.create(CreateRequest(name="t-eph", labels={}, auto_delete_interval=0))
    with pytest.raises(PermanentError):
        p.archive(ephemeral.id)
    p.stop(ephemeral.id)
    assert p.get(ephemeral.id) is None  # stop deleted it
    p.advance(10)
    p.stop(first.id)
    listed = {sb.id: sb.state for sb in p.list_sandboxes({})}
    assert listed[first.id] == "started"  # the list still shows the state of 5 s ago
    get = p.get(first.id)
    assert get is not None and get.state == "stopped"
    p.advance(6)
    assert {sb.id: sb.state for sb in p.list_sandboxes({})}[first.id] == "stopped"
