"""Running commands on Ready leases: one command now, and the queue of ``executions`` rows.

Owns what happens between "run this command line on lease X" and a finished ``executions`` row:
the readiness check, the stdin file in the sandbox (uploaded, then always removed), the login-shell
script (built by :mod:`controller.execution_script`), the provider call with its time-out, the output
cap, the state the row ends in, its event, and keeping env values out of logs, events and rows.

Callers:

* ``leasectl exec`` calls :func:`~controller.execution_run.execute_now` (direct run, recorded as a
  row that is inserted ``running``; it lives in :mod:`controller.execution_run` with the other
  functions of one command, which import no SQLAlchemy, and is re-exported here; its rows go
  through :class:`DatabaseRows` or, on a plain URL, :mod:`controller.exec_rows`) or
  :func:`enqueue` + :func:`wait_for` (``--queue``);
* the daemon (every replica, not only the leader) and ``leasectl exec-worker`` run a
  :class:`Dispatcher`, which claims ``queued`` rows atomically (PostgreSQL ``FOR UPDATE SKIP LOCKED``,
  SQLite one ``BEGIN IMMEDIATE`` transaction) and runs them with bounded concurrency.

Idle leases (auto-stopped by Daytona on a lease with ``auto_stop_interval``, phase ``Idle``) are
runnable: :func:`wake` starts the sandbox on demand and waits until it is started, then the command
runs as on a Ready lease; the next reconcile pass shows the lease Ready again.

Row states (docs/execution.md has the diagram and the table of causes): ``queued -> running ->
succeeded | failed | timed_out | unknown | interrupted | cancelled | error``. ``running -> queued``
happens only when the attempt provably did not start the command (:func:`may_have_started` says no):
the row gets a back-off (``next_attempt_at``), ``attempts`` and an ``attempt_log`` entry, and ends
``error`` once ``exec.queue_wait_seconds`` have passed since its first attempt. An attempt the API
refused for its credentials (401/403) is retried the same way, not failed at once as ``leasectl exec``
does: the daemon's organization can be fixed while it runs (a suspension lifted, a permission
granted), and every such attempt is logged as a warning that names the key. A failure after the
request that starts the command was sent ends ``unknown`` and is never retried, so nothing runs
twice. ``queued -> error`` when the lease is missing, not desired running, expired, or not Ready
within ``exec.queue_wait_seconds`` of the row's ``created_at``; ``queued -> cancelled`` by an
operator. ``env`` and ``stdin`` are cleared when the row is claimed (and put back when it is queued
again) and at every terminal state.

Two paths. A command whose time-out is below ``exec.session_min_timeout_seconds`` runs in one request
(:func:`run_command`); longer ones run in a Daytona session (:func:`start_in_session`,
:func:`follow_session`): the row records ``session_id`` before the command is sent and
``command_id`` once it runs, and its output is written to the row every ``exec.log_poll_seconds``.

Ordering. An ``ordered`` row is claimed only when fewer than ``exec.per_lease_concurrency`` earlier
ordered rows of its lease are ``queued`` or ``running`` (checked inside the claim query).

Gone workers. ``claimed_by`` is ``host:pid:nonce`` (``detached:`` + that once a dispatcher handed a
session command over at shutdown). A dispatcher (at start, then once a minute) treats a ``running``
row claimed by someone else as gone when the claimer ran on this host and its process no longer
exists, when it was handed over, or when ``started_at + timeout + INTERRUPT_GRACE_SECONDS`` has passed.
A gone row with a session command id is re-attached (taken over with a conditional UPDATE and
followed to its end); one with only a session id ends ``unknown``; a one-request row ends
``interrupted``.

Cancelling a running command. Every command runs under a marker (:func:`execution_marker` from its row
id and claimer, or :func:`execution_marker_for_session` from its session id); :func:`stop_in_sandbox`
deletes its session if any and runs a second command through the toolbox that kills the marked
processes. ``leasectl exec`` does so on SIGINT/SIGTERM; :func:`cancel` (``leasectl cancel``) does so for
a running row, and a dispatcher does so for its own rows that were set ``cancelled`` (e.g. with SQL)
while they ran.

A worker that is still alive but was declared gone (clock skew, two hosts with one host name and
separate PID namespaces) finishes with a conditional UPDATE (``state = 'running' AND claimed_by =
me``) that then matches nothing: its result is logged and dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from controller import logs
from controller.config import ExecSettings
from controller.db import Database
from controller.errors import AUTH_HINT
from controller.execution_run import (  # noqa: F401  # one command; re-exported for the queue's callers
    DETACH,
    ERROR_MAX_CHARS,
    EXIT_TIMED_OUT,
    FIRST_POLL_SECONDS,
    LOST_GRACE_SECONDS,
    MAY_HAVE_RUN,
    NOT_STARTED,
    RUNNABLE_PHASES,
    STDIN_DIR,
    STOP_TIMEOUT_SECONDS,
    Clock,
    CommandOutcome,
    ExecRows,
    ExecutionError,
    InvalidCommandError,
    LeaseNotReadyError,
    StopCheck,
    Target,
    _detail,
    _drop_session,
    _LeaseView,
    _not_runnable,
    _redacted,
    _remove_stdin,
    _short_error,
    _StatusView,
    cap_output,
    check_env,
    command_line,
    event_message,
    execute_now,
    execution_marker,
    execution_marker_for_session,
    follow_session,
    make_worker_id,
    may_have_started,
    new_session_id,
    not_started,
    redact,
    redact_values,
    retry_delay,
    run_command,
    runnable_target,
    secret_values_of,
    session_stdin_path,
    start_in_session,
    stop_in_sandbox,
    storable,
    stored_result,
    wake,
)
from controller.providers.base import SandboxProvider
from models import Event, Execution, Lease, LeaseStatus, UTCDateTime, utcnow
from models.tables import EXECUTION_TERMINAL_STATES

log = logging.getLogger(__name__)

INTERRUPT_GRACE_SECONDS = 300.0
RECOVER_EVERY_SECONDS = 60.0
WRITE_LANES = 1  # PostgreSQL: group commits in progress at once (see Dispatcher.__init__)
WAIT_POLL_SECONDS = 0.5


def lease_secret_values(db: Database, lease_name: str) -> tuple[str, ...]:
    """The current values of the lease's secret references (``{from_env}``/``{from_file}`` in its
    env), as this process resolves them now: what stored output must not contain. One SELECT of the
    env column read as text, so a hand-written row that does not parse redacts nothing instead of
    failing the command; references that cannot be resolved here are skipped."""
    with db.session(readonly=True) as session:
        raw = session.connection().scalar(_LEASE_ENV, {"name": lease_name})
    return secret_values_of(raw)


# The direct path (``leasectl exec``: check, insert, record, finish) runs Core statements on the
# tables, never an ORM query or unit of work: configuring the mappers alone takes longer than the
# command `true` does. Only the lease columns the queue needs are read: a hand-written spec column
# (JSON that does not parse on SQLite, say) must not stop the queue; the reconciler reports such a
# row as Failed.
_LEASES = cast(sa.Table, Lease.__table__)
_STATUSES = cast(sa.Table, LeaseStatus.__table__)
_LEASE_RUNNABLE = sa.select(_LEASES.c.desired_state, _LEASES.c.expires_at).where(
    _LEASES.c.name == sa.bindparam("name")
)
_LEASE_ENV = sa.select(sa.cast(_LEASES.c.env, sa.Text)).where(_LEASES.c.name == sa.bindparam("name"))
_STATUS_TARGET = sa.select(_STATUSES.c.phase, _STATUSES.c.sandbox_id, _STATUSES.c.workspace_path).where(
    _STATUSES.c.lease_name == sa.bindparam("name")
)


def check_runnable(session: Session, lease_name: str, now: datetime | None = None) -> None:
    """LeaseNotReadyError if commands can never run on this lease as it is (missing, not desired
    running, expired); a lease that is merely still starting passes."""
    row = session.connection().execute(_LEASE_RUNNABLE, {"name": lease_name}).one_or_none()
    lease = _LeaseView(row.desired_state, row.expires_at) if row is not None else None
    problem = _not_runnable(lease_name, lease, now or utcnow())
    if problem is not None:
        raise LeaseNotReadyError(problem)


def ready_target(session: Session, lease_name: str, now: datetime | None = None) -> Target:
    """The sandbox of a Ready lease, or LeaseNotReadyError saying why not."""
    check_runnable(session, lease_name, now)
    found = session.connection().execute(_STATUS_TARGET, {"name": lease_name}).one_or_none()
    status = _StatusView(found.phase, found.sandbox_id, found.workspace_path) if found is not None else None
    return runnable_target(lease_name, status)


def _update(
    target: Session | sa.Connection, statement: sa.Update, parameters: Mapping[str, Any] | None = None
) -> int:
    """Run an UPDATE on the session's connection (Core: no ORM bulk-update bookkeeping, the queue
    never holds the rows as objects); return how many rows it changed."""
    conn = target.connection() if isinstance(target, Session) else target
    return conn.execute(statement, dict(parameters) if parameters is not None else None).rowcount


class _Superseded(sa.exc.SQLAlchemyError):
    """A fenced UPDATE run for several rows at once (executemany) matched fewer rows than it was
    given: one of them is no longer what the batch assumed. The transaction is rolled back and its
    rows are handled one by one."""


def _update_all(
    conn: sa.Connection, statement: sa.Update | sa.Insert, parameters: list[dict[str, Any]]
) -> None:
    """Run a fenced UPDATE once per parameter set in ONE executemany (one round trip, one statement
    to build), or raise :class:`_Superseded` when any of them did not match exactly one row."""
    if not parameters:
        return
    changed = conn.execute(statement, parameters[0] if len(parameters) == 1 else parameters).rowcount
    if changed != len(parameters):
        raise _Superseded(f"{changed} of {len(parameters)} rows matched")


# The statements a command runs through, built once: rebuilding them per command cost more CPU
# than running them (statement construction and cache keys), on the path the queue's throughput
# depends on. Parameters are bound per call.
_EXECUTIONS = cast(sa.Table, Execution.__table__)
_FINISH = (
    sa.update(_EXECUTIONS)
    .where(
        _EXECUTIONS.c.id == sa.bindparam("b_id"),
        _EXECUTIONS.c.state == "running",
        _EXECUTIONS.c.claimed_by == sa.bindparam("b_worker"),
    )
    .values(
        state=sa.bindparam("state"),
        exit_code=sa.bindparam("exit_code"),
        output=sa.bindparam("output"),
        output_truncated=sa.bindparam("output_truncated"),
        error=sa.bindparam("error"),
        finished_at=sa.bindparam("finished_at"),
        env=sa.null(),
        stdin=sa.null(),
    )
)
_EVENTS = cast(sa.Table, Event.__table__)
_INSERT_EVENT = sa.insert(_EVENTS)
# PostgreSQL: the fenced result UPDATE and its event in one statement (a data-modifying CTE), so
# the event exists exactly when the UPDATE matched: one statement and one round trip per group
# commit fewer. Its row count is the number of rows updated.
_FINISHED = _FINISH.returning(_EXECUTIONS.c.lease_name, _EXECUTIONS.c.sandbox_id).cte("finished")
_FINISH_WITH_EVENT = (
    sa.insert(_EVENTS)
    .from_select(
        ["lease_name", "sandbox_id", "action", "outcome", "message", "controller_id"],
        sa.select(
            _FINISHED.c.lease_name,
            _FINISHED.c.sandbox_id,
            sa.literal("exec", sa.String()),
            sa.bindparam("e_outcome", type_=sa.String()),
            sa.bindparam("e_message", type_=sa.Text()),
            sa.bindparam("e_worker", type_=sa.String()),
        ),
    )
    # an executemany INSERT's row count is kept only when asked for (psycopg sums it)
    .execution_options(preserve_rowcount=True)
)
_CLAIM = (
    sa.update(_EXECUTIONS)
    .where(_EXECUTIONS.c.id == sa.bindparam("b_id"), _EXECUTIONS.c.state == "queued")
    .values(
        state="running",
        claimed_by=sa.bindparam("claimed_by"),
        started_at=sa.bindparam("started_at"),
        sandbox_id=sa.bindparam("sandbox_id"),
        next_attempt_at=None,
        env=sa.null(),
        stdin=sa.null(),
    )
)


def _constant(value: str) -> sa.ColumnElement[str]:
    """A string constant written into the SQL text instead of bound: PostgreSQL's generic plan of a
    prepared statement can then use an index whose predicate names it (``state = 'queued'``), and
    no parameter is expanded per execution. Only for the module's own constants (quoted as is)."""
    assert "'" not in value
    return sa.literal_column(f"'{value}'", sa.String())


