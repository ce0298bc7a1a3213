"""The execution runner and queue (controller.execution) on SQLite and PostgreSQL, with an in-memory
provider: claims, waiting, errors, interrupted rows, output cap, and no secret left behind."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from controller.config import ExecSettings
from controller.db import Database
from controller.errors import AuthError, NotSentError, TransientError
from controller.execution import (
    EXIT_TIMED_OUT,
    CommandOutcome,
    Dispatcher,
    Finished,
    InvalidCommandError,
    LeaseNotReadyError,
    cap_output,
    enqueue,
    execute_now,
    finish,
    finish_many,
    run_command,
)
from controller.providers.base import ExecResult
from models import Event, Execution, Lease, LeaseStatus

SECRET = "s3cr3t-value-do-not-leak"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class ExecFakeProvider:
    """Just the toolbox part of SandboxProvider: files in a dict, a call log and an exec hook."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.on_exec: Callable[[str, str], ExecResult] = lambda _s, _c: ExecResult(exit_code=0, output="")
        self._lock = threading.Lock()

    @property
    def exec_calls(self) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == "exec"]

    def exec(
        self,
        sandbox_id: str,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: int | None = None,
    ) -> ExecResult:
        with self._lock:
            self.calls.append(("exec", sandbox_id, command, timeout))
        return self.on_exec(sandbox_id, command)

    def upload(self, sandbox_id: str, path: str, data: bytes) -> None:
        with self._lock:
            self.calls.append(("upload", sandbox_id, path))
            self.files[path] = data

    def delete_file(self, sandbox_id: str, path: str) -> None:
        with self._lock:
            self.calls.append(("delete_file", sandbox_id, path))
            self.files.pop(path, None)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"execution must not call provider.{name}")


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def provider() -> ExecFakeProvider:
    return ExecFakeProvider()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def settings(**overrides: object) -> ExecSettings:
    # This fake only does one-request exec: pin that path (sessions have their own tests).
    values: dict[str, object] = {
        "max_output_bytes": 1024,
        "queue_wait_seconds": 60,
        "max_concurrent": 2,
        "session_min_timeout_seconds": 100_000,
    }
    values.update(overrides)
    return ExecSettings.model_validate(values)


def add_lease(
    db: Database,
    name: str = "box",
    *,
    desired: str = "running",
    phase: str = "Ready",
    sandbox_id: str | None = "sb-1",
    workspace: str | None = "/home/daytona/workspace",
) -> None:
    with db.session() as session:
        session.add(Lease(name=name, desired_state=desired))
        session.add(
            LeaseStatus(lease_name=name, phase=phase, sandbox_id=sandbox_id, workspace_path=workspace)
        )


def insert_sql(db: Database, lease: str, command: str, created_at: datetime | None = None) -> int:
    """A row as an operator inserts it: just the lease and the command (and maybe a time)."""
    with db.session() as session:
        if created_at is None:
            session.execute(
                sa.text("INSERT INTO executions (lease_name, command) VALUES (:l, :c)"),
                {"l": lease, "c": command},
            )
        else:
            session.add(Execution(lease_name=lease, command=command, created_at=created_at))
        return int(session.scalar(sa.select(sa.func.max(Execution.id))) or 0)


def row(db: Database, execution_id: int) -> Execution:
    with db.session() as session:
        found = session.get(Execution, execution_id)
        assert found is not None
        return found


def raw_secrets(db: Database) -> list[tuple[object, ...]]:
    with db.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.text("SELECT id, env, stdin FROM executions WHERE env IS NOT NULL OR stdin IS NOT NULL")
            )
        ]


def dispatcher(
    db: Database, provider: ExecFakeProvider, clock: Callable[[], datetime], **overrides: object
) -> Dispatcher:
    return Dispatcher(db, provider, settings(**overrides), worker_id="test-host:1:worker-a", clock=clock)


@pytest.fixture
def disp(db: Database, provider: ExecFakeProvider, clock: Clock) -> Iterator[Dispatcher]:
    d = dispatcher(db, provider, clock)
    yield d
    d.shutdown(timeout=10)


# -- run_command ---------------------------------------------------------------------------------


def test_cap_output_cuts_on_a_character_boundary() -> None:
    text = "a" + "é" * 10  # 1 + 20 bytes
    assert cap_output(text, 100) == (text, False)
    assert cap_output(text, 4) == ("aé", True)  # 'a' + 'é' = 3 bytes; the next 'é' would be cut
    assert cap_output("€€", 5) == ("€", True)
    assert cap_output("€€", 6) == ("€€", False)
    assert cap_output("x", None) == ("x", False)


def test_invalid_env_is_refused_before_anything_runs(provider: ExecFakeProvider) -> None:
    with pytest.raises(InvalidCommandError):
        run_command(provider, "sb-1", "true", env={"BAD-KEY": SECRET}, stdin=b"x", timeout_seconds=5)
    assert provider.calls == []


