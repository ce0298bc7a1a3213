"""The execution queue under faults and for long jobs (issue 20), end to end: the official SDK
(controller.providers.daytona) against the local Daytona API, real bash processes, SQLite and
PostgreSQL.

What is checked: with 50% 429 on exec and 50% faults on get, 20 queued commands all succeed and
each ran exactly once (a marker file per row); a command whose exec answer is lost after it was sent
ends ``unknown`` and is never run again; a 20-second command shows its first lines in
``executions logs`` before it ends and ``logs -f`` ends with it; two commands of one lease never
overlap (timestamps written by the commands) while an unordered one may; cancelling a running row
stops its process; a worker SIGKILLed during a 10-second session command leaves a row that the next
worker completes with the command's real exit code and full output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from controller.config import ExecSettings
from controller.db import Database, connect
from controller.execution import Dispatcher, enqueue
from controller.providers.base import CreateRequest
from controller.providers.daytona import DaytonaProvider
from models import Execution, Lease, LeaseStatus
from models.tables import EXECUTION_TERMINAL_STATES
from tests.support.emulator import REPO_ROOT, EmulatorProcess

API_KEY = "test-key-" + uuid.uuid4().hex[:8]
LONG = 600  # a time-out that selects the session path (exec.session_min_timeout_seconds is 60)
SHORT = 30  # one request


@dataclass
class Box:
    emulator: EmulatorProcess
    provider: DaytonaProvider
    sandbox_id: str
    lease: str


@pytest.fixture
def box(db: Database, tmp_path: Path) -> Iterator[Box]:
    with EmulatorProcess(tmp_path / "daytona", api_key=API_KEY) as emu:
        provider = DaytonaProvider(emu.api_url, API_KEY, request_timeout=10)
        created = provider.create(CreateRequest(name="q-box", labels={"leasectl-instance": "test"}))
        deadline = time.monotonic() + 30
        while (seen := provider.get(created.id)) is None or seen.state != "started":
            assert time.monotonic() < deadline, f"sandbox not started: {seen}"
            time.sleep(0.1)
        workspace = provider.work_dir(created.id)
        with db.session() as session:
            session.add(Lease(name="box", desired_state="running"))
            session.add(
                LeaseStatus(lease_name="box", phase="Ready", sandbox_id=created.id, workspace_path=workspace)
            )
        yield Box(emu, provider, created.id, "box")


def exec_settings(**overrides: Any) -> ExecSettings:
    values: dict[str, Any] = {
        "max_concurrent": 4,
        "poll_interval_seconds": 0.1,
        "log_poll_seconds": 0.1,
        "retry_backoff_seconds": 0.05,
        "retry_backoff_max_seconds": 0.3,
        "queue_wait_seconds": 120,
    }
    values.update(overrides)
    return ExecSettings.model_validate(values)


def row(db: Database, execution_id: int) -> Execution:
    with db.session() as session:
        found = session.get(Execution, execution_id)
        assert found is not None
        session.expunge(found)
        return found


def run_until_done(dispatcher: Dispatcher, db: Database, ids: list[int], limit: float = 120) -> None:
    """Drive the dispatcher until every row is terminal (rows backing off need several rounds)."""
    deadline = time.monotonic() + limit
    while True:
        dispatcher.drain()
        with db.session() as session:
            states = session.scalars(sa.select(Execution.state).where(Execution.id.in_(ids))).all()
        if all(s in EXECUTION_TERMINAL_STATES for s in states):
            return
        assert time.monotonic() < deadline, f"rows still not done: {states}"
        time.sleep(0.05)


def cli(database_url: str, *args: str) -> tuple[int, str, str]:
    from controller.cli import app

    result = CliRunner().invoke(app, ["--database-url", database_url, *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def background(db: Database, box: Box) -> Iterator[Dispatcher]:
    """A dispatcher polling in a thread, as the daemon runs it."""
    dispatcher = Dispatcher(db, box.provider, exec_settings(), worker_id=f"test:{os.getpid()}:bg")
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run_forever, args=(stop,), daemon=True)
    thread.start()
    yield dispatcher
    stop.set()
    thread.join(30)


# -- faults ----------------------------------------------------------------------------------------


def test_throttled_exec_and_failing_get_still_run_each_command_exactly_once(
    db: Database, box: Box, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    ids = [
        enqueue(
            db,
            lease_name=box.lease,
            command=f"echo ran >> {marks}/row-{i}",
            timeout_seconds=SHORT if i % 2 else LONG,  # both the one-request and the session path
        )
        for i in range(20)
    ]
    box.emulator.set_faults(
        seed=20,
        fail_rate={
            "execute": {"429": 0.5},
            "session_execute": {"429": 0.5},
            "get": {"429": 0.2, "500": 0.2, "503": 0.2},  # ~50% of sandbox lookups fail
        },
    )
    dispatcher = Dispatcher(db, box.provider, exec_settings(), worker_id=f"test:{os.getpid()}:w")
    try:
        run_until_done(dispatcher, db, ids)
    finally:
        dispatcher.shutdown()
    rows = [row(db, i) for i in ids]
    assert [r.state for r in rows] == ["succeeded"] * 20, [(r.state, r.error) for r in rows]
    for i in range(20):
        assert (marks / f"row-{i}").read_text() == "ran\n"  # exactly once
    retried = [r for r in rows if r.attempts]
    assert retried, "the faults should have made some attempts fail before the command started"
    for r in retried:
        assert r.attempt_log is not None and len(r.attempt_log) == r.attempts
        assert all(entry["reason"] and entry["at"] for entry in r.attempt_log)
    stats = box.emulator.stats()
    assert stats["execute"] + stats["session_execute"] > 20  # throttled calls were made again


@pytest.mark.parametrize(("timeout", "operation"), [(SHORT, "execute"), (LONG, "session_execute")])
def test_a_command_whose_answer_was_lost_after_sending_ends_unknown_and_never_reruns(
    db: Database, box: Box, tmp_path: Path, timeout: int, operation: str
) -> None:
    marker = tmp_path / "ran"
    execution_id = enqueue(
        db, lease_name=box.lease, command=f"echo once >> {marker}", timeout_seconds=timeout
    )
    # the call reaches the sandbox and the command runs; its answer is lost (504 after a hang)
    box.emulator.set_faults(fail_rate={operation: {"timeout": 1.0}}, hang_seconds=0.3)
    dispatcher = Dispatcher(db, box.provider, exec_settings(), worker_id=f"test:{os.getpid()}:w")
    try:
        run_until_done(dispatcher, db, [execution_id])
        box.emulator.set_faults(fail_rate={})
        for _ in range(3):  # later rounds must not pick it up again
            dispatcher.run_once()
    finally:
        dispatcher.shutdown()
    r = row(db, execution_id)
    assert r.state == "unknown" and r.attempts == 0
    assert r.error is not None and "may or may not have run" in r.error
    time.sleep(0.5)  # an asynchronous session command finishes on its own
    assert marker.read_text() == "once\n"
    assert box.emulator.stats()[operation] == 1


# -- long jobs -------------------------------------------------------------------------------------


def test_long_command_shows_its_first_lines_before_it_ends_and_logs_follow_ends_with_it(
    db: Database, database_url: str, box: Box, background: Dispatcher
) -> None:
    script = "for i in $(seq 1 20); do echo line $i; sleep 1; done; exit 3"
    execution_id = enqueue(db, lease_name=box.lease, command=script, timeout_seconds=LONG)
    deadline = time.monotonic() + 15
    while True:
        code, out, _ = cli(database_url, "executions", "logs", str(execution_id))
        assert code == 0
        if "line 2\n" in out:
            break
        assert time.monotonic() < deadline, f"no output while running: {out!r}"
        time.sleep(0.2)
    assert row(db, execution_id).state == "running"  # the first lines came before the end
    assert "line 20" not in out
    code, followed, err = cli(database_url, "executions", "logs", str(execution_id), "-f")
    assert code == 0
    assert followed == "".join(f"line {i}\n" for i in range(1, 21))
    r = row(db, execution_id)
    assert (r.state, r.exit_code, r.output) == ("failed", 3, followed)
    assert "failed" in err and "exit 3" in err


def test_cli_exec_streams_a_session_command_while_it_runs(
    db: Database, database_url: str, box: Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controller import execution_run  # exec's direct path (execute_now) lives there

    monkeypatch.setenv("DAYTONA_API_URL", box.emulator.api_url)
    monkeypatch.setenv("DAYTONA_API_KEY", API_KEY)
    monkeypatch.setenv("LEASECTL_EXEC__LOG_POLL_SECONDS", "0.1")
    seen: list[tuple[str, str]] = []
    real = execution_run.follow_session

    def spy(*args: Any, **kwargs: Any) -> Any:
        forward = kwargs["on_output"]

        def on_output(text: str) -> None:
            with db.session() as session:
                state = session.scalar(sa.select(Execution.state).order_by(Execution.id.desc()).limit(1))
            seen.append((text, str(state)))
            forward(text)

        kwargs["on_output"] = on_output
        return real(*args, **kwargs)

    monkeypatch.setattr(execution_run, "follow_session", spy)
    code, out, _ = cli(
        database_url, "exec", "box", "--shell", "echo first; sleep 2; echo second", "--timeout", "600"
    )
    assert (code, out) == (0, "first\nsecond\n")  # printed once, in order
    assert ("first\n", "running") in seen  # the first line was passed on while the command ran


def test_two_commands_of_one_lease_never_overlap_unless_one_opts_out(
    db: Database, box: Box, tmp_path: Path, background: Dispatcher
) -> None:
    stamps = tmp_path / "stamps"
    stamps.mkdir()

    def timed(name: str) -> str:
        return f"date +%s.%N > {stamps}/{name}.start; sleep 1.5; date +%s.%N > {stamps}/{name}.end"

    first = enqueue(db, lease_name=box.lease, command=timed("a"), timeout_seconds=LONG)
    second = enqueue(db, lease_name=box.lease, command=timed("b"), timeout_seconds=SHORT)
    free = enqueue(db, lease_name=box.lease, command=timed("c"), timeout_seconds=LONG, ordered=False)
    deadline = time.monotonic() + 60
    while not all(row(db, i).state in EXECUTION_TERMINAL_STATES for i in (first, second, free)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert {row(db, i).state for i in (first, second, free)} == {"succeeded"}

    def span(name: str) -> tuple[float, float]:
        return float((stamps / f"{name}.start").read_text()), float((stamps / f"{name}.end").read_text())

    a, b, c = span("a"), span("b"), span("c")
    assert a[1] <= b[0], f"the second command started before the first ended: {a} {b}"
    assert c[0] < a[1], f"the unordered command waited for the first: {a} {c}"


def test_cancel_of_a_running_row_stops_its_process(
    db: Database,
    database_url: str,
    box: Box,
    tmp_path: Path,
    background: Dispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pidfile = tmp_path / "pid"
    execution_id = enqueue(
        db, lease_name=box.lease, command=f"echo $$ > {pidfile}; exec sleep 120", timeout_seconds=LONG
    )
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    os.kill(pid, 0)  # it runs
    monkeypatch.setenv("DAYTONA_API_URL", box.emulator.api_url)
    monkeypatch.setenv("DAYTONA_API_KEY", API_KEY)
    code, out, err = cli(database_url, "cancel", str(execution_id))
    assert code == 0, err
    assert "stopped in the sandbox" in out
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the cancelled command still runs"
        time.sleep(0.1)
    assert row(db, execution_id).state == "cancelled"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of the local API's process is gone for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_worker_killed_during_a_session_command_is_completed_by_the_next_worker(
    db: Database, database_url: str, box: Box
) -> None:
    script = "echo start; sleep 10; echo done; exit 7"
    execution_id = enqueue(db, lease_name=box.lease, command=script, timeout_seconds=LONG)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))},
        "LEASECTL_CONFIG": os.devnull,
        "LEASECTL_DATABASE_URL": database_url,
        "DAYTONA_API_URL": box.emulator.api_url,
        "DAYTONA_API_KEY": API_KEY,
        "LEASECTL_EXEC__POLL_INTERVAL_SECONDS": "0.1",
        "LEASECTL_EXEC__LOG_POLL_SECONDS": "0.1",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "exec-worker"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            r = row(db, execution_id)
            if r.command_id and "start" in (r.output or ""):
                break
            assert worker.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, f"the command did not start: {r.state}"
            time.sleep(0.1)
    finally:
        worker.kill()
        worker.wait(10)
    assert row(db, execution_id).state == "running"
    dispatcher = Dispatcher(db, box.provider, exec_settings(), worker_id=f"test:{os.getpid()}:next")
    try:
        dispatcher.drain()  # re-attaches at once (its worker's process is gone) and follows it
    finally:
        dispatcher.shutdown()
    r = row(db, execution_id)
    assert (r.state, r.exit_code, r.output) == ("failed", 7, "start\ndone\n")
    assert r.claimed_by == dispatcher.worker_id


def test_a_database_outage_while_a_session_command_runs_does_not_end_it(
    db: Database, database_url: str, box: Box
) -> None:
    """The database refuses everything for a while as the session command runs: the follower keeps
    following (a stop check or an output write the database refused is no reason to give the
    command up) and the row ends with the command's real exit code and output."""
    script = "echo start; sleep 3; echo done; exit 4"
    execution_id = enqueue(db, lease_name=box.lease, command=script, timeout_seconds=LONG)
    worker_db = connect(database_url)
    outage = threading.Event()

    def refuse(*_: Any) -> None:
        if outage.is_set():
            raise sa.exc.OperationalError("injected", {}, Exception("the database is unreachable"))

    sa.event.listen(worker_db.engine, "before_cursor_execute", refuse)
    dispatcher = Dispatcher(worker_db, box.provider, exec_settings(), worker_id=f"test:{os.getpid()}:w")
    runner = threading.Thread(target=dispatcher.run_once)
    try:
        runner.start()
        deadline = time.monotonic() + 30
        while not row(db, execution_id).command_id:
            assert time.monotonic() < deadline, "the command did not start"
            time.sleep(0.05)
        outage.set()
        time.sleep(1.5)  # several stop checks and output polls fail meanwhile
        outage.clear()
        runner.join(30)
        assert not runner.is_alive()
        dispatcher.run_once()  # writes the result if it arrived while the database was away
    finally:
        outage.clear()
        dispatcher.shutdown()
        worker_db.dispose()
    r = row(db, execution_id)
    assert (r.state, r.exit_code, r.output) == ("failed", 4, "start\ndone\n")
