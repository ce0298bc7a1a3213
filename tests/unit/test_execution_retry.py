"""Retries of what never started, ``unknown`` for what may have, per-lease ordering and re-attaching
to session commands (controller.execution), with the in-memory provider's sessions and an injected
clock, on SQLite and PostgreSQL. The end-to-end versions run against the local Daytona API in
tests/integration/test_execution_sessions.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from controller.config import ExecSettings
from controller.db import Database
from controller.errors import (
    AuthError,
    CapacityError,
    ConflictError,
    NotFoundError,
    NotSentError,
    PermanentError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from controller.execution import Dispatcher, enqueue, may_have_started, retry_delay
from controller.providers.base import ExecResult
from controller.providers.memory import MemoryProvider
from models import Event, Execution, Lease, LeaseStatus

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
SECRET = "s3cr3t-value-do-not-leak"


def _status(error: ProviderError, status: int | None) -> ProviderError:
    error.status = status
    return error


@pytest.mark.parametrize(
    ("error", "started"),
    [
        (NotSentError("connection refused"), False),
        (RateLimitedError("429", 1.0), False),
        (_status(RateLimitedError("429"), 429), False),
        (_status(PermanentError("400 bad"), 400), False),
        (_status(TransientError("401"), 401), False),
        (_status(TransientError("403"), 403), False),
        (_status(AuthError("401"), 401), False),
        (AuthError("credentials refused"), False),  # no status (the in-memory provider)
        (_status(NotFoundError("404"), 404), False),
        (NotFoundError("no such sandbox"), False),
        (PermanentError("refused"), False),
        (ConflictError("sandbox is stopped"), False),
        (CapacityError("no runners"), False),
        (_status(TransientError("408"), 408), True),
        (_status(TransientError("500"), 500), True),
        (_status(TransientError("503"), 503), True),
        (_status(TransientError("504"), 504), True),
        (TransientError("read timed out"), True),
        (TransientError("connection reset"), True),
    ],
)
def test_which_failures_may_have_started_the_command(error: ProviderError, started: bool) -> None:
    assert may_have_started(error) is started


def test_retry_delay_doubles_up_to_the_cap_and_honours_retry_after() -> None:
    assert [retry_delay(n, base=1, cap=5) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
    assert retry_delay(1, base=1, cap=5, jitter=0.0) == 0.5
    assert retry_delay(1, base=1, cap=5, retry_after=7) == 7


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def provider() -> MemoryProvider:
    memory = MemoryProvider(exec_hook=lambda _s, command, *_: ExecResult(0, f"ran {len(command)}\n"))
    memory.add_sandbox("box-sb", {}, sandbox_id="sb-1")
    return memory


def settings(**overrides: Any) -> ExecSettings:
    values: dict[str, Any] = {
        "queue_wait_seconds": 60,
        "retry_backoff_seconds": 2,
        "retry_backoff_max_seconds": 10,
        "session_min_timeout_seconds": 0,  # every command in a session
        "log_poll_seconds": 0.01,
    }
    values.update(overrides)
    return ExecSettings.model_validate(values)


@pytest.fixture
def ready(db: Database) -> str:
    with db.session() as session:
        session.add(Lease(name="box", desired_state="running"))
        session.add(LeaseStatus(lease_name="box", phase="Ready", sandbox_id="sb-1", workspace_path="/w"))
    return "box"


@pytest.fixture
def disp(db: Database, provider: MemoryProvider, clock: Clock) -> Iterator[Dispatcher]:
    d = Dispatcher(db, provider, settings(), worker_id="test-host:1:a", clock=clock)
    yield d
    d.shutdown()


def row(db: Database, execution_id: int) -> Execution:
    with db.session() as session:
        found = session.get(Execution, execution_id)
        assert found is not None
        session.expunge(found)
        return found


def test_a_command_that_never_started_is_retried_after_its_back_off_with_secrets_kept(
    db: Database, provider: MemoryProvider, disp: Dispatcher, clock: Clock, ready: str
) -> None:
    provider.fail_next("session_create", RateLimitedError("429 on the toolbox", 3.0))
    execution_id = enqueue(db, lease_name=ready, command="make test", env={"TOKEN": SECRET}, stdin=b"in")
    assert disp.drain() == 1
    r = row(db, execution_id)
    assert (r.state, r.attempts, r.claimed_by, r.session_id) == ("queued", 1, None, None)
    assert r.next_attempt_at == T0 + timedelta(seconds=3)  # Retry-After beats the 1-2 s back-off
    assert r.attempt_log is not None and "429 on the toolbox" in r.attempt_log[0]["reason"]
    assert r.env == {"TOKEN": SECRET} and r.stdin == b"in"  # the next attempt needs them
    assert disp.drain() == 0  # backing off
    clock.now += timedelta(seconds=3)
    assert disp.drain() == 1
    r = row(db, execution_id)
    assert (r.state, r.exit_code, r.attempts, r.env, r.stdin) == ("succeeded", 0, 1, None, None)
    assert r.output is not None and r.output.startswith("ran ")
    with db.session() as session:
        outcomes = session.scalars(sa.select(Event.outcome).order_by(Event.id)).all()
        messages = " ".join(session.scalars(sa.select(Event.message)).all())
    assert outcomes == ["retry", "succeeded"] and SECRET not in messages


def test_retries_end_in_error_when_the_window_is_over(
    db: Database, provider: MemoryProvider, disp: Dispatcher, clock: Clock, ready: str
) -> None:
    provider.fail_next("session_create", NotSentError("connection refused"), times=100)
    execution_id = enqueue(db, lease_name=ready, command="true", env={"TOKEN": SECRET})
    for _ in range(40):
        disp.drain()
        if row(db, execution_id).state != "queued":
            break
        clock.now += timedelta(seconds=10)
    r = row(db, execution_id)
    assert r.state == "error" and r.error is not None
    assert r.error.startswith("not started after") and "it never ran" in r.error
    assert r.attempts > 3 and r.attempt_log is not None and len(r.attempt_log) == r.attempts
    assert r.finished_at is not None and r.finished_at <= T0 + timedelta(seconds=70)
    assert (r.env, r.stdin) == (None, None)
    assert not any(sb.sessions for sb in provider.sandboxes.values())


def test_a_command_that_may_have_started_ends_unknown_and_is_not_retried(
    db: Database, provider: MemoryProvider, disp: Dispatcher, ready: str
) -> None:
    provider.fail_next("session_execute", TransientError("read timed out"), after_effect=True)
    execution_id = enqueue(db, lease_name=ready, command="deploy")
    disp.drain()
    disp.drain()
    r = row(db, execution_id)
    assert (r.state, r.attempts) == ("unknown", 0)
    assert r.error is not None and "may or may not have run" in r.error
    ran = [c for sb in provider.sandboxes.values() for s in sb.sessions.values() for c in s.values()]
    assert len(ran) == 1  # it did run, once


def test_rows_of_one_lease_run_one_at_a_time_in_order_unless_they_opt_out(
    db: Database, provider: MemoryProvider, disp: Dispatcher, ready: str
) -> None:
    provider.hold_session_commands = True
    first = enqueue(db, lease_name=ready, command="one")
    second = enqueue(db, lease_name=ready, command="two")
    free = enqueue(db, lease_name=ready, command="free", ordered=False)
    assert disp.run_once(wait=False) == 2  # the first and the unordered one
    assert [row(db, i).state for i in (first, second, free)] == ["running", "queued", "running"]
    assert disp.run_once(wait=False) == 0  # the second waits for the first
    provider.finish_commands()
    disp.drain()
    assert [row(db, i).state for i in (first, second, free)] == ["succeeded"] * 3


def test_a_session_command_of_a_gone_worker_is_re_attached_and_completed(
    db: Database, provider: MemoryProvider, clock: Clock, ready: str
) -> None:
    provider.hold_session_commands = True
    execution_id = enqueue(db, lease_name=ready, command="long job")
    first = Dispatcher(db, provider, settings(), worker_id="test-host:1:first", clock=clock)
    first.run_once(wait=False)
    assert first.shutdown(timeout=10)  # hands the running command over instead of waiting
    r = row(db, execution_id)
    assert r.state == "running" and r.claimed_by == "detached:test-host:1:first"
    assert r.session_id and r.command_id
    provider.finish_commands()
    second = Dispatcher(db, provider, settings(), worker_id="test-host:1:second", clock=clock)
    try:
        assert second.drain() >= 1
    finally:
        second.shutdown()
    r = row(db, execution_id)
    assert (r.state, r.exit_code, r.claimed_by) == ("succeeded", 0, "test-host:1:second")
    assert r.output is not None and r.output.startswith("ran ")
    with db.session() as session:
        assert "reattached" in session.scalars(sa.select(Event.outcome)).all()


def test_a_gone_worker_without_a_command_id_leaves_an_unknown_row(
    db: Database, provider: MemoryProvider, clock: Clock, ready: str
) -> None:
    execution_id = enqueue(db, lease_name=ready, command="job")
    with db.session() as session:
        session.execute(
            sa.update(Execution)
            .where(Execution.id == execution_id)
            .values(state="running", claimed_by="detached:x:1:y", started_at=T0, session_id="s-1")
        )
    d = Dispatcher(db, provider, settings(), worker_id="test-host:1:b", clock=clock)
    try:
        d.recover_interrupted()
    finally:
        d.shutdown()
    r = row(db, execution_id)
    assert r.state == "unknown" and r.error is not None and "s-1" in r.error


def test_a_session_command_whose_sandbox_stopped_ends_interrupted(
    db: Database, provider: MemoryProvider, clock: Clock, ready: str
) -> None:
    provider.hold_session_commands = True
    execution_id = enqueue(db, lease_name=ready, command="long job")
    d = Dispatcher(db, provider, settings(), worker_id="test-host:1:a", clock=clock)
    try:
        d.run_once(wait=False)
        deadline = 200
        while not row(db, execution_id).command_id and deadline:
            deadline -= 1
            threading.Event().wait(0.01)
        provider.set_state("sb-1", "stopped")  # its sessions die with it
        d.drain()
    finally:
        d.shutdown()
    r = row(db, execution_id)
    assert r.state == "interrupted" and r.error is not None and "is stopped" in r.error


def test_the_queue_retries_refused_credentials_and_says_which_key(
    db: Database,
    provider: MemoryProvider,
    disp: Dispatcher,
    clock: Clock,
    ready: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The daemon's organization can be fixed while it runs: a 401/403 is retried in the row's
    window (not failed at once, as ``leasectl exec`` does), each time with a warning naming the key."""
    provider.fail_next("session_create", _status(AuthError("get sandbox sb-1: HTTP 401: Unauthorized"), 401))
    execution_id = enqueue(db, lease_name=ready, command="true")
    with caplog.at_level("WARNING", logger="controller.execution"):
        assert disp.drain() == 1
    r = row(db, execution_id)
    assert (r.state, r.attempts) == ("queued", 1)
    [warning] = [rec for rec in caplog.records if "refused the credentials" in rec.getMessage()]
    assert "DAYTONA_API_KEY" in warning.getMessage() and "HTTP 401" in warning.getMessage()
    clock.now += timedelta(seconds=10)
    assert disp.drain() == 1
    assert row(db, execution_id).state == "succeeded"