def test_stdin_file_is_uploaded_then_removed(provider: ExecFakeProvider) -> None:
    seen: dict[str, bytes] = {}

    def hook(sandbox_id: str, command: str) -> ExecResult:
        seen.update(provider.files)
        return ExecResult(exit_code=3, output="out")

    provider.on_exec = hook
    outcome = run_command(provider, "sb-1", "cat", stdin=b"\x00\xffdata", timeout_seconds=5)
    assert outcome == CommandOutcome(state="failed", exit_code=3, output="out")
    [(path, data)] = seen.items()
    assert path.startswith("/tmp/leasectl-stdin-") and data == b"\x00\xffdata"
    assert path in provider.calls[1][2]  # the script reads the uploaded file
    assert provider.files == {}


def test_stdin_file_is_removed_when_exec_fails(provider: ExecFakeProvider) -> None:
    def hook(sandbox_id: str, command: str) -> ExecResult:
        raise TransientError(f"toolbox down while running {command[:20]}")

    provider.on_exec = hook
    outcome = run_command(provider, "sb-1", "cat", stdin=b"data", timeout_seconds=5)
    assert outcome.state == "unknown" and outcome.exit_code is None
    assert outcome.error is not None and "TransientError" in outcome.error
    assert provider.files == {}
    assert [c[0] for c in provider.calls] == ["upload", "exec", "delete_file"]


def test_timeout_and_exit_codes(provider: ExecFakeProvider) -> None:
    provider.on_exec = lambda _s, _c: ExecResult(exit_code=None, output="partial", timed_out=True)
    outcome = run_command(provider, "sb-1", "sleep 100", timeout_seconds=2)
    assert outcome.state == "timed_out" and outcome.exit_code is None
    assert outcome.cli_exit_code == EXIT_TIMED_OUT and outcome.output == "partial"
    assert provider.calls[0][3] == 2  # the time-out reached the provider
    provider.on_exec = lambda _s, _c: ExecResult(exit_code=0, output="")
    assert run_command(provider, "sb-1", "true", timeout_seconds=2).cli_exit_code == 0
    provider.on_exec = lambda _s, _c: ExecResult(exit_code=42, output="")
    assert run_command(provider, "sb-1", "false", timeout_seconds=2).cli_exit_code == 42


def test_provider_error_message_never_carries_an_env_value(provider: ExecFakeProvider) -> None:
    def hook(sandbox_id: str, command: str) -> ExecResult:
        raise TransientError(f"bad request: {command}")  # an API that echoes the request

    provider.on_exec = hook
    outcome = run_command(provider, "sb-1", "env", env={"TOKEN": SECRET}, timeout_seconds=5)
    assert outcome.state == "unknown"  # sent, no answer: it may have run
    assert outcome.error is not None and SECRET not in outcome.error


# -- direct runs ---------------------------------------------------------------------------------


def test_execute_now_records_a_finished_row(db: Database, provider: ExecFakeProvider) -> None:
    add_lease(db)
    provider.on_exec = lambda _s, _c: ExecResult(exit_code=7, output="x" * 5000)
    execution_id, outcome = execute_now(
        db, provider, settings(), lease_name="box", command="exit 7", env={"TOKEN": SECRET}, stdin=b"in"
    )
    assert outcome.exit_code == 7 and len(outcome.output) == 5000  # the caller gets all of it
    r = row(db, execution_id)
    assert (r.state, r.exit_code, r.output_truncated) == ("failed", 7, True)
    assert r.output == "x" * 1024 and r.sandbox_id == "sb-1" and r.claimed_by
    assert r.started_at is not None and r.finished_at is not None
    assert r.env is None and r.stdin is None
    assert provider.files == {}


@pytest.mark.parametrize(
    ("desired", "phase", "message"),
    [("stopped", "Stopped", "not desired running"), ("running", "Provisioning", "not Ready")],
)
def test_execute_now_refuses_a_lease_that_is_not_ready(
    db: Database, provider: ExecFakeProvider, desired: str, phase: str, message: str
) -> None:
    add_lease(db, desired=desired, phase=phase)
    with pytest.raises(LeaseNotReadyError, match=message):
        execute_now(db, provider, settings(), lease_name="box", command="true")
    with pytest.raises(LeaseNotReadyError, match="no such lease"):
        execute_now(db, provider, settings(), lease_name="nope", command="true")
    assert provider.calls == []
    with db.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Execution)) == 0


def test_execute_now_does_not_leave_a_running_row_on_interrupt(
    db: Database, provider: ExecFakeProvider
) -> None:
    add_lease(db)

    def hook(sandbox_id: str, command: str) -> ExecResult:
        raise KeyboardInterrupt

    provider.on_exec = hook
    with pytest.raises(KeyboardInterrupt):
        execute_now(db, provider, settings(), lease_name="box", command="sleep 9")
    with db.session() as session:
        [r] = session.scalars(sa.select(Execution)).all()
    assert r.state == "interrupted"