_QUEUED = _constant("queued")
_RUNNABLE = [_constant(phase) for phase in RUNNABLE_PHASES]


# PostgreSQL, continuous mode: a slot's results and its next claim in ONE statement. The results
# arrive as one JSON array of records (any number of rows, one parameter: cheaper to send than an
# array per column); the fenced UPDATE of the rows still running under this worker, the INSERT of
# their events and the claim are data-modifying CTEs of one SELECT, which returns the ids recorded
# on every row (``array_agg``) beside the claimed rows (none: one row of NULLs). A result whose
# row is no longer ours is left out, not an error: the caller records it alone (dropped, its
# secrets cleared), as before.
_RESULTS = (
    sa.func.json_to_recordset(sa.cast(sa.bindparam("b_results", type_=sa.Text()), sa.JSON()))
    .table_valued(
        sa.column("id", sa.BigInteger()),
        sa.column("state", sa.String()),
        sa.column("exit_code", sa.Integer()),
        sa.column("output", sa.Text()),
        sa.column("output_truncated", sa.Boolean()),
        sa.column("error", sa.Text()),
        sa.column("message", sa.Text()),
        name="results",
    )
    .render_derived(with_types=True)
)
_RECORDED = (
    sa.update(_EXECUTIONS)
    .where(
        _EXECUTIONS.c.id == _RESULTS.c.id,
        _EXECUTIONS.c.state == _constant("running"),
        _EXECUTIONS.c.claimed_by == sa.bindparam("b_worker"),
    )
    .values(
        state=_RESULTS.c.state,
        exit_code=_RESULTS.c.exit_code,
        output=_RESULTS.c.output,
        output_truncated=_RESULTS.c.output_truncated,
        error=_RESULTS.c.error,
        finished_at=sa.bindparam("b_finished_at", type_=UTCDateTime()),
        env=sa.null(),
        stdin=sa.null(),
    )
    .returning(
        _EXECUTIONS.c.id,
        _EXECUTIONS.c.lease_name,
        _EXECUTIONS.c.sandbox_id,
        _RESULTS.c.state.label("outcome"),
        _RESULTS.c.message,
    )
    .cte("recorded")
)
_RECORDED_EVENTS = (
    sa.insert(_EVENTS)
    .from_select(
        ["lease_name", "sandbox_id", "action", "outcome", "message", "controller_id"],
        sa.select(
            _RECORDED.c.lease_name,
            _RECORDED.c.sandbox_id,
            _constant("exec"),
            _RECORDED.c.outcome,
            _RECORDED.c.message,
            sa.bindparam("b_worker", type_=sa.String()),
        ),
    )
    .cte("recorded_events")
)


def _finish_and_claim_statement(claim: sa.Update) -> sa.Select[Any]:
    """The results + claim statement around a dispatcher's claim (``UPDATE ... RETURNING``)."""
    claimed = claim.cte("claimed")
    recorded = sa.select(sa.func.array_agg(_RECORDED.c.id).label("finished_ids")).subquery("done")
    return (
        sa.select(recorded.c.finished_ids, *claimed.c)
        .select_from(recorded.outerjoin(claimed, sa.true()))
        .add_cte(_RECORDED_EVENTS)
    )


def _results_json(results: list[Finished], max_output_bytes: int) -> str:
    """``results`` as the JSON records :data:`_RESULTS` reads (capped, made storable: no NUL, no
    lone surrogate)."""
    records = []
    for item in results:
        outcome = item.outcome
        output, truncated = cap_output(storable(outcome.output), max_output_bytes)
        detail = _detail(outcome)
        records.append(
            {
                "id": item.execution_id,
                "state": outcome.state,
                "exit_code": outcome.exit_code,
                "output": output,
                "output_truncated": truncated or outcome.output_truncated,
                "error": storable(outcome.error) if outcome.error is not None else None,
                "message": f"execution {item.execution_id}" + (f": {detail}" if detail else ""),
            }
        )
    return json.dumps(records, ensure_ascii=False)


# The polls' reads, built once: a poll runs them every exec.poll_interval_seconds.
_ANY_QUEUED = sa.select(_EXECUTIONS.c.id).where(_EXECUTIONS.c.state == _QUEUED).limit(1)
_CANCELLED_AMONG = sa.select(_EXECUTIONS.c.id).where(
    _EXECUTIONS.c.id.in_(sa.bindparam("ids", expanding=True)),
    _EXECUTIONS.c.state == "cancelled",
    _EXECUTIONS.c.session_id.is_(None),
)


def _finish_values(
    outcome: CommandOutcome, now: datetime, max_output_bytes: int, secrets: Sequence[str] = ()
) -> dict[str, Any]:
    return stored_result(outcome, now, max_output_bytes, secrets) | {"env": sa.null(), "stdin": sa.null()}


def _event(
    session: Session | sa.Connection,
    execution_id: int,
    lease_name: str,
    sandbox_id: str | None,
    outcome: str,
    detail: str | None,
    controller_id: str,
) -> None:
    message = f"execution {execution_id}" + (f": {detail}" if detail else "")
    # A Core INSERT in the same transaction: no unit-of-work flush for an append-only row.
    conn = session.connection() if isinstance(session, Session) else session
    conn.execute(
        _INSERT_EVENT,
        {
            "lease_name": lease_name,
            "sandbox_id": sandbox_id,
            "action": "exec",
            "outcome": outcome,
            "message": message,
            "controller_id": controller_id,
        },
    )


def finish(
    db: Database,
    execution_id: int,
    worker_id: str,
    outcome: CommandOutcome,
    *,
    lease_name: str,
    sandbox_id: str | None,
    max_output_bytes: int,
    clock: Clock = utcnow,
    secrets: Sequence[str] = (),
) -> bool:
    """Record the outcome of a row this worker claimed; False if the row is no longer ours.

    ``secrets`` (:func:`lease_secret_values`) are masked in the stored output and error."""
    now = clock()
    values = _finish_values(outcome, now, max_output_bytes, secrets)
    del values["env"], values["stdin"]  # cleared by _FINISH itself
    with db.session() as session:
        done = _update(session, _FINISH, {"b_id": execution_id, "b_worker": worker_id, **values})
        if done == 1:
            detail = _detail(_redacted(outcome, secrets))
            _event(session, execution_id, lease_name, sandbox_id, outcome.state, detail, worker_id)
            return True
    with db.session() as session:  # someone else ended it (interrupted, cancelled): still no secrets
        _update(
            session,
            sa.update(_EXECUTIONS)
            .where(_EXECUTIONS.c.id == execution_id)
            .values(env=sa.null(), stdin=sa.null()),
        )
        state = session.connection().scalar(
            sa.select(_EXECUTIONS.c.state).where(_EXECUTIONS.c.id == execution_id)
        )
    log.warning(
        "execution %d finished as %s but is now %s: result dropped", execution_id, outcome.state, state
    )
    return False


