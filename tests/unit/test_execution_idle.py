"""Commands on Idle leases (auto-stopped by Daytona on purpose): exec and the queue start the sandbox
on demand and run the command once it is started. Memory provider; SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from controller.db import Database
from controller.errors import TransientError
from controller.execution import Dispatcher, LeaseNotReadyError, enqueue, execute_now, wake
from controller.planner import ownership_labels
from controller.providers.base import ExecResult
from controller.providers.memory import MemoryProvider
from models import Execution, Lease, LeaseStatus
from tests.unit.test_execution import settings


def idle_lease(db: Database, provider: MemoryProvider, state: str = "stopped") -> str:
    sb = provider.add_sandbox("sb-idle", ownership_labels("default", "box", "s"), state)
    with db.session() as session:
        session.add(Lease(name="box", desired_state="running", auto_stop_interval=15))
        session.add(
            LeaseStatus(lease_name="box", phase="Idle", sandbox_id=sb.id, workspace_path="/home/daytona/w")
        )
    return sb.id


def echo(_sid: str, command: str, *_: object) -> ExecResult:
    return ExecResult(0, "ran")


def test_exec_starts_an_idle_sandbox_then_runs(db: Database) -> None:
    provider = MemoryProvider(exec_hook=echo)
    sid = idle_lease(db, provider)
    _, outcome = execute_now(db, provider, settings(), lease_name="box", command="true")
    assert outcome.state == "succeeded" and outcome.output == "ran"
    assert provider.sandboxes[sid].state == "started"
    ops = [op for op, _ in provider.calls]
    assert ops.index("start") < ops.index("exec")


def test_archived_idle_sandbox_is_restored_too(db: Database) -> None:
    provider = MemoryProvider(exec_hook=echo)
    sid = idle_lease(db, provider, "archived")
    execute_now(db, provider, settings(), lease_name="box", command="true")
    assert provider.sandboxes[sid].state == "started"


def test_queue_starts_an_idle_sandbox_then_runs(db: Database) -> None:
    provider = MemoryProvider(exec_hook=echo)
    sid = idle_lease(db, provider)
    execution_id = enqueue(db, lease_name="box", command="true")
    disp = Dispatcher(db, provider, settings(), worker_id="test-host:1:w")
    try:
        assert disp.run_once() == 1
    finally:
        disp.shutdown(timeout=10)
    with db.session() as session:
        row = session.get(Execution, execution_id)
        assert row is not None and row.state == "succeeded"
    assert provider.sandboxes[sid].state == "started"


def test_an_idle_sandbox_that_cannot_start_ends_the_row_in_error(db: Database) -> None:
    provider = MemoryProvider(exec_hook=echo)
    sid = idle_lease(db, provider)
    provider.fail_next("start", TransientError("Total disk limit exceeded"))
    with pytest.raises(LeaseNotReadyError, match="could not start idle sandbox"):
        execute_now(db, provider, settings(), lease_name="box", command="true")
    assert provider.sandboxes[sid].state == "stopped"
    assert "exec" not in provider.counters


def test_wake_waits_for_a_slow_start_and_gives_up_at_the_timeout() -> None:
    provider = MemoryProvider()
    sb = provider.add_sandbox("x", {}, "stopped")
    provider.stick_next("start", "starting")
    ticks: list[float] = []
    clock = [0.0]

    def sleep(seconds: float) -> None:
        ticks.append(seconds)
        clock[0] += seconds
        if len(ticks) == 3:
            provider.release(sb.id)

    wake(provider, sb.id, timeout_seconds=60, sleep=sleep, monotonic=lambda: clock[0])
    assert provider.sandboxes[sb.id].state == "started" and len(ticks) == 3

    provider.set_state(sb.id, "stopped")
    provider.stick_next("start", "starting")
    with pytest.raises(LeaseNotReadyError, match="not started within 2 s"):
        wake(provider, sb.id, timeout_seconds=2, sleep=sleep, monotonic=lambda: clock[0])