def test_execute_now_stops_at_refused_credentials_and_says_which_key(
    db: Database, provider: ExecFakeProvider
) -> None:
    """A wrong key does not heal while a user waits: one attempt, no back-off, a row in ``error``
    whose message names the status and the setting, never the key."""
    add_lease(db)

    def refused(_s: str, _c: str) -> ExecResult:
        error = AuthError("exec not sent: get sandbox sb-1: HTTP 401: Unauthorized")
        error.status = 401
        raise error

    provider.on_exec = refused
    slept: list[float] = []
    execution_id, outcome = execute_now(
        db, provider, settings(queue_wait_seconds=300), lease_name="box", command="true", sleep=slept.append
    )
    assert len(provider.exec_calls) == 1 and slept == []
    assert outcome.state == "error" and outcome.cli_exit_code == 1
    assert outcome.error is not None
    assert "HTTP 401" in outcome.error and "DAYTONA_API_KEY" in outcome.error and "never ran" in outcome.error
    r = row(db, execution_id)
    assert (r.state, r.attempts, r.error) == ("error", 1, outcome.error)


def test_execute_now_still_retries_what_was_not_sent(db: Database, provider: ExecFakeProvider) -> None:
    add_lease(db)
    answers = iter([NotSentError("connection refused"), None])

    def flaky(_s: str, _c: str) -> ExecResult:
        error = next(answers)
        if error is not None:
            raise error
        return ExecResult(exit_code=0, output="ok")

    provider.on_exec = flaky
    slept: list[float] = []
    _, outcome = execute_now(db, provider, settings(), lease_name="box", command="true", sleep=slept.append)
    assert outcome.state == "succeeded" and len(provider.exec_calls) == 2 and len(slept) == 1


def test_execute_now_a_bug_propagates_and_ends_the_row_in_error(
    db: Database, provider: ExecFakeProvider
) -> None:
    add_lease(db)

    def bug(_s: str, _c: str) -> ExecResult:
        raise NameError(f"name 'sandbox' is not defined near {SECRET}")

    provider.on_exec = bug
    with pytest.raises(NameError):
        execute_now(db, provider, settings(), lease_name="box", command="true", env={"TOKEN": SECRET})
    with db.session() as session:
        [r] = session.scalars(sa.select(Execution)).all()
    assert r.state == "error" and r.error is not None and "NameError" in r.error
    assert SECRET not in r.error and len(provider.exec_calls) == 1


# -- the queue -----------------------------------------------------------------------------------


def test_sql_row_is_claimed_run_once_and_recorded(
    db: Database, provider: ExecFakeProvider, disp: Dispatcher
) -> None:
    add_lease(db)
    provider.on_exec = lambda _s, _c: ExecResult(exit_code=0, output="hello\n")
    execution_id = insert_sql(db, "box", "echo hello")
    assert disp.run_once() == 1
    assert disp.run_once() == 0
    r = row(db, execution_id)
    assert (r.state, r.exit_code, r.output, r.output_truncated) == ("succeeded", 0, "hello\n", False)
    assert r.claimed_by == disp.worker_id and r.sandbox_id == "sb-1"
    assert r.started_at is not None and r.finished_at is not None and r.error is None
    assert len(provider.exec_calls) == 1
    command = provider.exec_calls[0][1]
    assert "echo hello" in command
    with db.session() as session:
        [event] = session.scalars(sa.select(Event)).all()
    assert (event.action, event.outcome, event.lease_name) == ("exec", "succeeded", "box")


def test_claim_only_takes_rows_of_ready_leases_and_runs_within_the_limit(
    db: Database, provider: ExecFakeProvider, clock: Clock
) -> None:
    add_lease(db, "ready")
    add_lease(db, "starting", phase="Provisioning", sandbox_id=None)
    waiting = insert_sql(db, "starting", "true", created_at=T0)
    ids = [insert_sql(db, "ready", f"echo {i}", created_at=T0) for i in range(5)]
    d = dispatcher(db, provider, clock, max_concurrent=2, per_lease_concurrency=0)
    try:
        assert d.run_once() == 2  # two slots
        assert [row(db, i).state for i in ids] == ["succeeded"] * 2 + ["queued"] * 3
        assert d.drain() == 3
    finally:
        d.shutdown()
    assert all(row(db, i).state == "succeeded" for i in ids)
    assert row(db, waiting).state == "queued"
    assert len(provider.exec_calls) == 5


def test_cancelled_row_never_runs_and_loses_its_secrets(
    db: Database, provider: ExecFakeProvider, disp: Dispatcher
) -> None:
    add_lease(db)
    execution_id = enqueue(db, lease_name="box", command="rm -rf /", env={"TOKEN": SECRET}, stdin=b"x")
    with db.session() as session:
        session.execute(
            sa.text("UPDATE executions SET state = 'cancelled' WHERE id = :i"), {"i": execution_id}
        )
    assert disp.run_once() == 0
    assert provider.calls == []
    assert row(db, execution_id).state == "cancelled"
    assert raw_secrets(db) == []


def test_env_and_stdin_are_cleared_once_claimed_and_at_the_end(
    db: Database, provider: ExecFakeProvider, disp: Dispatcher
) -> None:
    add_lease(db)
    seen: list[list[tuple[object, ...]]] = []

    def hook(sandbox_id: str, command: str) -> ExecResult:
        seen.append(raw_secrets(db))
        return ExecResult(exit_code=0, output="ok")

    provider.on_exec = hook
    execution_id = enqueue(db, lease_name="box", command="env", env={"TOKEN": SECRET}, stdin=b"data")
    assert raw_secrets(db) != []
    disp.run_once()
    assert seen == [[]]  # already gone while the command ran
    assert raw_secrets(db) == []
    assert row(db, execution_id).state == "succeeded"
    assert SECRET in provider.exec_calls[0][1]  # the value did reach the command


