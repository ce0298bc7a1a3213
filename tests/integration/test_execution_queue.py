"""Competing dispatchers: two workers (each its own engine, as two replicas would be) draining 200
queued rows run every row exactly once, on PostgreSQL (FOR UPDATE SKIP LOCKED) and SQLite
(BEGIN IMMEDIATE)."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from controller import db as dbmod
from controller.config import ExecSettings
from controller.execution import Dispatcher
from controller.providers.base import ExecResult
from models import Execution, Lease, LeaseStatus

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
