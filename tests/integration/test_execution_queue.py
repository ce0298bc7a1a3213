"""Competing dispatchers: two workers (each its own engine, as two replicas would be) draining 200
queued rows run every row exactly once, on PostgreSQL (FOR UPDATE SKIP LOCKED) and SQLite
(BEGIN IMMEDIATE)."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from controller import db as dbmod
from controller import execution
from controller.config import ExecSettings
from controller.execution import Dispatcher
from controller.providers.base import ExecResult
from models import Event, Execution, Lease, LeaseStatus, utcnow
from tests.conftest import truncate_all

ROWS = 200


class CountingProvider:
    """The toolbox calls the dispatcher makes, answered from memory by ``exec_hook``."""

    def __init__(self) -> None:
        self.exec_hook: Callable[[str, str], ExecResult] = lambda _s, _c: ExecResult(0, "")

    def exec(self, sandbox_id: str, command: str, **_: Any) -> ExecResult:
        return self.exec_hook(sandbox_id, command)

    def upload(self, sandbox_id: str, path: str, data: bytes) -> None:
        raise AssertionError("no stdin in this test")

    def delete_file(self, sandbox_id: str, path: str) -> None:
        raise AssertionError("no stdin in this test")


def test_two_dispatchers_run_each_row_exactly_once(database_url: str) -> None:
    provider = CountingProvider()
    sandbox_id = "sb-1"
    runs: Counter[int] = Counter()
    lock = threading.Lock()

    def on_exec(sandbox: str, command: str) -> ExecResult:
        match = re.search(r"job-(\d+)", command)
        assert match is not None
        with lock:
            runs[int(match.group(1))] += 1
        time.sleep(0.002)
        return ExecResult(exit_code=0, output=match.group(0))

    provider.exec_hook = on_exec
    setup = dbmod.connect(database_url)
    with setup.session() as session:
        session.add(Lease(name="box", desired_state="running"))
        session.add(LeaseStatus(lease_name="box", phase="Ready", sandbox_id=sandbox_id, workspace_path="/w"))
    with setup.session() as session:
        session.execute(
            sa.insert(Execution), [{"lease_name": "box", "command": f"echo job-{i}"} for i in range(ROWS)]
        )
        ids = {n: i for i, n in session.execute(sa.select(Execution.id, Execution.command))}
    # one-request exec (this provider has no sessions), no per-lease ordering: the claim race is tested
    settings = ExecSettings(max_concurrent=4, per_lease_concurrency=0, session_min_timeout_seconds=100_000)
    databases = [dbmod.connect(database_url) for _ in range(2)]
    dispatchers = [
        Dispatcher(database, provider, settings, worker_id=f"replica-{n}:0:w")
        for n, database in enumerate(databases)
    ]
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def drain(d: Dispatcher) -> None:
        barrier.wait()
        try:
            d.drain()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=drain, args=(d,)) for d in dispatchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for d in dispatchers:
        d.shutdown(timeout=10)
    assert not failures
    try:
        with setup.session() as session:
            rows = session.execute(
                sa.select(Execution.id, Execution.state, Execution.output, Execution.claimed_by)
            )
            result = {r.id: r for r in rows}
        assert {r.state for r in result.values()} == {"succeeded"}
        assert len(runs) == ROWS and set(runs.values()) == {1}
        for command, execution_id in ids.items():
            assert result[execution_id].output == command.removeprefix("echo ")
        claimers = Counter(r.claimed_by for r in result.values())
        assert set(claimers) == {"replica-0:0:w", "replica-1:0:w"}, claimers
    finally:
        for database in [setup, *databases]:
            database.dispose()


# -- writes the database refused -------------------------------------------------------------------


def _one_lease_with_rows(
    database: dbmod.Database, *commands: str, env: dict[str, str] | None = None
) -> list[int]:
    with database.session() as session:
        session.add(Lease(name="box", desired_state="running"))
        session.add(LeaseStatus(lease_name="box", phase="Ready", sandbox_id="sb-1", workspace_path="/w"))
    with database.session() as session:
        session.execute(
            sa.insert(Execution), [{"lease_name": "box", "command": c, "env": env} for c in commands]
        )
        return list(session.scalars(sa.select(Execution.id).order_by(Execution.id)))


def _row(database: dbmod.Database, execution_id: int) -> Any:
    with database.session(readonly=True) as session:
        return session.execute(sa.select(Execution).where(Execution.id == execution_id)).scalar_one()


ONE_REQUEST = ExecSettings(max_concurrent=2, per_lease_concurrency=0, session_min_timeout_seconds=100_000)


def test_a_result_the_database_refused_is_written_at_the_next_poll(database_url: str) -> None:
    """An outage while a command ran: its result stays owed in memory (the row ``running`` under a
    live worker, which other workers leave alone for its time-out plus 300 s) and is written by the
    next poll once the database answers, with its event; the command is not run again."""
    database = dbmod.connect(database_url)
    (execution_id,) = _one_lease_with_rows(database, "echo hello")
    outage = threading.Event()
    provider = CountingProvider()
    runs: list[str] = []

    def on_exec(_sandbox: str, command: str) -> ExecResult:
        runs.append(command)
        outage.set()  # the database goes away while the command runs
        return ExecResult(exit_code=0, output="hello")

    def refuse(*_: Any) -> None:
        if outage.is_set():
            raise sa.exc.OperationalError("injected", {}, Exception("the database is unreachable"))

    provider.exec_hook = on_exec
    sa.event.listen(database.engine, "before_cursor_execute", refuse)
    dispatcher = Dispatcher(database, provider, ONE_REQUEST, worker_id="replica-0:0:w")
    try:
        assert dispatcher.run_once() == 1
        outage.clear()
        row = _row(database, execution_id)
        assert (row.state, row.claimed_by) == ("running", "replica-0:0:w")
        outage.set()
        dispatcher.run_once()  # still down: still owed
        outage.clear()
        assert _row(database, execution_id).state == "running"
        dispatcher.run_once()
        row = _row(database, execution_id)
        assert (row.state, row.exit_code, row.output) == ("succeeded", 0, "hello")
        assert len(runs) == 1
        with database.session(readonly=True) as session:
            events = session.scalars(sa.select(Event.outcome).where(Event.action == "exec")).all()
        assert events == ["succeeded"]
    finally:
        dispatcher.shutdown(timeout=10)
        database.dispose()


def test_a_claim_whose_commit_failed_is_queued_again_and_runs_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim's COMMIT reached the database but its answer was lost: the rows are ``running``
    under this worker though nothing was started. The next poll puts them back in the queue, env
    and all, and runs each exactly once."""
    database = dbmod.connect(database_url)
    ids = _one_lease_with_rows(database, "echo a", "echo b", env={"GREETING": "hi"})
    provider = CountingProvider()
    runs: list[str] = []

    def on_exec(_sandbox: str, command: str) -> ExecResult:
        runs.append(command)
        return ExecResult(exit_code=0, output="ok")

    provider.exec_hook = on_exec
    claimed: set[int] = set()
    failed: list[int] = []

    def note_claim(conn: sa.Connection, _c: Any, _s: str, _p: Any, context: Any, _m: bool) -> None:
        if context.compiled is not None and context.compiled.statement is execution._CLAIM:
            claimed.add(id(conn.connection))  # what do_commit is given

    real_commit = database.engine.dialect.do_commit

    def commit_then_fail(dbapi_connection: Any) -> None:
        real_commit(dbapi_connection)
        if id(dbapi_connection) in claimed and not failed:
            failed.append(1)
            raise sa.exc.OperationalError("COMMIT", {}, Exception("connection lost after COMMIT"))

    sa.event.listen(database.engine, "after_cursor_execute", note_claim)
    monkeypatch.setattr(database.engine.dialect, "do_commit", commit_then_fail)
    dispatcher = Dispatcher(database, provider, ONE_REQUEST, worker_id="replica-0:0:w")
    try:
        with pytest.raises(sa.exc.OperationalError):
            dispatcher.run_once()
        assert failed and not runs
        assert {_row(database, i).state for i in ids} == {"running"}  # the commit held
        dispatcher.run_once()
        rows = [_row(database, i) for i in ids]
        assert [r.state for r in rows] == ["succeeded", "succeeded"]
        assert len(runs) == 2 and len(set(runs)) == 2
        assert all("GREETING" in command and "hi" in command for command in runs)
        assert all(r.env is None for r in rows)  # cleared again at the end
    finally:
        dispatcher.shutdown(timeout=10)
        database.dispose()