@pytest.mark.parametrize(
    ("lease", "message"),
    [("stopped", "not desired running"), ("gone", "no such lease"), ("expired", "expired")],
)
def test_row_for_a_lease_that_will_not_run_ends_in_error(
    db: Database, provider: ExecFakeProvider, disp: Dispatcher, lease: str, message: str
) -> None:
    add_lease(db, "stopped", desired="stopped", phase="Stopped")
    add_lease(db, "expired")
    with db.session() as session:
        session.execute(
            sa.update(Lease).where(Lease.name == "expired").values(expires_at=T0 - timedelta(hours=1))
        )
    execution_id = enqueue(db, lease_name=lease, command="true", env={"TOKEN": SECRET})
    assert disp.run_once() == 1
    r = row(db, execution_id)
    assert r.state == "error" and r.error is not None and message in r.error
    assert r.finished_at is not None and r.env is None
    assert provider.calls == []


def test_row_waits_for_a_starting_lease_then_errors_after_queue_wait(
    db: Database, provider: ExecFakeProvider, clock: Clock
) -> None:
    add_lease(db, phase="Provisioning", sandbox_id=None)
    execution_id = insert_sql(db, "box", "true", created_at=T0)
    d = dispatcher(db, provider, clock, queue_wait_seconds=60)
    try:
        clock.now = T0 + timedelta(seconds=30)
        assert d.run_once() == 0
        assert row(db, execution_id).state == "queued"
        clock.now = T0 + timedelta(seconds=61)
        assert d.run_once() == 1
    finally:
        d.shutdown()
    r = row(db, execution_id)
    assert r.state == "error" and r.error == "lease 'box' not ready after 60 s (phase Provisioning)"
    assert provider.calls == []


def test_row_for_a_lease_that_became_ready_in_time_runs(
    db: Database, provider: ExecFakeProvider, clock: Clock
) -> None:
    add_lease(db, phase="Provisioning", sandbox_id=None)
    execution_id = insert_sql(db, "box", "true", created_at=T0)
    d = dispatcher(db, provider, clock)
    try:
        clock.now = T0 + timedelta(seconds=10)
        assert d.run_once() == 0
        with db.session() as session:
            session.execute(
                sa.update(LeaseStatus).values(phase="Ready", sandbox_id="sb-9", workspace_path="/w")
            )
        assert d.run_once() == 1
    finally:
        d.shutdown()
    assert row(db, execution_id).state == "succeeded"
    assert provider.exec_calls[0][0] == "sb-9"


def test_invalid_env_in_a_queued_row_ends_it_before_anything_runs(
    db: Database, provider: ExecFakeProvider, disp: Dispatcher
) -> None:
    add_lease(db)
    with db.session() as session:
        session.add(Execution(lease_name="box", command="true", env={"NOT VALID": SECRET}))
    assert disp.run_once() == 1
    with db.session() as session:
        [r] = session.scalars(sa.select(Execution)).all()
    assert r.state == "error" and r.error is not None and "env" in r.error
    assert SECRET not in r.error and r.env is None
    assert provider.calls == []


def test_continuous_claims_end_an_invalid_row_and_leave_rows_that_cannot_run_to_the_poll(
    db: Database, provider: ExecFakeProvider, clock: Clock
) -> None:
    """A freed slot's claim (on PostgreSQL one UPDATE ... RETURNING of runnable rows) ends a row
    with an invalid env in error without running it; a row whose lease is gone is ended by a poll's
    claim; the rows after them still run, each once."""
    add_lease(db)
    with db.session() as session:
        session.add(Execution(lease_name="box", command="echo c0", ordered=False, created_at=T0))
        session.add(
            Execution(
                lease_name="box", command="true", env={"NOT VALID": SECRET}, ordered=False, created_at=T0
            )
        )
        session.add(Execution(lease_name="gone", command="echo gone", ordered=False, created_at=T0))
        session.add(Execution(lease_name="box", command="echo c3", ordered=False, created_at=T0))
    d = dispatcher(db, provider, clock, max_concurrent=1)
    try:
        assert d.drain() == 4
    finally:
        d.shutdown(timeout=10)
    with db.session() as session:
        rows = session.execute(
            sa.select(Execution.command, Execution.state, Execution.error, Execution.env)
        ).all()
    by_command = {r.command: r for r in rows}
    assert by_command["echo c0"].state == by_command["echo c3"].state == "succeeded"
    invalid = by_command["true"]
    assert invalid.state == "error" and "env" in (invalid.error or "") and SECRET not in (invalid.error or "")
    assert invalid.env is None
    assert by_command["echo gone"].state == "error"
    assert len(provider.exec_calls) == 2  # c0 and c3, each once; the invalid row never ran