class DatabaseRows(ExecRows):
    """:func:`execute_now`'s rows through SQLAlchemy Core (no ORM query, no mapper configured): for
    callers holding a :class:`Database`, and ``leasectl exec`` on a URL that
    :mod:`controller.exec_rows` does not open with the driver."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def ready_target(self, lease_name: str, now: datetime) -> Target:
        with self.db.session() as session:  # a writing session: the schema guard runs first
            return ready_target(session, lease_name, now)

    def secret_values(self, lease_name: str) -> tuple[str, ...]:
        return lease_secret_values(self.db, lease_name)

    def insert_running(
        self,
        *,
        lease_name: str,
        command: str,
        cwd: str | None,
        timeout_seconds: int,
        worker: str,
        sandbox_id: str,
        now: datetime,
    ) -> int:
        with self.db.session() as session:
            inserted = session.connection().execute(
                sa.insert(_EXECUTIONS).values(
                    lease_name=lease_name,
                    command=command,
                    cwd=cwd,
                    timeout_seconds=timeout_seconds,
                    state="running",
                    claimed_by=worker,
                    sandbox_id=sandbox_id,
                    created_at=now,
                    started_at=now,
                )
            )
            key = inserted.inserted_primary_key
            assert key is not None
            return int(key[0])

    def record(self, execution_id: int, worker: str, values: Mapping[str, Any]) -> None:
        with self.db.session() as session:
            _update(
                session,
                sa.update(_EXECUTIONS)
                .where(
                    _EXECUTIONS.c.id == execution_id,
                    _EXECUTIONS.c.state == "running",
                    _EXECUTIONS.c.claimed_by == worker,
                )
                .values(**values),
            )

    def finish(
        self,
        execution_id: int,
        worker: str,
        outcome: CommandOutcome,
        *,
        lease_name: str,
        sandbox_id: str | None,
        max_output_bytes: int,
        clock: Clock = utcnow,
        secrets: Sequence[str] = (),
    ) -> bool:
        return finish(
            self.db,
            execution_id,
            worker,
            outcome,
            lease_name=lease_name,
            sandbox_id=sandbox_id,
            max_output_bytes=max_output_bytes,
            clock=clock,
            secrets=secrets,
        )


@dataclass(frozen=True)
class Finished:
    """One outcome to record with :func:`finish_many`."""

    execution_id: int
    outcome: CommandOutcome
    lease_name: str
    sandbox_id: str | None


def finish_many(
    db: Database, worker_id: str, results: list[Finished], *, max_output_bytes: int, clock: Clock = utcnow
) -> list[int]:
    """Record several outcomes of rows this worker claimed in ONE transaction (a group commit): one
    fenced UPDATE for all rows (executemany), one INSERT of all their events. If a row is no longer
    ours (someone else ended it) or the transaction fails, nothing of it is kept and every id is
    returned: the caller records them one by one with :func:`finish`, which drops the result of a
    row no longer ours and clears its secrets."""
    try:
        with db.write() as conn:
            _finish_in(conn, worker_id, results, clock(), max_output_bytes)
    except _Superseded:
        return [item.execution_id for item in results]
    return []


def _finish_in(
    conn: sa.Connection, worker_id: str, results: list[Finished], now: datetime, max_output_bytes: int
) -> None:
    """:func:`finish_many` inside the caller's transaction; :class:`_Superseded` when a row of the
    batch is no longer running under this worker (the caller rolls back)."""
    updates: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for item in results:
        values = _finish_values(item.outcome, now, max_output_bytes)
        del values["env"], values["stdin"]  # cleared by _FINISH itself
        detail = _detail(item.outcome)
        message = f"execution {item.execution_id}" + (f": {detail}" if detail else "")
        updates.append({"b_id": item.execution_id, "b_worker": worker_id, **values})
        events.append(
            {
                "lease_name": item.lease_name,
                "sandbox_id": item.sandbox_id,
                "action": "exec",
                "outcome": item.outcome.state,
                "message": message,
                "controller_id": worker_id,
            }
        )
    if conn.dialect.name == "postgresql":
        _update_all(
            conn,
            _FINISH_WITH_EVENT,
            [
                u | {"e_outcome": e["outcome"], "e_message": e["message"], "e_worker": worker_id}
                for u, e in zip(updates, events, strict=True)
            ],
        )
        return
    _update_all(conn, _FINISH, updates)
    if events:
        conn.execute(_INSERT_EVENT, events)


def enqueue(
    db: Database,
    *,
    lease_name: str,
    command: str,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout_seconds: int | None = None,
    ordered: bool = True,
    clock: Clock = utcnow,
) -> int:
    """Insert a ``queued`` row (env and command validated first); return its id. An ``ordered`` row
    waits for earlier ordered rows of its lease (``exec.per_lease_concurrency``)."""
    variables = check_env(env or {})
    command_line(command, cwd=cwd, env=variables)
    with db.session() as session:
        row = Execution(
            lease_name=lease_name,
            command=command,
            cwd=cwd,
            env=variables or None,
            stdin=stdin,
            timeout_seconds=timeout_seconds,
            state="queued",
            ordered=ordered,
            created_at=clock(),
        )
        session.add(row)
        session.flush()
        return row.id


@dataclass(frozen=True)
class ExecutionRecord:
    """A finished (or current) row, without env and stdin."""

    id: int
    lease_name: str
    state: str
    exit_code: int | None
    output: str | None
    output_truncated: bool
    error: str | None

    @property
    def outcome(self) -> CommandOutcome:
        return CommandOutcome(
            state=self.state,
            exit_code=self.exit_code,
            output=self.output or "",
            output_truncated=self.output_truncated,
            error=self.error,
        )


def get_record(db: Database, execution_id: int) -> ExecutionRecord | None:
    with db.session() as session:
        row = session.get(Execution, execution_id)
        if row is None:
            return None
        return ExecutionRecord(
            row.id, row.lease_name, row.state, row.exit_code, row.output, row.output_truncated, row.error
        )


def wait_for(
    db: Database,
    execution_id: int,
    *,
    poll_seconds: float = WAIT_POLL_SECONDS,
    timeout_seconds: float | None = None,
    on_output: Callable[[str], None] | None = None,
) -> ExecutionRecord:
    """Poll until the row reaches a terminal state; TimeoutError after ``timeout_seconds``.
    ``on_output(text)`` gets the row's output whenever it changed while the row was running."""
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    seen = ""
    while True:
        record = get_record(db, execution_id)
        if record is None:
            raise ExecutionError(f"execution {execution_id} disappeared from the database")
        if on_output is not None and record.state == "running" and (record.output or "") != seen:
            seen = record.output or ""
            on_output(seen)
        if record.state in EXECUTION_TERMINAL_STATES:
            return record
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"execution {execution_id} still {record.state}")
        time.sleep(poll_seconds)


def cancel_if_queued(db: Database, execution_id: int, clock: Clock = utcnow) -> bool:
    """Cancel a row that no one claimed yet; False if it already started or ended."""
    with db.session() as session:
        result = _update(
            session,
            sa.update(Execution)
            .where(Execution.id == execution_id, Execution.state == "queued")
            .values(state="cancelled", finished_at=clock(), env=sa.null(), stdin=sa.null()),
        )
        return result == 1


@dataclass(frozen=True)
class Cancelled:
    """What :func:`cancel` did to a row: ``was`` its state before (``queued`` or ``running``)."""

    id: int
    lease_name: str
    was: str
    sandbox_id: str | None
    marker: str | None  # set when it was running: stop_in_sandbox(sandbox_id, marker, session_id)
    session_id: str | None = None


def cancel(db: Database, execution_id: int, *, by: str, clock: Clock = utcnow) -> Cancelled:
    """Set a queued or running row ``cancelled`` (env and stdin cleared, event written).

    ExecutionError when the row does not exist or has already ended. A running command keeps
    running until someone calls :func:`stop_in_sandbox` with the returned marker (``leasectl cancel``
    does at once; its dispatcher does within one poll).
    """
    with db.session() as session:
        row = session.get(Execution, execution_id)
        if row is None:
            raise ExecutionError(f"no such execution: {execution_id}")
        if row.state not in ("queued", "running"):
            raise ExecutionError(f"execution {execution_id} already ended ({row.state})")
        was, claimed_by, sandbox_id, session_id = row.state, row.claimed_by, row.sandbox_id, row.session_id
        reason = "cancelled by an operator" + (" while running" if was == "running" else "")
        done = _update(
            session,
            sa.update(Execution)
            .where(Execution.id == execution_id, Execution.state == was)
            .values(state="cancelled", error=reason, finished_at=clock(), env=sa.null(), stdin=sa.null()),
        )
        if done != 1:
            raise ExecutionError(f"execution {execution_id} changed state meanwhile; look again")
        _event(session, execution_id, row.lease_name, sandbox_id, "cancelled", reason, by)
        lease_name = row.lease_name
    marker: str | None = None
    if was == "running":
        marker = (
            execution_marker_for_session(session_id)
            if session_id
            else execution_marker(execution_id, claimed_by)
        )
    return Cancelled(
        execution_id, lease_name, was, sandbox_id, marker, session_id if was == "running" else None
    )