# -- PostgreSQL: results and the next claim in one statement -----------------------------------------
# (SQLite claims with a SELECT, then an UPDATE: these paths are PostgreSQL's alone)


@pytest.fixture
def pg_database(pg_url: str) -> Iterator[dbmod.Database]:
    """The session's PostgreSQL database, emptied."""
    database = dbmod.connect(pg_url)
    truncate_all(database)
    yield database
    database.dispose()


def test_one_statement_records_the_results_still_ours_and_claims(pg_database: dbmod.Database) -> None:
    """PostgreSQL's continuous mode records a slot's results and claims its next row in one
    statement. A result whose row is no longer this worker's (cancelled meanwhile) is left out of
    it (reported as not recorded: the caller drops it alone), the others are recorded with their
    event, and the claim holds: no row is written twice, none is lost."""
    database = pg_database
    mine, taken, queued = _one_lease_with_rows(database, "echo mine", "echo taken", "echo queued")
    worker = "replica-0:0:w"
    with database.session() as session:
        session.execute(
            sa.update(Execution)
            .where(Execution.id.in_((mine, taken)))
            .values(state="running", claimed_by=worker, sandbox_id="sb-1")
        )
        session.execute(sa.update(Execution).where(Execution.id == taken).values(state="cancelled"))
    dispatcher = Dispatcher(database, CountingProvider(), ONE_REQUEST, worker_id=worker)
    ok = execution.CommandOutcome(state="succeeded", exit_code=0, output="done")
    results = [execution.Finished(i, ok, "box", "sb-1") for i in (mine, taken)]
    try:
        with dispatcher._write() as conn:
            recorded, jobs, ended = dispatcher._finish_and_claim_in(conn, results, utcnow(), 2)
        assert recorded == {mine}
        assert [job.id for job in jobs] == [queued] and not ended
        rows = {i: _row(database, i) for i in (mine, taken, queued)}
        assert (rows[mine].state, rows[mine].output, rows[mine].exit_code) == ("succeeded", "done", 0)
        assert rows[taken].state == "cancelled" and rows[taken].output is None
        assert (rows[queued].state, rows[queued].claimed_by, rows[queued].sandbox_id) == (
            "running",
            worker,
            "sb-1",
        )
        with database.session(readonly=True) as session:
            events = session.execute(
                sa.select(Event.outcome, Event.message).where(Event.action == "exec")
            ).all()
        assert [tuple(e) for e in events] == [("succeeded", f"execution {mine}: exit 0")]
    finally:
        dispatcher.shutdown(timeout=10)