def test_drain_stops_a_command_cancelled_while_it_runs(
    db: Database, provider: ExecFakeProvider, clock: Clock
) -> None:
    """drain() polls while its commands run (every exec.poll_interval_seconds): a row cancelled
    meanwhile is stopped in the sandbox, as the daemon's polling does."""
    add_lease(db)
    stopped = threading.Event()
    execution_id = enqueue(db, lease_name="box", command="echo long-running")

    def hook(sandbox_id: str, command: str) -> ExecResult:
        if "long-running" not in command:  # the stop command
            stopped.set()
            return ExecResult(exit_code=0, output="")
        with db.session() as session:  # an operator cancels the row while it runs
            session.execute(sa.update(Execution).values(state="cancelled"))
        stopped.wait(10)
        return ExecResult(exit_code=143, output="")

    provider.on_exec = hook
    d = dispatcher(db, provider, clock, poll_interval_seconds=0.01)
    try:
        d.drain()
    finally:
        d.shutdown(timeout=10)
    assert stopped.is_set()
    assert len(provider.exec_calls) == 2  # the command, then the stop
    assert row(db, execution_id).state == "cancelled"


def test_queued_outcomes_timed_out_failed_and_error(
    db: Database, provider: ExecFakeProvider, disp: Dispatcher
) -> None:
    add_lease(db)

    def hook(sandbox_id: str, command: str) -> ExecResult:
        if "cmd-slow" in command:
            return ExecResult(exit_code=None, output="", timed_out=True)
        if "cmd-fail" in command:
            return ExecResult(exit_code=2, output="nope")
        raise TransientError("toolbox unreachable")

    provider.on_exec = hook
    slow = enqueue(db, lease_name="box", command="cmd-slow", timeout_seconds=3)
    failing = enqueue(db, lease_name="box", command="cmd-fail")
    broken = enqueue(db, lease_name="box", command="cmd-other")
    assert disp.drain() == 3
    assert (row(db, slow).state, row(db, slow).exit_code) == ("timed_out", None)
    # drain() runs them concurrently: find the slow one's call by its command, not by its position.
    assert [call[2] for call in provider.exec_calls if "cmd-slow" in call[1]] == [3]
    assert (row(db, failing).state, row(db, failing).exit_code) == ("failed", 2)
    r = row(db, broken)  # sent, then the toolbox failed: it may have run, so it is not retried
    assert r.state == "unknown" and r.error is not None and "toolbox unreachable" in r.error
    assert "may or may not have run" in r.error and r.attempts == 0


def test_output_is_capped_with_a_flag(db: Database, provider: ExecFakeProvider, disp: Dispatcher) -> None:
    add_lease(db)
    provider.on_exec = lambda _s, _c: ExecResult(exit_code=0, output="é" * 600 + "\x00")
    execution_id = enqueue(db, lease_name="box", command="yes")
    disp.run_once()
    r = row(db, execution_id)
    assert r.output_truncated and r.output == "é" * 512


@pytest.mark.parametrize("output", ["\x00" * 1024, "a\x00" * 700, "\x00" * 400 + "é" * 300])
def test_cap_counts_the_stored_form_of_nul(
    db: Database, provider: ExecFakeProvider, disp: Dispatcher, output: str
) -> None:
    """Each NUL is stored as U+FFFD (3 bytes): the 1024-byte cap holds for what is stored, with the flag."""
    add_lease(db)
    provider.on_exec = lambda _s, _c: ExecResult(exit_code=0, output=output)
    execution_id = enqueue(db, lease_name="box", command="printf")
    disp.run_once()
    r = row(db, execution_id)
    assert r.output is not None
    stored = r.output.encode("utf-8")
    assert len(stored) <= 1024
    assert len(stored) > 1024 - 4  # cut at the cap, not far below it
    assert r.output_truncated
    assert "\x00" not in r.output


def test_output_at_the_cap_is_not_flagged(db: Database, provider: ExecFakeProvider, disp: Dispatcher) -> None:
    add_lease(db)
    provider.on_exec = lambda _s, _c: ExecResult(exit_code=0, output="x" * 1021 + "\x00")
    execution_id = enqueue(db, lease_name="box", command="printf")
    disp.run_once()
    r = row(db, execution_id)
    assert r.output == "x" * 1021 + "\ufffd" and not r.output_truncated


def test_nul_in_output_is_stored(db: Database, provider: ExecFakeProvider, disp: Dispatcher) -> None:
    add_lease(db)
    provider.on_exec = lambda _s, _c: ExecResult(exit_code=0, output="a\x00b")
    execution_id = enqueue(db, lease_name="box", command="printf")
    disp.run_once()
    assert row(db, execution_id).output == "a\ufffdb"


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(proc.stdout)