# -- the queue -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A claimed row, held in memory: the row itself no longer carries env or stdin."""

    id: int
    lease_name: str
    sandbox_id: str
    workspace: str | None
    command: str
    cwd: str | None
    env: Mapping[str, str] = field(repr=False)
    stdin: bytes | None = field(repr=False)
    timeout_seconds: int
    idle: bool = False  # the lease was Idle when claimed: start its sandbox first
    created_at: datetime | None = None
    claimed_at: datetime | None = None
    attempts: int = 0
    attempt_log: tuple[Mapping[str, str], ...] = ()
    # set when this worker re-attaches to a command another worker started in a session
    session_id: str | None = None
    command_id: str | None = None
    started_at: datetime | None = None
    has_stdin: bool = False
    # what the lease's secret references resolve to now: masked in everything stored or printed
    secrets: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class _Owed:
    """A write a failed transaction left undone, retried at every poll (see ``Dispatcher._owed``):
    ``finish`` a result, ``requeue`` an attempt that did not start (:meth:`Dispatcher._retry_or_fail`),
    ``detach`` a session command at shutdown, or ``unclaim`` a row whose claim's commit failed."""

    kind: str
    job: Job
    outcome: CommandOutcome | None = None
    at: datetime | None = None  # when the result arrived (its finished_at)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True


def _parse_worker(worker: str | None) -> tuple[str, int] | None:
    if not worker:
        return None
    host, _, rest = worker.partition(":")
    pid, _, _ = rest.partition(":")
    return (host, int(pid)) if host and pid.isdigit() else None