def test_one_statement_claims_the_next_row_of_the_lease_whose_row_it_records(
    pg_database: dbmod.Database,
) -> None:
    """Per-lease order (one at a time): the statement that records a lease's running row also
    claims that lease's next row, although its snapshot still sees the recorded row running, so a
    freed slot goes on with the lease at once instead of at the next poll."""
    database = pg_database
    first, second, third = _one_lease_with_rows(database, "echo 1", "echo 2", "echo 3")
    worker = "replica-0:0:w"
    with database.session() as session:
        session.execute(
            sa.update(Execution)
            .where(Execution.id == first)
            .values(state="running", claimed_by=worker, sandbox_id="sb-1")
        )
    ordered = ExecSettings(max_concurrent=2, per_lease_concurrency=1, session_min_timeout_seconds=100_000)
    dispatcher = Dispatcher(database, CountingProvider(), ordered, worker_id=worker)
    ok = execution.CommandOutcome(state="succeeded", exit_code=0, output="1")
    try:
        with dispatcher._write() as conn:
            recorded, jobs, _ = dispatcher._finish_and_claim_in(
                conn, [execution.Finished(first, ok, "box", "sb-1")], utcnow(), 2
            )
        assert recorded == {first}
        assert [job.id for job in jobs] == [second]  # the third waits for the second
        assert [_row(database, i).state for i in (first, second, third)] == ["succeeded", "running", "queued"]
    finally:
        dispatcher.shutdown(timeout=10)