def test_rows_left_running_by_a_gone_worker_become_interrupted_and_never_rerun(
    db: Database, provider: ExecFakeProvider, clock: Clock
) -> None:
    add_lease(db)
    host = socket.gethostname()
    recent, old = T0 - timedelta(seconds=5), T0 - timedelta(seconds=700)
    rows = {
        "dead_here": (f"{host}:{_dead_pid()}:worker-x", recent),
        "alive_here": (f"{host}:{os.getpid()}:worker-y", recent),
        "other_host_recent": ("elsewhere:123:worker-z", recent),
        "other_host_stale": ("elsewhere:123:worker-z", old),
        "unknown_claimer_stale": (None, old),
    }
    ids: dict[str, int] = {}
    with db.session() as session:
        for key, (claimer, started) in rows.items():
            r = Execution(
                lease_name="box",
                command=key,
                state="running",
                claimed_by=claimer,
                started_at=started,
                timeout_seconds=60,
                env={"TOKEN": SECRET},
            )
            session.add(r)
            session.flush()
            ids[key] = r.id
    d = Dispatcher(db, provider, settings(), clock=clock, interrupt_grace_seconds=300)
    try:
        assert d.recover_interrupted() == 3
        assert d.drain() == 0
    finally:
        d.shutdown()
    states = {key: row(db, i).state for key, i in ids.items()}
    assert states == {
        "dead_here": "interrupted",
        "alive_here": "running",
        "other_host_recent": "running",
        "other_host_stale": "interrupted",
        "unknown_claimer_stale": "interrupted",
    }
    assert "has ended" in (row(db, ids["dead_here"]).error or "")
    assert "time-out" in (row(db, ids["other_host_stale"]).error or "")
    assert row(db, ids["dead_here"]).env is None
    assert provider.calls == []  # nothing was run again


def test_a_late_result_for_an_interrupted_row_is_dropped(
    db: Database, provider: ExecFakeProvider, clock: Clock
) -> None:
    add_lease(db)
    execution_id = enqueue(db, lease_name="box", command="work")
    d = dispatcher(db, provider, clock)

    def hook(sandbox_id: str, command: str) -> ExecResult:
        with db.session() as session:  # another replica declared this worker gone meanwhile
            session.execute(sa.update(Execution).values(state="interrupted", error="gone"))
        return ExecResult(exit_code=0, output="late")

    provider.on_exec = hook
    try:
        d.run_once()
    finally:
        d.shutdown()
    r = row(db, execution_id)
    assert (r.state, r.error, r.output) == ("interrupted", "gone", None)