class Dispatcher:
    """Claims ``queued`` executions and runs them, at most ``exec.max_concurrent`` at once.

    Thread-safe: :meth:`run_once` may be called from a scheduler job while another call is in
    progress. One dispatcher per process is enough; any number may run against one database.
    """

    def __init__(
        self,
        db: Database,
        provider: SandboxProvider,
        settings: ExecSettings,
        worker_id: str | None = None,
        *,
        clock: Clock = utcnow,
        interrupt_grace_seconds: float = INTERRUPT_GRACE_SECONDS,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        self.provider = provider
        self.settings = settings
        self.worker_id = worker_id or make_worker_id()
        self._clock = clock
        self._grace = interrupt_grace_seconds
        self._rng = rng or random.Random()
        self._host = socket.gethostname()
        # ``_lock`` guards the in-memory state only (slots, running jobs, counters) and is never held
        # across I/O: a command that ends or starts never waits for a transaction. A claim reserves
        # the free slots it asks for (``_taken``) before its transaction and gives back what it did
        # not fill, so claims may overlap without ever running more than ``max_concurrent``;
        # shutdown waits for the claims in progress (``_claims``) to start what they claimed.
        self._lock = threading.Lock()
        self._claims_done = threading.Condition(self._lock)
        self._claims = 0
        self._polling = threading.Lock()  # one poll (recovery, sweeps, claim) at a time
        self._processed = 0  # rows processed by claims and recovery
        self._inflight: set[Future[None]] = set()
        self._closed = False
        self._last_recover = float("-inf")
        self._running: dict[int, Job] = {}
        self._stopping: set[int] = set()
        self._taken = 0  # slots holding a job (submitted, not yet finished)
        self._refill = False  # set by run_once(wait=False): a freed slot claims the next row at once
        self._more = False  # the last claim filled every slot it asked for: more may be runnable
        # Twice the slots: a thread recording a result while the slot's next command already runs.
        self._claim_select: sa.Select[Any] | None = None
        self._claim_runnable: sa.Update | None = None  # PostgreSQL: claim by one UPDATE ... RETURNING
        self._finish_and_claim: sa.Select[Any] | None = None  # PostgreSQL: results + claim, one statement
        # SQLite has one writer: this process's claims and results take turns here instead of in
        # SQLite's busy handler, whose sleeps (up to tens of ms) would idle a slot. PostgreSQL
        # writes rows, not the database: no turn-taking there.
        self._writes: Any = threading.Lock() if db.is_sqlite else contextlib.nullcontext()
        self._results: list[tuple[Job, CommandOutcome]] = []  # finished, not yet written
        self._results_lock = threading.Lock()
        # Group commits (results, and in continuous mode the claim for the slots freed meanwhile)
        # run in up to WRITE_LANES transactions at once on PostgreSQL; results that arrive
        # meanwhile join the next one. One lane since a slot's results and claim are one statement:
        # a second lane halved the batches (1.3 -> 0.8 statements per command in the bench), and
        # on a host whose CPUs the commands saturate, each transaction's CPU (client and server)
        # cost more than waiting one short transaction. SQLite: one (one writer).
        self._lanes = threading.BoundedSemaphore(1 if db.is_sqlite else WRITE_LANES)
        # The claims' and results' transactions run on connections this dispatcher keeps checked
        # out (one per transaction at once): a checkout costs a ping (a round trip) on PostgreSQL.
        self._connections: list[sa.Connection] = []
        # Writes this dispatcher owes the database (guarded by ``_lock``), by row id: results (and
        # retries, hand-overs) a failed transaction did not record, and claims whose commit failed
        # (in doubt: the row may be ``running`` under this worker though nothing was started). Such
        # a row is ``running`` under a live worker, which other workers leave alone until its
        # time-out plus INTERRUPT_GRACE_SECONDS: so this worker retries them at every poll.
        self._owed: dict[int, _Owed] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=2 * settings.max_concurrent, thread_name_prefix="leasectl-exec"
        )

    # -- public ----------------------------------------------------------------------------------

    def run_once(self, *, wait: bool = True) -> int:
        """Claim what can run now (up to the free slots) and start it; return how many rows were
        processed (started, re-attached, or ended without running). With ``wait`` (the default),
        return only once the commands started by this call have finished. Without it, the
        dispatcher runs continuously: a slot that frees up claims its next row at once."""
        started: list[Future[None]] = []
        processed = self._poll(started, refill=not wait)
        if wait and started:
            futures.wait(started)
        return processed

    def _poll(self, started: list[Future[None]], *, refill: bool) -> int:
        """One round of :meth:`run_once`: the writes owed since a failed transaction, recovery when
        due, cancelled commands, then a claim for the free slots (none when every slot is busy: not
        even the read)."""
        processed = 0
        with self._polling:
            with self._lock:
                if self._closed:
                    return 0
                self._refill = refill
                self._inflight = {f for f in self._inflight if not f.done()}
                recover = time.monotonic() - self._last_recover >= RECOVER_EVERY_SECONDS
                running = bool(self._running)
                owed = bool(self._owed)
            if owed and not self._pay_owed():
                return 0  # the database still refuses writes: nothing else would succeed either
            if recover:
                processed += self._recover(started)
                self._sweep_cancelled()
            if running:
                self._stop_cancelled()
            if self._free() > 0 and self._anything_queued():
                processed += self._fill(started)
        return processed

    def _free(self) -> int:
        with self._lock:
            return self.settings.max_concurrent - self._taken

    def _reserve(self, limit: int | None = None) -> int:
        """Reserve the free slots (at most ``limit``) for a claim about to run; how many (0: none,
        no claim)."""
        with self._lock:
            free = 0 if self._closed else self.settings.max_concurrent - self._taken
            if limit is not None:
                free = min(free, limit)
            if free > 0:
                self._taken += free
                self._claims += 1
            return max(free, 0)

    def _start(self, reserved: int, jobs: list[Job], processed: int) -> list[Future[None]]:
        """After a claim's commit: start its jobs on the slots it reserved, give back the others."""
        with self._lock:
            started = [self._submit(job, reserved=True) for job in jobs]
            self._taken -= reserved - len(jobs)
            self._processed += processed
            self._claims -= 1
            self._claims_done.notify_all()
        return started

    def _fill(self, started: list[Future[None]]) -> int:
        """Claim rows for the free slots and start them; rows processed."""
        processed = 0
        self._more = False
        budget: int | None = None  # the slots free at the start: slots that free up meanwhile wait
        while (free := self._reserve(budget)) > 0:
            jobs: list[Job] = []
            ended = 0
            try:
                with self._writes:
                    jobs, ended = self._claim(free)
            finally:
                started.extend(self._start(free, jobs, len(jobs) + ended))
            processed += len(jobs) + ended
            if len(jobs) + ended < free:
                return processed  # nothing more is runnable now
            budget = free - len(jobs)  # rows that ended in error took no slot: claim again
        self._more = True
        return processed

    def _refill_slot(self) -> None:
        """A slot just freed up while the dispatcher runs continuously (``run_once(wait=False)``,
        the daemon's way, or :meth:`drain`): claim the next runnable row now instead of at the next
        poll, unless the last claim already found fewer runnable rows than slots (then the next
        poll looks)."""
        if self._closed or not self._refill or not self._more:
            return
        try:
            self._fill([])
        except sa.exc.SQLAlchemyError as exc:
            self._more = False  # the next poll tries again
            log.warning("execution dispatcher: database error: %s", str(exc).splitlines()[0])

    def drain(self) -> int:
        """Run everything runnable now (and wait for the commands this dispatcher runs, re-attached
        ones included), then return the number of rows processed. Continuous like the daemon's
        polling: a freed slot claims the next row at once, and every ``exec.poll_interval_seconds``
        while commands run (or as soon as they all ended) a poll stops cancelled commands, recovers
        rows of gone workers when due and claims for free slots. It returns once a claim found
        nothing while nothing ran."""
        first = self._processed
        while True:
            mark = self._processed
            idle = not self._pending()
            self._poll([], refill=True)
            # Done when a claim found nothing while nothing ran: a command that ended during or
            # after the claim may have made another row runnable (per-lease order), so look again.
            if (idle and self._processed == mark) or self._closed:
                return self._processed - first
            next_poll = time.monotonic() + self.settings.poll_interval_seconds
            while (pending := self._pending()) and (left := next_poll - time.monotonic()) > 0:
                futures.wait(pending, timeout=left)

    def _pending(self) -> list[Future[None]]:
        with self._lock:
            return [f for f in self._inflight if not f.done()]

    def run_forever(self, stop: threading.Event) -> None:
        """Poll every ``exec.poll_interval_seconds`` until ``stop`` is set, then shut down."""
        try:
            while not stop.is_set():
                try:
                    self.run_once(wait=False)
                except sa.exc.SQLAlchemyError as exc:
                    log.warning("execution dispatcher: database error: %s", str(exc).splitlines()[0])
                stop.wait(self.settings.poll_interval_seconds)
        finally:
            self.shutdown()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop claiming; wait up to ``timeout`` seconds for running commands. True if all ended.

        Session commands are not waited for: their rows are handed over (``claimed_by`` becomes
        ``detached:<worker>``) and the next dispatcher re-attaches to them at once. Rows of one-request
        commands still running when the process exits become ``interrupted`` at the next start.
        """
        with self._lock:
            self._closed = True
            while self._claims:  # a claim in progress starts what it claimed first
                self._claims_done.wait()
            pending = {f for f in self._inflight if not f.done()}
        _, not_done = futures.wait(pending, timeout=timeout) if pending else (set(), set())
        self._pool.shutdown(wait=not not_done, cancel_futures=True)
        if self._owed:  # a last try; what is still owed is recovered by the next dispatcher
            self._pay_owed()
        with self._lock:
            held, self._connections = self._connections, []
        for conn in held:
            conn.close()
        if not_done:
            log.warning("execution dispatcher: %d command(s) still running at shutdown", len(not_done))
        return not not_done

    def recover_interrupted(self) -> int:
        """Deal with ``running`` rows whose worker is gone (see the module docstring): re-attach to
        their session command, or mark them ``unknown`` / ``interrupted``. Returns how many."""
        started: list[Future[None]] = []
        with self._polling:
            if self._closed:
                return 0
            return self._recover(started)

    # -- internals -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A writing Core transaction (as :meth:`Database.write`) on a connection this dispatcher
        keeps between transactions; one that failed is given back to the pool instead (it may be
        broken; the pool's checkout ping sorts that out)."""
        with self._lock:
            conn = self._connections.pop() if self._connections else None
        if conn is None:
            conn = self.db.writer()
        try:
            with conn.begin():
                yield conn
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if self._closed:
                conn.close()
            else:
                self._connections.append(conn)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """A reading transaction for the polls' small reads: on PostgreSQL on a connection this
        dispatcher keeps (a pool checkout costs a ping, a round trip, at every poll); on SQLite a
        plain one (a kept connection begins ``BEGIN IMMEDIATE``: a read must not take the lock)."""
        if self.db.is_sqlite:
            with self.db.read() as conn:
                yield conn
            return
        with self._write() as conn:
            yield conn

    def _submit(self, job: Job, *, reserved: bool = False) -> Future[None]:
        """Start a claimed job on a slot (under ``_lock``); ``reserved``: its claim took the slot."""
        if not reserved:
            self._taken += 1
        self._running[job.id] = job
        future = self._pool.submit(self._run, job)
        self._inflight.add(future)
        return future

    def _recover(self, started: list[Future[None]]) -> int:
        self._last_recover = time.monotonic()
        now = self._clock()
        marked: list[tuple[int, str, str, str]] = []
        attach: list[Job] = []
        with self.db.session() as session:
            rows = session.execute(
                sa.select(
                    Execution.id,
                    Execution.lease_name,
                    Execution.sandbox_id,
                    Execution.claimed_by,
                    Execution.started_at,
                    Execution.created_at,
                    Execution.timeout_seconds,
                    Execution.session_id,
                    Execution.command_id,
                    Execution.command,
                    Execution.stdin.is_not(None).label("has_stdin"),
                ).where(Execution.state == "running")
            ).all()
            for row in rows:
                if row.claimed_by == self.worker_id:
                    continue
                reason = self._gone(row.claimed_by, row.started_at, row.timeout_seconds, now)
                if reason is None:
                    continue
                same_claim = (
                    Execution.claimed_by.is_(None)
                    if row.claimed_by is None
                    else Execution.claimed_by == row.claimed_by
                )
                guard = sa.update(Execution).where(
                    Execution.id == row.id, Execution.state == "running", same_claim
                )
                if row.session_id and row.command_id and row.sandbox_id:
                    if _update(session, guard.values(claimed_by=self.worker_id)) != 1:
                        continue
                    detail = f"re-attached to session command {row.command_id} ({reason})"
                    _event(
                        session, row.id, row.lease_name, row.sandbox_id, "reattached", detail, self.worker_id
                    )
                    attach.append(
                        Job(
                            id=row.id,
                            lease_name=row.lease_name,
                            sandbox_id=row.sandbox_id,
                            workspace=None,
                            command=row.command,
                            cwd=None,
                            env={},
                            stdin=None,
                            timeout_seconds=row.timeout_seconds or self.settings.default_timeout_seconds,
                            created_at=row.created_at,
                            session_id=row.session_id,
                            command_id=row.command_id,
                            started_at=row.started_at,
                            has_stdin=bool(row.has_stdin),
                            secrets=lease_secret_values(self.db, row.lease_name),
                        )
                    )
                    marked.append((row.id, row.lease_name, "reattached", detail))
                    continue
                state = "unknown" if row.session_id else "interrupted"
                if row.session_id:
                    reason = (
                        f"its worker died while starting it in session {row.session_id} ({reason}); "
                        f"{MAY_HAVE_RUN}"
                    )
                values = {
                    "state": state,
                    "error": reason,
                    "finished_at": now,
                    "env": sa.null(),
                    "stdin": sa.null(),
                }
                if _update(session, guard.values(**values)) == 1:
                    _event(session, row.id, row.lease_name, row.sandbox_id, state, reason, self.worker_id)
                    marked.append((row.id, row.lease_name, state, reason))
        for execution_id, lease_name, state, reason in marked:
            with logs.bound(lease=lease_name):
                log.warning("execution %d: %s: %s", execution_id, state, reason)
        with self._lock:
            started.extend(self._submit(job) for job in attach)
            self._processed += len(marked)
        return len(marked)

    def _gone(
        self, claimed_by: str | None, started_at: datetime | None, timeout: int | None, now: datetime
    ) -> str | None:
        if claimed_by is not None and claimed_by.startswith(DETACHED_PREFIX):
            return f"its worker {claimed_by.removeprefix(DETACHED_PREFIX)} handed it over at shutdown"
        parsed = _parse_worker(claimed_by)
        if parsed is not None and parsed[0] == self._host and not _pid_alive(parsed[1]):
            return f"interrupted: its worker {claimed_by} is gone (process {parsed[1]} has ended)"
        limit = (timeout or self.settings.default_timeout_seconds) + self._grace
        if started_at is None or now - started_at > timedelta(seconds=limit):
            return (
                f"interrupted: its worker {claimed_by or '(none)'} did not finish it within "
                f"its time-out plus {self._grace:g} s"
            )
        return None

    def _stop_cancelled(self) -> None:
        """Stop, in the sandbox, one-request commands of this dispatcher whose rows were cancelled
        meanwhile (session commands are stopped by their follower)."""
        with self._lock:
            ids = [i for i, job in self._running.items() if i not in self._stopping and not job.session_id]
        if not ids:
            return
        with self._read() as conn:
            cancelled = conn.scalars(_CANCELLED_AMONG, {"ids": ids}).all()
        for execution_id in cancelled:
            with self._lock:
                job = self._running.get(execution_id)
                if job is None:
                    continue
                self._stopping.add(execution_id)
            marker = execution_marker(job.id, self.worker_id)
            with logs.bound(lease=job.lease_name):
                log.info("execution %d: cancelled while running; stopping it in the sandbox", job.id)
            threading.Thread(
                target=stop_in_sandbox,
                args=(self.provider, job.sandbox_id, marker),
                name=f"leasectl-stop-{job.id}",
                daemon=True,
            ).start()

    def _anything_queued(self) -> bool:
        """A cheap read first, so an idle queue never takes SQLite's write lock."""
        with self._read() as conn:
            return conn.scalar(_ANY_QUEUED) is not None

    def _sweep_cancelled(self) -> None:
        """Rows cancelled with SQL keep env/stdin until this clears them."""
        with self.db.session() as session:
            _update(
                session,
                sa.update(Execution)
                .where(
                    Execution.state == "cancelled",
                    sa.or_(Execution.env.is_not(None), Execution.stdin.is_not(None)),
                )
                .values(env=sa.null(), stdin=sa.null()),
            )

    def _blocked_by_earlier(self, *, recording: bool = False) -> sa.ColumnElement[bool]:
        """True for an ordered row that must wait: ``exec.per_lease_concurrency`` earlier ordered
        rows of its lease are still queued or running (created_at order, id breaks ties).
        ``recording``: in the statement that also records results, whose snapshot still sees the
        rows it records (its ``recorded`` CTE) running although they end in it, those do not count."""
        earlier = aliased(Execution)
        conditions = [
            earlier.lease_name == Execution.lease_name,
            earlier.ordered.is_(True),
            earlier.state.in_(("queued", "running")),
            sa.or_(
                earlier.created_at < Execution.created_at,
                sa.and_(earlier.created_at == Execution.created_at, earlier.id < Execution.id),
            ),
        ]
        if recording:
            conditions.append(earlier.id.not_in(sa.select(_RECORDED.c.id)))
        count = (
            sa.select(sa.func.count())
            .select_from(earlier)
            .where(*conditions)
            .correlate(Execution)
            .scalar_subquery()
        )
        return sa.and_(Execution.ordered.is_(True), count >= self.settings.per_lease_concurrency)

    def _claim_query(self) -> sa.Select[Any]:
        """The claim's SELECT (built once per dispatcher): queued rows that may run or must end,
        oldest first, with the lease and status columns ``_decide`` reads; ``b_now``, ``b_cutoff``
        and ``b_limit`` are bound per claim."""
        if self._claim_select is not None:
            return self._claim_select
        now, cutoff = (
            sa.bindparam("b_now", type_=UTCDateTime()),
            sa.bindparam("b_cutoff", type_=UTCDateTime()),
        )
        e, lease, status = (
            _EXECUTIONS.c,
            cast(sa.Table, Lease.__table__).c,
            cast(sa.Table, LeaseStatus.__table__).c,
        )
        query = (
            sa.select(
                e.id,
                e.lease_name,
                e.command,
                e.cwd,
                e.env,
                e.stdin,
                e.timeout_seconds,
                e.created_at,
                e.attempts,
                e.attempt_log,
                lease.id.label("lease_id"),
                sa.cast(lease.env, sa.Text).label("lease_env"),
                lease.desired_state,
                lease.expires_at,
                status.phase,
                status.sandbox_id.label("status_sandbox_id"),
                status.workspace_path,
            )
            .select_from(
                _EXECUTIONS.outerjoin(Lease.__table__, lease.name == e.lease_name).outerjoin(
                    LeaseStatus.__table__, status.lease_name == e.lease_name
                )
            )
            .where(e.state == _QUEUED)
            .where(sa.or_(e.next_attempt_at.is_(None), e.next_attempt_at <= now))
            .where(
                sa.or_(
                    status.phase.in_(_RUNNABLE),
                    lease.id.is_(None),
                    lease.desired_state != "running",
                    lease.expires_at <= now,
                    e.created_at <= cutoff,
                )
            )
            .order_by(e.created_at, e.id)
            .limit(sa.bindparam("b_limit", type_=sa.Integer()))
        )
        unordered = query
        if self.settings.per_lease_concurrency > 0:
            query = query.where(sa.not_(self._blocked_by_earlier()))
        if not self.db.is_sqlite:

            def claim_runnable(candidates: sa.Select[Any]) -> sa.Update:
                picked = (
                    candidates.where(
                        status.phase.in_(_RUNNABLE),
                        status.sandbox_id.is_not(None),
                        lease.desired_state == "running",
                        sa.or_(lease.expires_at.is_(None), lease.expires_at > now),
                    )
                    .with_for_update(of=_EXECUTIONS, skip_locked=True)
                    .subquery("picked")
                )
                return (
                    sa.update(_EXECUTIONS)
                    .where(_EXECUTIONS.c.id == picked.c.id)
                    .values(
                        state="running",
                        # parameters named unlike any column: a DML statement (or CTE) would SET
                        # a column of a parameter's name (see _finish_and_claim_statement)
                        claimed_by=sa.bindparam("b_claimed_by"),
                        started_at=sa.bindparam("b_started_at", type_=UTCDateTime()),
                        sandbox_id=picked.c.status_sandbox_id,
                        next_attempt_at=None,
                        env=sa.null(),
                        stdin=sa.null(),
                    )
                    .returning(*picked.c)
                )

            self._claim_runnable = claim_runnable(query)
            if self.settings.per_lease_concurrency > 0:
                unordered = unordered.where(sa.not_(self._blocked_by_earlier(recording=True)))
            self._finish_and_claim = _finish_and_claim_statement(claim_runnable(unordered))
            query = query.with_for_update(of=_EXECUTIONS, skip_locked=True)
        self._claim_select = query
        return query

    def _claim_runnable_in(
        self, conn: sa.Connection, limit: int
    ) -> tuple[list[Job], list[tuple[int, str, str]]]:
        """PostgreSQL, continuous mode: claim up to ``limit`` rows that can run now in ONE statement
        (``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`` the row as it was, env
        and stdin included) and return them as jobs. Rows that must end in error are left to the
        next poll's claim. A claimed row ``_decide`` refuses (an invalid env) ends in error here."""
        self._claim_query()
        assert self._claim_runnable is not None
        now = self._clock()
        cutoff = now - timedelta(seconds=self.settings.queue_wait_seconds)
        rows = conn.execute(
            self._claim_runnable,
            {
                "b_now": now,
                "b_cutoff": cutoff,
                "b_limit": limit,
                "b_claimed_by": self.worker_id,
                "b_started_at": now,
            },
        ).all()
        return self._claimed_jobs(conn, rows, now)

    def _finish_and_claim_in(
        self, conn: sa.Connection, results: list[Finished], now: datetime, limit: int
    ) -> tuple[set[int], list[Job], list[tuple[int, str, str]]]:
        """PostgreSQL, continuous mode: record ``results`` (fenced, each with its event) and claim up
        to ``limit`` runnable rows in ONE statement (:func:`_finish_and_claim_statement`): one round
        trip instead of two. Returns the ids of the results recorded (a row no longer ours is left
        out: the caller records it with :func:`finish`, which drops it), the jobs and the rows
        ended in error, as :meth:`_claim_runnable_in`."""
        self._claim_query()
        assert self._finish_and_claim is not None
        rows = conn.execute(
            self._finish_and_claim,
            {
                "b_results": _results_json(results, self.settings.max_output_bytes),
                "b_worker": self.worker_id,
                "b_finished_at": now,
                "b_now": now,
                "b_cutoff": now - timedelta(seconds=self.settings.queue_wait_seconds),
                "b_limit": limit,
                "b_claimed_by": self.worker_id,
                "b_started_at": now,
            },
        ).all()
        finished = set(rows[0].finished_ids or ()) if rows else set()
        jobs, ended = self._claimed_jobs(conn, [row for row in rows if row.id is not None], now)
        return finished, jobs, ended

    def _claimed_jobs(
        self, conn: sa.Connection, rows: Sequence[Any], now: datetime
    ) -> tuple[list[Job], list[tuple[int, str, str]]]:
        """Rows a claim made ``running`` under this worker, as jobs (oldest first); one
        ``_decide`` refuses (an invalid env) ends in error here."""
        jobs: list[Job] = []
        ended: list[tuple[int, str, str]] = []
        for row in sorted(rows, key=lambda r: (r.created_at, r.id)):
            lease = _LeaseView(row.desired_state, row.expires_at)
            status = _StatusView(row.phase, row.status_sandbox_id, row.workspace_path)
            job, problem = self._decide(row, lease, status, now)
            if job is not None:
                jobs.append(job)
                continue
            problem = problem or "not runnable when claimed"
            guard = sa.update(Execution).where(
                Execution.id == row.id, Execution.state == "running", Execution.claimed_by == self.worker_id
            )
            if _update(conn, guard.values(state="error", error=problem, finished_at=now)) == 1:
                _event(conn, row.id, row.lease_name, None, "error", problem, self.worker_id)
                ended.append((row.id, row.lease_name, problem))
        return jobs, ended

    def _claim(self, limit: int) -> tuple[list[Job], int]:
        """One claim transaction: up to ``limit`` rows become running (returned as jobs) or end in
        error (counted); rows for leases still starting, rows backing off and rows waiting for an
        earlier row of their lease stay queued. Core statements: the rows are never ORM objects."""
        in_doubt: list[Job] = []  # set once the claim ran: a failure after that is at the commit
        try:
            try:
                with self._write() as conn:
                    jobs, ended = self._claim_in(conn, limit)
                    in_doubt = jobs
            except _Superseded:  # cannot happen while the claim holds its rows; row by row if it does
                with self._write() as conn:
                    jobs, ended = self._claim_in(conn, limit, one_by_one=True)
                    in_doubt = jobs
        except sa.exc.SQLAlchemyError:
            self._owe_unclaims(in_doubt)
            raise
        self._log_ended(ended)
        return jobs, len(ended)

    def _log_ended(self, ended: list[tuple[int, str, str]]) -> None:
        for execution_id, lease_name, problem in ended:
            with logs.bound(lease=lease_name):
                log.warning("execution %d: %s", execution_id, problem)

    def _claim_in(
        self, conn: sa.Connection, limit: int, *, one_by_one: bool = False
    ) -> tuple[list[Job], list[tuple[int, str, str]]]:
        """:meth:`_claim` inside the caller's transaction: the jobs and the rows ended in error. The
        rows to run are claimed with one executemany of the conditional UPDATE; the SELECT locked
        them (PostgreSQL ``FOR UPDATE``, SQLite's write lock), so each matches, or
        :class:`_Superseded` rolls the transaction back (``one_by_one`` then claims row by row)."""
        now = self._clock()
        cutoff = now - timedelta(seconds=self.settings.queue_wait_seconds)
        jobs: list[Job] = []
        ended: list[tuple[int, str, str]] = []
        rows = conn.execute(self._claim_query(), {"b_now": now, "b_cutoff": cutoff, "b_limit": limit}).all()
        for row in rows:
            lease = _LeaseView(row.desired_state, row.expires_at) if row.lease_id is not None else None
            status = _StatusView(row.phase, row.status_sandbox_id, row.workspace_path) if row.phase else None
            job, problem = self._decide(row, lease, status, now)
            if job is not None:
                jobs.append(job)
            elif problem is not None:
                claimed = _update(
                    conn,
                    sa.update(Execution)
                    .where(Execution.id == row.id, Execution.state == "queued")
                    .values(env=sa.null(), stdin=sa.null(), state="error", error=problem, finished_at=now),
                )
                if claimed == 1:
                    _event(conn, row.id, row.lease_name, None, "error", problem, self.worker_id)
                    ended.append((row.id, row.lease_name, problem))
            # else: still waiting for its lease
        claims = [
            {"b_id": job.id, "claimed_by": self.worker_id, "started_at": now, "sandbox_id": job.sandbox_id}
            for job in jobs
        ]
        if one_by_one:
            pairs = zip(jobs, claims, strict=True)
            jobs = [job for job, values in pairs if _update(conn, _CLAIM, values) == 1]
        else:
            _update_all(conn, _CLAIM, claims)
        return jobs, ended

    def _decide(
        self, row: Any, lease: _LeaseView | None, status: _StatusView | None, now: datetime
    ) -> tuple[Job | None, str | None]:
        """(job, None) to run it, (None, message) to end it in error, (None, None) to wait."""
        problem = _not_runnable(row.lease_name, lease, now)
        if problem is not None:
            return None, problem
        env: Any = row.env if row.env is not None else {}
        try:
            variables = check_env(env)
        except InvalidCommandError as exc:
            return None, f"invalid env: {exc}"
        if status is not None and status.phase in RUNNABLE_PHASES and status.sandbox_id:
            stdin: Any = row.stdin
            if isinstance(stdin, str):  # written as text with SQL on SQLite
                stdin = stdin.encode("utf-8")
            return (
                Job(
                    id=row.id,
                    lease_name=row.lease_name,
                    sandbox_id=status.sandbox_id,
                    workspace=status.workspace_path,
                    command=row.command,
                    cwd=row.cwd,
                    env=variables,
                    stdin=bytes(stdin) if stdin is not None else None,
                    timeout_seconds=row.timeout_seconds or self.settings.default_timeout_seconds,
                    idle=status.phase == "Idle",
                    created_at=row.created_at,
                    claimed_at=now,
                    attempts=row.attempts or 0,
                    attempt_log=tuple(row.attempt_log or ()),
                    secrets=secret_values_of(row.lease_env),
                ),
                None,
            )
        if row.created_at is None or row.created_at <= now - timedelta(
            seconds=self.settings.queue_wait_seconds
        ):
            phase = status.phase if status is not None else "Pending"
            return None, (
                f"lease {row.lease_name!r} not ready after {self.settings.queue_wait_seconds:g} s "
                f"(phase {phase})"
            )
        return None, None

    def _run(self, job: Job) -> None:
        """Run one job on a pool thread. Its slot is free as soon as the command has ended: the next
        row is claimed (continuous mode) while this thread still records the result, so writing a
        result never holds a command back (the pool has room for both)."""
        try:
            outcome = self._outcome(job)
        finally:
            with self._lock:
                self._running.pop(job.id, None)
                self._stopping.discard(job.id)
                self._taken -= 1
        if outcome.state not in (NOT_STARTED, DETACH) and self._refill and self._more:
            with self._results_lock:
                self._results.append((job, outcome))
            self._flush_and_claim()  # its result and the slot's next row: one transaction
            return
        self._refill_slot()
        self._conclude(job, outcome)

    def _uses_session(self, job: Job) -> bool:
        return job.timeout_seconds >= self.settings.session_min_timeout_seconds

    def _outcome(self, job: Job) -> CommandOutcome:
        """How the job's attempt ended, with the lease's secret values masked (what is stored,
        logged and printed from here on never holds them)."""
        with logs.bound(lease=job.lease_name):
            try:
                if job.session_id and job.command_id:
                    log.info("execution %d: following session command %s", job.id, job.command_id)
                    outcome = self._follow(job, job.session_id, job.command_id, job.started_at)
                else:
                    log.info("execution %d: running on sandbox %s", job.id, job.sandbox_id)
                    outcome = self._attempt(job)
            except InvalidCommandError as exc:
                outcome = CommandOutcome(state="error", error=str(exc))
            except Exception as exc:
                log.exception("execution %d: unexpected failure", job.id)
                text = redact_values(f"{type(exc).__name__}: {exc}", job.secrets)
                outcome = CommandOutcome(state="error", error=_short_error(text, job.env))
            return _redacted(outcome, job.secrets)

    def _conclude(self, job: Job, outcome: CommandOutcome) -> None:
        """Record how the attempt ended: back to the queue, handed over, or finished. Finished rows
        are group-committed: results that arrive while another thread writes go in its next
        transaction together (see :meth:`_flush_results`)."""
        with logs.bound(lease=job.lease_name):
            if outcome.state not in (NOT_STARTED, DETACH):
                with self._results_lock:
                    self._results.append((job, outcome))
                self._flush_results()
                return
            with self._writes:
                try:
                    if outcome.state == NOT_STARTED:
                        self._retry_or_fail(job, outcome)
                    else:
                        self._detach(job)
                except sa.exc.SQLAlchemyError as exc:
                    self._owe("requeue" if outcome.state == NOT_STARTED else "detach", job, outcome, exc)

    def _flush_results(self) -> None:
        """Write every pending result in one transaction. A thread that finds its result already
        written by another (which took it into its batch) has nothing left to do."""
        with self._lanes, self._writes:
            with self._results_lock:
                batch, self._results = self._results, []
            if not batch:
                return
            results = [Finished(job.id, outcome, job.lease_name, job.sandbox_id) for job, outcome in batch]
            lost: set[int] = set()
            try:
                with self._write() as conn:
                    _finish_in(conn, self.worker_id, results, self._clock(), self.settings.max_output_bytes)
            except sa.exc.SQLAlchemyError:  # _Superseded included: one by one
                lost = {job.id for job, _ in batch}
        self._after_flush(batch, lost)

    def _flush_and_claim(self) -> None:
        """Continuous mode, a command just ended: write the pending results (a group commit) and
        claim rows for the slots free at that moment in the same transaction, then start them. One
        commit per command at most instead of two; the claim is still the conditional
        ``state = 'queued'`` UPDATE."""
        jobs: list[Job] = []
        ended: list[tuple[int, str, str]] = []
        with self._lanes, self._writes:
            with self._results_lock:
                batch, self._results = self._results, []
            free = self._reserve() if self._refill and self._more else 0
            if not batch and free <= 0:
                return
            results = [Finished(job.id, outcome, job.lease_name, job.sandbox_id) for job, outcome in batch]
            lost: set[int] = set()
            committed = False
            try:
                with self._write() as conn:
                    now = self._clock()
                    if free > 0 and results and not self.db.is_sqlite:
                        recorded, jobs, ended = self._finish_and_claim_in(conn, results, now, free)
                        lost = {item.execution_id for item in results} - recorded
                    else:
                        _finish_in(conn, self.worker_id, results, now, self.settings.max_output_bytes)
                        if free > 0 and not self.db.is_sqlite:
                            jobs, ended = self._claim_runnable_in(conn, free)
                        elif free > 0:
                            jobs, ended = self._claim_in(conn, free)
                committed = True
            except sa.exc.SQLAlchemyError as exc:
                # Rolled back: its results are written one by one (a row no longer ours among them
                # is _Superseded, not a database error), and the next poll claims again.
                if not isinstance(exc, _Superseded):
                    log.warning("execution dispatcher: database error: %s", str(exc).splitlines()[0])
                self._owe_unclaims(jobs)  # claimed before the commit failed: it may have held
                jobs, ended, lost = [], [], {job.id for job, _ in batch}
                if free > 0:
                    self._more = False
            else:
                if free > 0:
                    self._more = len(jobs) + len(ended) == free
            finally:
                if not committed:
                    jobs, ended = [], []
                if free > 0:  # only after the commit: the claim holds from then on
                    self._start(free, jobs, len(jobs) + len(ended))
        self._log_ended(ended)
        self._after_flush(batch, lost)

    def _after_flush(self, batch: list[tuple[Job, CommandOutcome]], lost: set[int]) -> None:
        """Log what a group commit wrote; record one by one what it did not (a row someone else
        ended meanwhile, or a group that rolled back: then one bad row costs only itself)."""
        for job, outcome in batch:
            with logs.bound(lease=job.lease_name):
                if job.id in lost:
                    try:
                        with self._writes:
                            finish(
                                self.db,
                                job.id,
                                self.worker_id,
                                outcome,
                                lease_name=job.lease_name,
                                sandbox_id=job.sandbox_id,
                                max_output_bytes=self.settings.max_output_bytes,
                                clock=self._clock,
                            )
                    except sa.exc.SQLAlchemyError as exc:
                        self._owe("finish", job, outcome, exc)
                        continue
                log.info("execution %d: %s", job.id, _detail(outcome) or outcome.state)

    def _owe(self, kind: str, job: Job, outcome: CommandOutcome | None, exc: Exception) -> None:
        """Keep a write the database refused (an outage, typically) for the next polls: one line,
        no traceback. Until it is written the row stays ``running`` under this worker; if the
        process ends first, the next dispatcher recovers the row like any of a gone worker."""
        with self._lock:
            self._owed[job.id] = _Owed(kind, job, outcome, self._clock())
        what = {"requeue": "its return to the queue", "detach": "its hand-over"}.get(
            kind, f"its result ({outcome.state if outcome is not None else '?'})"
        )
        with logs.bound(lease=job.lease_name):
            log.error(
                "execution %d: could not record %s: %s; retrying at the next poll",
                job.id,
                what,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )

    def _owe_unclaims(self, jobs: Iterable[Job]) -> None:
        """Claims whose commit failed: nothing of them was started, but the commit may have
        reached the database, leaving the rows ``running`` under this worker. The next poll puts
        such rows back in the queue (a no-op for rows the claim never took)."""
        with self._lock:
            for job in jobs:
                self._owed[job.id] = _Owed("unclaim", job, None, self._clock())

    def _pay_owed(self) -> bool:
        """Write what failed transactions left owing, oldest first; False (and the rest kept) at the
        first database error: it is still unreachable."""
        with self._lock:
            owed = list(self._owed.values())
        for item in owed:
            job = item.job
            try:
                with self._writes, logs.bound(lease=job.lease_name):
                    if item.kind == "finish" and item.outcome is not None:
                        recorded = finish(  # False: no longer ours, logged and dropped by finish()
                            self.db,
                            job.id,
                            self.worker_id,
                            item.outcome,
                            lease_name=job.lease_name,
                            sandbox_id=job.sandbox_id,
                            max_output_bytes=self.settings.max_output_bytes,
                            clock=_at(item.at or self._clock()),
                        )
                        if recorded:
                            detail = _detail(item.outcome) or item.outcome.state
                            log.info("execution %d: %s (recorded late)", job.id, detail)
                    elif item.kind == "requeue" and item.outcome is not None:
                        self._retry_or_fail(job, item.outcome)
                    elif item.kind == "detach":
                        self._detach(job)
                    else:
                        self._unclaim(job)
            except sa.exc.SQLAlchemyError as exc:
                log.warning(
                    "execution dispatcher: %d write(s) still owed: %s",
                    len(owed),
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                return False
            with self._lock:
                if self._owed.get(job.id) is item:
                    del self._owed[job.id]
        return True

    def _unclaim(self, job: Job) -> None:
        """Put back in the queue a row whose claim's commit failed, if that commit held after all
        (its command was never sent: no attempt is counted)."""
        with self.db.session() as session:
            done = _update(
                session,
                sa.update(Execution)
                .where(
                    Execution.id == job.id,
                    Execution.state == "running",
                    Execution.claimed_by == self.worker_id,
                    Execution.command_id.is_(None),
                )
                .values(
                    state="queued",
                    claimed_by=None,
                    started_at=None,
                    session_id=None,
                    env=dict(job.env) if job.env else None,
                    stdin=job.stdin,
                ),
            )
        if done:
            log.info("execution %d: its claim held though its commit failed; queued again", job.id)

    def _attempt(self, job: Job) -> CommandOutcome:
        """One attempt at starting the command: one request, or a session followed to its end."""
        if job.idle:
            try:
                wake(self.provider, job.sandbox_id, timeout_seconds=self.settings.idle_start_timeout_seconds)
            except LeaseNotReadyError as exc:
                return not_started("the idle lease did not start", exc, job.env)
        if not self._uses_session(job):
            return run_command(
                self.provider,
                job.sandbox_id,
                job.command,
                cwd=job.cwd,
                workspace=job.workspace,
                env=job.env,
                stdin=job.stdin,
                timeout_seconds=job.timeout_seconds,
                max_output_bytes=self.settings.max_output_bytes,
                marker=execution_marker(job.id, self.worker_id),
            )
        session_id = new_session_id(job.id)
        line = command_line(
            job.command,
            cwd=job.cwd,
            workspace=job.workspace,
            env=job.env,
            stdin_path=session_stdin_path(session_id) if job.stdin is not None else None,
            marker=execution_marker_for_session(session_id),
        )
        command_id, early = start_in_session(
            self.provider,
            job.sandbox_id,
            session_id,
            line,
            env=job.env,
            stdin=job.stdin,
            on_session=lambda: self._record(job.id, session_id=session_id),
        )
        if early is not None:
            return early
        assert command_id is not None
        self._progress(job.id, command_id=command_id)
        return self._follow(job, session_id, command_id, job.claimed_at, has_stdin=job.stdin is not None)

    def _follow(
        self,
        job: Job,
        session_id: str,
        command_id: str,
        started_at: datetime | None,
        *,
        has_stdin: bool | None = None,
    ) -> CommandOutcome:
        start = started_at or self._clock()
        return follow_session(
            self.provider,
            job.sandbox_id,
            session_id,
            command_id,
            deadline=start + timedelta(seconds=job.timeout_seconds),
            timeout_seconds=job.timeout_seconds,
            poll_seconds=self.settings.log_poll_seconds,
            max_output_bytes=self.settings.max_output_bytes,
            on_output=lambda text: self._progress(job.id, output=text),
            should_stop=lambda: self._should_stop(job.id),
            has_stdin=job.has_stdin if has_stdin is None else has_stdin,
            clock=self._clock,
        )

    def _should_stop(self, execution_id: int) -> tuple[str, str] | None:
        if self._closed:
            return DETACH, "the dispatcher is shutting down"
        try:
            with self.db.session(readonly=True) as session:
                row = session.execute(
                    sa.select(Execution.state, Execution.claimed_by).where(Execution.id == execution_id)
                ).one_or_none()
        except sa.exc.SQLAlchemyError as exc:  # the command runs on: ask again at the next poll
            log.warning("execution %d: could not read its row: %s", execution_id, str(exc).splitlines()[0])
            return None
        if row is None:
            return DETACH, "the row is gone"
        if row.state == "cancelled":
            return "cancelled", "cancelled by an operator while running"
        if row.state != "running" or row.claimed_by != self.worker_id:
            return DETACH, f"the row is now {row.state}, claimed by {row.claimed_by}"
        return None

    def _record(self, execution_id: int, **values: Any) -> None:
        """Write progress (session id, command id, output so far) to a row this worker holds."""
        if "output" in values:
            with self._lock:
                job = self._running.get(execution_id)
            secrets = job.secrets if job is not None else ()
            text, cut = cap_output(redact_values(values["output"], secrets), self.settings.max_output_bytes)
            values |= {"output": storable(text), "output_truncated": cut}
        with self.db.session() as session:
            _update(
                session,
                sa.update(Execution)
                .where(
                    Execution.id == execution_id,
                    Execution.state == "running",
                    Execution.claimed_by == self.worker_id,
                )
                .values(**values),
            )

    def _progress(self, execution_id: int, **values: Any) -> None:
        """:meth:`_record`, best effort: a command id or output the database refused is not worth
        abandoning a running command for (the result is written at the end; should this worker die
        meanwhile, a row without its command id is recovered as ``unknown``)."""
        try:
            self._record(execution_id, **values)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("execution %d: could not record progress: %s", execution_id, str(exc).splitlines()[0])

    def _detach(self, job: Job) -> None:
        with self.db.session() as session:
            done = _update(
                session,
                sa.update(Execution)
                .where(
                    Execution.id == job.id,
                    Execution.state == "running",
                    Execution.claimed_by == self.worker_id,
                )
                .values(claimed_by=DETACHED_PREFIX + self.worker_id),
            )
        if done:
            log.info("execution %d: left running in its session for the next dispatcher", job.id)

    def _retry_or_fail(self, job: Job, outcome: CommandOutcome) -> None:
        """Put a row whose attempt provably did not start back to ``queued`` with a back-off, or end
        it in ``error`` once its retry window (``exec.queue_wait_seconds``) is over."""
        now = self._clock()
        reason = outcome.error or "not started"
        history = [*job.attempt_log, {"at": now.isoformat(), "reason": reason}]
        attempts = job.attempts + 1
        delay = retry_delay(
            attempts,
            base=self.settings.retry_backoff_seconds,
            cap=self.settings.retry_backoff_max_seconds,
            retry_after=outcome.retry_after,
            jitter=self._rng.random(),
        )
        window_start = _first_attempt_at(history) or now
        if job.created_at is not None:
            window_start = max(window_start, job.created_at)
        give_up = now + timedelta(seconds=delay) > window_start + timedelta(
            seconds=self.settings.queue_wait_seconds
        )
        guard = sa.update(Execution).where(
            Execution.id == job.id, Execution.state == "running", Execution.claimed_by == self.worker_id
        )
        with self.db.session() as session:
            if give_up:
                message = (
                    f"not started after {attempts} attempt(s) in {self.settings.queue_wait_seconds:g} s "
                    f"(it never ran); last: {reason}"
                )
                failed = CommandOutcome(state="error", error=message)
                values = _finish_values(failed, now, self.settings.max_output_bytes)
                values |= {"attempts": attempts, "attempt_log": history}
                if _update(session, guard.values(**values)) == 1:
                    _event(session, job.id, job.lease_name, job.sandbox_id, "error", message, self.worker_id)
                log.warning("execution %d: %s", job.id, message)
                return
            values = {
                "state": "queued",
                "claimed_by": None,
                "started_at": None,
                "session_id": None,
                "command_id": None,
                "attempts": attempts,
                "attempt_log": history,
                "next_attempt_at": now + timedelta(seconds=delay),
                # the claim cleared them; the next attempt needs them again
                "env": dict(job.env) if job.env else None,
                "stdin": job.stdin,
            }
            if _update(session, guard.values(**values)) == 1:
                detail = f"attempt {attempts} did not start the command; again in {delay:.1f} s: {reason}"
                _event(session, job.id, job.lease_name, job.sandbox_id, "retry", detail, self.worker_id)
        if outcome.auth_failed:
            log.warning(
                "execution %d: the Daytona API refused the credentials (%s); %s; retry in %.1f s",
                job.id,
                reason,
                AUTH_HINT,
                delay,
            )
        else:
            log.info("execution %d: not started (%s); retry in %.1f s", job.id, reason, delay)


DETACHED_PREFIX = "detached:"


def _at(moment: datetime) -> Clock:
    """A clock stopped at ``moment`` (a result written late keeps the time it arrived)."""
    return lambda: moment


def _first_attempt_at(history: list[Mapping[str, str]]) -> datetime | None:
    try:
        return datetime.fromisoformat(history[0]["at"]) if history else None
    except (KeyError, ValueError):
        return None