def test_secrets_never_reach_logs_events_or_rows(
    db: Database, provider: ExecFakeProvider, disp: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    add_lease(db)
    caplog.set_level(logging.DEBUG)

    def hook(sandbox_id: str, command: str) -> ExecResult:
        if "boom" in command:
            raise TransientError(f"rejected: {command}")
        return ExecResult(exit_code=1, output="")

    provider.on_exec = hook
    enqueue(db, lease_name="box", command="boom", env={"TOKEN": SECRET, "OTHER": SECRET + "2"})
    enqueue(db, lease_name="box", command="fine", env={"TOKEN": SECRET}, stdin=SECRET.encode())
    enqueue(db, lease_name="stopped-or-missing", command="x", env={"TOKEN": SECRET})
    execute_now(db, provider, settings(), lease_name="box", command="direct", env={"TOKEN": SECRET})
    assert disp.drain() == 3
    assert SECRET not in caplog.text
    assert "TOKEN" in caplog.text  # keys may be logged
    with db.engine.connect() as conn:
        for table in ("events", "executions"):
            for r in conn.execute(sa.text(f"SELECT * FROM {table}")):
                assert SECRET not in repr(tuple(r))


def test_run_once_without_waiting_then_shutdown_waits(
    db: Database, provider: ExecFakeProvider, clock: Clock
) -> None:
    add_lease(db)
    release = threading.Event()

    def hook(sandbox_id: str, command: str) -> ExecResult:
        release.wait(10)
        return ExecResult(exit_code=0, output="")

    provider.on_exec = hook
    execution_id = enqueue(db, lease_name="box", command="work")
    d = dispatcher(db, provider, clock)
    assert d.run_once(wait=False) == 1
    assert row(db, execution_id).state == "running"
    release.set()
    assert d.shutdown(timeout=10)
    assert row(db, execution_id).state == "succeeded"
    assert d.run_once() == 0  # closed


def _exec_events(db: Database) -> list[tuple[str | None, str | None, str | None, str]]:
    with db.session(readonly=True) as session:
        rows = session.execute(
            sa.select(Event.lease_name, Event.sandbox_id, Event.message, Event.outcome)
            .where(Event.action == "exec")
            .order_by(Event.id)
        ).all()
    return [tuple(r) for r in rows]


def test_a_group_commit_keeps_nothing_when_a_row_is_no_longer_ours(db: Database) -> None:
    """Results are written with one executemany of the fenced UPDATE: when one row was ended by
    someone else meanwhile, the whole group rolls back (no row, no event) and each row is then
    recorded alone, where only the row no longer ours is dropped."""
    add_lease(db)
    ids = [enqueue(db, lease_name="box", command=f"c{i}") for i in range(3)]
    with db.session() as session:
        session.execute(
            sa.update(Execution).values(state="running", claimed_by="w", sandbox_id="sb-1", started_at=T0)
        )
        session.execute(sa.update(Execution).where(Execution.id == ids[1]).values(state="cancelled"))
    ok = CommandOutcome(state="succeeded", exit_code=0, output="out")
    results = [Finished(i, ok, "box", "sb-1") for i in ids]
    assert finish_many(db, "w", results, max_output_bytes=1024) == ids
    assert [row(db, i).state for i in ids] == ["running", "cancelled", "running"]
    assert _exec_events(db) == []
    recorded = [
        finish(db, i, "w", ok, lease_name="box", sandbox_id="sb-1", max_output_bytes=1024) for i in ids
    ]
    assert recorded == [True, False, True]
    assert [row(db, i).state for i in ids] == ["succeeded", "cancelled", "succeeded"]
    assert [e[2] for e in _exec_events(db)] == [f"execution {ids[0]}: exit 0", f"execution {ids[2]}: exit 0"]


def test_a_group_commit_writes_every_row_and_one_event_each(db: Database) -> None:
    add_lease(db)
    ids = [enqueue(db, lease_name="box", command=f"c{i}") for i in range(3)]
    with db.session() as session:
        session.execute(
            sa.update(Execution).values(state="running", claimed_by="w", sandbox_id="sb-1", started_at=T0)
        )
    outcomes = [
        CommandOutcome(state="succeeded", exit_code=0, output="a"),
        CommandOutcome(state="failed", exit_code=3, output="b\x00"),
        CommandOutcome(state="timed_out", output="c", error="timed out after 5 s"),
    ]
    results = [Finished(i, o, "box", "sb-1") for i, o in zip(ids, outcomes, strict=True)]
    assert finish_many(db, "w", results, max_output_bytes=1024) == []
    rows = [row(db, i) for i in ids]
    assert [(r.state, r.exit_code, r.output, r.claimed_by) for r in rows] == [
        ("succeeded", 0, "a", "w"),
        ("failed", 3, "b\ufffd", "w"),
        ("timed_out", None, "c", "w"),
    ]
    assert all(r.finished_at is not None and r.env is None and r.stdin is None for r in rows)
    assert _exec_events(db) == [
        ("box", "sb-1", f"execution {ids[0]}: exit 0", "succeeded"),
        ("box", "sb-1", f"execution {ids[1]}: exit 3", "failed"),
        ("box", "sb-1", f"execution {ids[2]}: timed out after 5 s", "timed_out"),
    ]
    # written again (a retry of the same group): nothing matches, nothing is written twice
    assert finish_many(db, "w", results, max_output_bytes=1024) == ids
    assert len(_exec_events(db)) == 3


def test_commands_ending_together_while_one_is_cancelled_in_continuous_mode(
    db: Database, provider: ExecFakeProvider, clock: Clock
) -> None:
    """Slots that free up at once share group commits and claims; a row cancelled meanwhile keeps
    its state and gets no result, the others get theirs and one event each, and nothing runs twice."""
    add_lease(db)
    together = threading.Barrier(3, timeout=10)
    ids = [enqueue(db, lease_name="box", command=f"echo c{i}", ordered=False) for i in range(6)]

    def hook(sandbox_id: str, command: str) -> ExecResult:
        for i in ids[:3]:
            if f"echo c{ids.index(i)}" in command:
                together.wait()
                if i == ids[1]:
                    with db.session() as session:
                        session.execute(
                            sa.update(Execution).where(Execution.id == i).values(state="cancelled")
                        )
        return ExecResult(exit_code=0, output="ok")

    provider.on_exec = hook
    d = dispatcher(db, provider, clock, max_concurrent=3)
    try:
        assert d.drain() == 6
    finally:
        d.shutdown(timeout=10)
    states = [row(db, i).state for i in ids]
    assert states == ["succeeded", "cancelled", "succeeded", "succeeded", "succeeded", "succeeded"]
    ran = [c for c in provider.exec_calls if "echo c" in c[1]]
    assert len(ran) == 6
    messages = [e[2] for e in _exec_events(db)]
    assert sorted(messages) == sorted(f"execution {i}: exit 0" for i in ids if i != ids[1])


# -- the CLI -------------------------------------------------------------------------------------


@pytest.fixture
def cli_provider(monkeypatch: pytest.MonkeyPatch, provider: ExecFakeProvider) -> ExecFakeProvider:
    import controller.providers

    monkeypatch.setattr(controller.providers, "build_provider", lambda *_a, **_k: provider)
    monkeypatch.setenv("LEASECTL_EXEC__SESSION_MIN_TIMEOUT_SECONDS", "100000")  # exec-only fake
    return provider


def cli(database_url: str, *args: str, stdin: bytes | None = None) -> tuple[int, bytes, str]:
    from typer.testing import CliRunner

    from controller.cli import app

    result = CliRunner().invoke(app, ["--database-url", database_url, *args], input=stdin)
    return result.exit_code, result.stdout_bytes, result.stderr


def test_cli_exec_passes_the_exit_code_and_prints_the_output(
    db: Database, database_url: str, cli_provider: ExecFakeProvider
) -> None:
    add_lease(db)
    cli_provider.on_exec = lambda _s, _c: ExecResult(exit_code=3, output="héllo\n")
    code, out, _ = cli(database_url, "exec", "box", "--env", "A=1", "--", "prog", "--flag", "x y")
    assert (code, out) == (3, "héllo\n".encode())
    assert "'x y'" in cli_provider.exec_calls[0][1] and "--flag" in cli_provider.exec_calls[0][1]
    cli_provider.on_exec = lambda _s, _c: ExecResult(exit_code=None, output="", timed_out=True)
    code, _, err = cli(database_url, "exec", "box", "--timeout", "1", "--shell", "sleep 5")
    assert code == 124 and "timed out" in err
    with db.session() as session:
        states = session.scalars(sa.select(Execution.state).order_by(Execution.id)).all()
    assert states == ["failed", "timed_out"]


def test_cli_exec_stdin_from_a_pipe(db: Database, database_url: str, cli_provider: ExecFakeProvider) -> None:
    add_lease(db)
    seen: list[bytes] = []

    def hook(sandbox_id: str, command: str) -> ExecResult:
        seen.extend(cli_provider.files.values())
        return ExecResult(exit_code=0, output="")

    cli_provider.on_exec = hook
    code, _, _ = cli(database_url, "exec", "box", "--stdin", "-", "--", "cat", stdin=b"\x00\x01bin")
    assert code == 0 and seen == [b"\x00\x01bin"] and cli_provider.files == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["exec", "nope", "--", "true"], "no such lease"),
        (["exec", "starting", "--", "true"], "not Ready"),
        (["exec", "box", "--env", "BAD-KEY=x", "--", "true"], "BAD-KEY"),
        (["exec", "box", "--env", SECRET, "--", "true"], "NAME=VALUE"),
        (["exec", "box", "--shell", "true", "--", "true"], "exactly one"),
        (["exec", "box"], "exactly one"),
        (["exec", "box", "--shell", "  "], "empty"),
        (["exec", "box", "--queue", "--shell", "  "], "empty"),
        (["exec", "stopped", "--queue", "--", "true"], "not desired running"),
        (["executions", "--state", "bogus"], "--state"),
    ],
)
def test_cli_refuses_bad_requests_with_exit_2(
    db: Database, database_url: str, cli_provider: ExecFakeProvider, args: list[str], message: str
) -> None:
    add_lease(db)
    add_lease(db, "starting", phase="Provisioning", sandbox_id=None)
    add_lease(db, "stopped", desired="stopped", phase="Stopped")
    code, _, err = cli(database_url, *args)
    assert code == 2 and message in err and SECRET not in err
    assert cli_provider.calls == []
    with db.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Execution)) == 0


def test_cli_queue_waits_for_a_dispatcher_and_executions_lists_it(
    db: Database, database_url: str, cli_provider: ExecFakeProvider, clock: Clock
) -> None:
    import json

    add_lease(db)
    cli_provider.on_exec = lambda _s, _c: ExecResult(exit_code=5, output="queued out")
    stop = threading.Event()
    d = Dispatcher(db, cli_provider, settings(poll_interval_seconds=0.05))
    worker = threading.Thread(target=d.run_forever, args=(stop,))
    worker.start()
    try:
        code, out, _ = cli(database_url, "exec", "box", "--queue", "--env", f"T={SECRET}", "--", "x")
    finally:
        stop.set()
        worker.join(10)
    assert (code, out) == (5, b"queued out")
    code, out, _ = cli(database_url, "executions", "--lease", "box", "-o", "json")
    [listed] = json.loads(out)
    assert (listed["state"], listed["exit_code"], listed["output"]) == ("failed", 5, "queued out")
    assert "env" not in listed and SECRET not in out.decode()
    code, out, _ = cli(database_url, "executions", "--state", "failed")
    assert code == 0 and b"failed" in out


def test_output_of_queued_and_direct_commands_masks_the_leases_secret_references(
    db: Database,
    provider: ExecFakeProvider,
    disp: Dispatcher,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
) -> None:
    """A command that prints a referenced secret (``echo $TOKEN``) is stored with the value masked,
    in the output and in an error, whether it ran from the queue or directly; literals are kept."""
    monkeypatch.setenv("LEASECTL_TEST_TOKEN", SECRET)
    key_file = tmp_path / "key"
    key_file.write_text("file-secret-42\n")
    add_lease(db)
    with db.session() as session:
        lease = session.scalar(sa.select(Lease).where(Lease.name == "box"))
        assert lease is not None
        lease.env = {
            "TOKEN": {"from_env": "LEASECTL_TEST_TOKEN"},
            "KEY": {"from_file": str(key_file)},
            "UNSET": {"from_env": "LEASECTL_TEST_NOT_SET"},
            "PLAIN": "visible",
        }
    provider.on_exec = lambda _s, _c: ExecResult(
        exit_code=0, output=f"token={SECRET} key=file-secret-42 plain=visible\n"
    )
    queued = insert_sql(db, "box", "echo $TOKEN $KEY $PLAIN")
    assert disp.run_once() == 1
    direct, outcome = execute_now(db, provider, settings(), lease_name="box", command="echo $TOKEN")
    expected = "token=*** key=*** plain=visible\n"
    assert row(db, queued).output == expected
    assert row(db, direct).output == expected
    assert outcome.output == expected

    def boom(_s: str, _c: str) -> ExecResult:
        raise RuntimeError(f"crashed near {SECRET}")

    provider.on_exec = boom
    failed = insert_sql(db, "box", "echo again")
    assert disp.run_once() == 1
    assert row(db, failed).state == "error"
    assert SECRET not in (row(db, failed).error or "") and "***" in (row(db, failed).error or "")
