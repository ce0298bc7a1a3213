"""Running commands on Ready leases: one command now, and the queue of ``executions`` rows.

Owns what happens between "run this command line on lease X" and a finished ``executions`` row:
the readiness check, the stdin file in the sandbox (uploaded, then always removed), the login-shell
script (built by :mod:`controller.execution_script`), the provider call with its time-out, the output
cap, the state the row ends in, its event, and keeping env values out of logs, events and rows.

Callers:

* ``leasectl exec`` calls :func:`execute_now` (direct run, recorded as a row that is inserted
  ``running``) or :func:`enqueue` + :func:`wait_for` (``--queue``);
* the daemon (every replica, not only the leader) and ``leasectl exec-worker`` run a
  :class:`Dispatcher`, which claims ``queued`` rows atomically (PostgreSQL ``FOR UPDATE SKIP LOCKED``,
  SQLite one ``BEGIN IMMEDIATE`` transaction) and runs them with bounded concurrency.

Idle leases (auto-stopped by Daytona on a lease with ``auto_stop_interval``, phase ``Idle``) are
runnable: :func:`wake` starts the sandbox on demand and waits until it is started, then the command
runs as on a Ready lease; the next reconcile pass shows the lease Ready again.

Row states: ``queued -> running -> succeeded | failed | timed_out | error``; ``queued -> error`` when
the lease is missing, not desired running, expired, or not Ready within ``exec.queue_wait_seconds``
of the row's ``created_at``; ``queued -> cancelled`` by an operator (the claim only takes ``queued``
rows, so a cancelled row never runs); ``running -> interrupted`` when the worker that claimed it is
gone. ``env`` and ``stdin`` are cleared when the row is claimed and again at every terminal state.

Interrupted rows (a worker crashed mid-command). ``claimed_by`` is ``host:pid:nonce``. A
dispatcher (at start, then once a minute) marks a ``running`` row claimed by someone else
``interrupted`` when either

* the claimer ran on this host (same host name) and its process no longer exists, or
* ``started_at + timeout + INTERRUPT_GRACE_SECONDS`` has passed: no live worker holds a command
  that long, because every provider call is bounded.

Cancelling a running command. Every command runs under a marker derived from its row id and its
claimer (:func:`execution_marker`); :func:`stop_in_sandbox` runs a second command through the toolbox
that kills the marked processes. ``leasectl exec`` does so on SIGINT/SIGTERM; :func:`cancel` (``leasectl
cancel``) does so for a running row, and a dispatcher does so for its own rows that were set
``cancelled`` (e.g. with SQL) while they ran.

A row is never put back to ``queued``, so nothing runs twice. A worker that is still alive but was
declared gone (clock skew, two hosts with one host name and separate PID namespaces) finishes with
a conditional UPDATE (``state = 'running' AND claimed_by = me``) that then matches nothing: its
result is logged and dropped, the row stays ``interrupted``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from controller import logs
from controller.config import ExecSettings
from controller.db import Database
from controller.errors import LeasectlError, ProviderError, StateConflictError
from controller.execution_script import (
    ScriptInputError,
    build_script,
    stop_script,
    validate_env,
    wrap_for_exec,
)
from controller.providers.base import SandboxProvider
from models import Event, Execution, Lease, LeaseStatus, utcnow
from models.tables import EXECUTION_TERMINAL_STATES

log = logging.getLogger(__name__)

STDIN_DIR = "/tmp"
INTERRUPT_GRACE_SECONDS = 300.0
RECOVER_EVERY_SECONDS = 60.0
ERROR_MAX_CHARS = 4000
WAIT_POLL_SECONDS = 0.5
EXIT_TIMED_OUT = 124  # what `leasectl exec` (like coreutils `timeout`) exits with on a time-out

Clock = Callable[[], datetime]


class ExecutionError(LeasectlError):
    """A command cannot be run as asked (bad env key, unknown lease, lease not Ready)."""


class InvalidCommandError(ExecutionError):
    """The command, its env or its arguments are invalid; nothing was run."""


class LeaseNotReadyError(ExecutionError):
    """The lease does not exist, is not desired running, or is not Ready."""


def make_worker_id(role: str = "worker") -> str:
    """``host:pid:role-nonce``: unique per dispatcher or CLI run, and parseable for liveness."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}-{uuid.uuid4().hex[:8]}"


# -- one command ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandOutcome:
    """How one command ended. ``exit_code`` is None unless the command ran to its end."""

    state: str  # succeeded | failed | timed_out | error
    exit_code: int | None = None
    output: str = ""
    output_truncated: bool = False
    error: str | None = None

    @property
    def cli_exit_code(self) -> int:
        """What ``leasectl exec`` exits with: the remote code, 124 on time-out, 1 on error."""
        if self.state == "timed_out":
            return EXIT_TIMED_OUT
        if self.exit_code is not None and 0 <= self.exit_code <= 255:
            return self.exit_code
        return 1 if self.state != "succeeded" else 0


def cap_output(output: str, max_bytes: int | None) -> tuple[str, bool]:
    """``output`` cut to at most ``max_bytes`` of UTF-8 (never inside a character), and whether cut."""
    if max_bytes is None:
        return output, False
    data = output.encode("utf-8", errors="replace")
    if len(data) <= max_bytes:
        return output, False
    # The bytes came from a valid encode, so the only invalid sequence possible is a character cut
    # at the end; "ignore" drops exactly that.
    return data[:max_bytes].decode("utf-8", errors="ignore"), True


def storable(text: str) -> str:
    """``text`` as a database can store it: valid UTF-8 (lone surrogates replaced), no NUL."""
    return text.encode("utf-8", errors="replace").decode("utf-8").replace("\x00", "\ufffd")


def redact(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every non-trivial env value masked (for error messages that echo a request)."""
    for value in sorted((v for v in env.values() if len(v) >= 3), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def _short_error(text: str, env: Mapping[str, str]) -> str:
    text = redact(text, env)
    return text if len(text) <= ERROR_MAX_CHARS else text[: ERROR_MAX_CHARS - 3] + "..."


def check_env(env: Mapping[str, str]) -> dict[str, str]:
    """The env as a plain dict, or InvalidCommandError naming the bad key (never the value)."""
    try:
        return validate_env(env)
    except ScriptInputError as exc:
        raise InvalidCommandError(str(exc)) from exc


def command_line(
    command: str,
    *,
    cwd: str | None = None,
    workspace: str | None = None,
    env: Mapping[str, str],
    stdin_path: str | None = None,
    marker: str | None = None,
) -> str:
    """The one line handed to ``provider.exec``, or InvalidCommandError (nothing has run yet)."""
    try:
        script = build_script(
            command, cwd=cwd, workspace=workspace, env=env, stdin_path=stdin_path, marker=marker
        )
        return wrap_for_exec(script)
    except ScriptInputError as exc:
        raise InvalidCommandError(str(exc)) from exc


def run_command(
    provider: SandboxProvider,
    sandbox_id: str,
    command: str,
    *,
    cwd: str | None = None,
    workspace: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout_seconds: int,
    max_output_bytes: int | None = None,
    marker: str | None = None,
) -> CommandOutcome:
    """Run the shell command line ``command`` in a login shell of the sandbox, now.

    ``cwd`` defaults to ``workspace`` (the lease's realized workspace). An invalid env, command or
    cwd raises :class:`InvalidCommandError` before anything is uploaded or run. Provider failures do not
    raise: they come back as state ``error`` with a message that never contains an env value.
    """
    variables = check_env(env or {})
    stdin_path = f"{STDIN_DIR}/leasectl-stdin-{uuid.uuid4().hex}" if stdin is not None else None
    line = command_line(
        command, cwd=cwd, workspace=workspace, env=variables, stdin_path=stdin_path, marker=marker
    )
    log.debug("exec in sandbox %s: env keys %s, stdin %s", sandbox_id, sorted(variables), stdin_path)
    try:
        if stdin is not None and stdin_path is not None:
            provider.upload(sandbox_id, stdin_path, stdin)
        result = provider.exec(sandbox_id, line, timeout=timeout_seconds)
    except ProviderError as exc:
        message = _short_error(f"{type(exc).__name__}: {exc}", variables)
        return CommandOutcome(state="error", error=message)
    finally:
        if stdin_path is not None:
            try:
                provider.delete_file(sandbox_id, stdin_path)
            except ProviderError as exc:
                log.warning("could not remove %s from sandbox %s: %s", stdin_path, sandbox_id, exc)
    output, truncated = cap_output(result.output or "", max_output_bytes)
    if result.timed_out:
        return CommandOutcome(
            state="timed_out",
            output=output,
            output_truncated=truncated,
            error=f"timed out after {timeout_seconds} s",
        )
    code = result.exit_code
    state = "succeeded" if code == 0 else "failed"
    return CommandOutcome(state=state, exit_code=code, output=output, output_truncated=truncated)


def execution_marker(execution_id: int, claimed_by: str | None) -> str:
    """The marker the command of row ``execution_id`` runs under when ``claimed_by`` runs it; anyone
    holding the row can derive it to stop the command."""
    digest = hashlib.sha256((claimed_by or "").encode()).hexdigest()[:12]
    return f"x{execution_id}-{digest}"


STOP_TIMEOUT_SECONDS = 30


def stop_in_sandbox(provider: SandboxProvider, sandbox_id: str, marker: str) -> str | None:
    """Kill the processes of the command running under ``marker`` (SIGTERM, then SIGKILL) through
    the toolbox. None when none is left, else why that is not certain."""
    try:
        result = provider.exec(sandbox_id, stop_script(marker), timeout=STOP_TIMEOUT_SECONDS)
    except ProviderError as exc:
        log.warning("could not stop command %s in sandbox %s: %s", marker, sandbox_id, exc)
        return f"could not reach the sandbox to stop it ({type(exc).__name__}: {exc})"
    if result.timed_out or result.exit_code != 0:
        return "some of its processes may still run (they did not stop on SIGKILL)"
    return None


# -- rows ----------------------------------------------------------------------------------------


RUNNABLE_PHASES = ("Ready", "Idle")


@dataclass(frozen=True)
class Target:
    """A Ready (or Idle) lease: where its commands run."""

    lease_name: str
    sandbox_id: str
    workspace: str | None
    idle: bool = False


# Only the lease columns the queue needs: a hand-written spec column (JSON that does not parse on
# SQLite, say) must not stop the queue; the reconciler reports such a row as Failed.
_LEASE_COLUMNS = orm.load_only(Lease.id, Lease.name, Lease.desired_state, Lease.expires_at)


def check_runnable(session: Session, lease_name: str, now: datetime | None = None) -> None:
    """LeaseNotReadyError if commands can never run on this lease as it is (missing, not desired
    running, expired); a lease that is merely still starting passes."""
    lease = session.scalar(sa.select(Lease).options(_LEASE_COLUMNS).where(Lease.name == lease_name))
    problem = _not_runnable(lease_name, lease, now or utcnow())
    if problem is not None:
        raise LeaseNotReadyError(problem)


def ready_target(session: Session, lease_name: str, now: datetime | None = None) -> Target:
    """The sandbox of a Ready lease, or LeaseNotReadyError saying why not."""
    check_runnable(session, lease_name, now)
    status = session.get(LeaseStatus, lease_name)
    if status is None or status.phase not in RUNNABLE_PHASES or not status.sandbox_id:
        phase = status.phase if status is not None else "Pending"
        raise LeaseNotReadyError(f"lease {lease_name!r} is not Ready (phase {phase})")
    return Target(lease_name, status.sandbox_id, status.workspace_path, idle=status.phase == "Idle")


def wake(
    provider: SandboxProvider,
    sandbox_id: str,
    *,
    timeout_seconds: float,
    poll_seconds: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Start the sandbox of an Idle lease and wait until it is ``started``.

    A start refused because the sandbox is already starting or started is fine; LeaseNotReadyError
    when it is gone, falls into error, or is not started within ``timeout_seconds``.
    """
    deadline = monotonic() + timeout_seconds
    try:
        provider.start(sandbox_id)
    except StateConflictError:
        pass  # already starting (or started meanwhile): wait below
    except ProviderError as exc:
        raise LeaseNotReadyError(f"could not start idle sandbox {sandbox_id}: {exc}") from exc
    log.info("sandbox %s: started on demand (the lease was Idle)", sandbox_id)
    while True:
        error: ProviderError | None = None
        try:
            observed = provider.get(sandbox_id)
        except ProviderError as exc:
            observed, error = None, exc
        else:
            if observed is None:
                raise LeaseNotReadyError(f"idle sandbox {sandbox_id} is gone")
            if observed.state == "started":
                return
            if observed.state in ("error", "build_failed", "destroying", "destroyed"):
                raise LeaseNotReadyError(f"idle sandbox {sandbox_id} is {observed.state}; not started")
        if monotonic() >= deadline:
            state = observed.state if observed is not None else f"unknown ({error})"
            raise LeaseNotReadyError(
                f"idle sandbox {sandbox_id} not started within {timeout_seconds:g} s (state {state})"
            )
        sleep(poll_seconds)


def _not_runnable(lease_name: str, lease: Lease | None, now: datetime) -> str | None:
    """Why commands can never run on this lease as it is, or None."""
    if lease is None:
        return f"no such lease: {lease_name!r}"
    if lease.desired_state != "running":
        return f"lease {lease_name!r} is not desired running (desired state {lease.desired_state})"
    if lease.expires_at is not None and lease.expires_at <= now:
        return f"lease {lease_name!r} expired at {lease.expires_at.isoformat()}"
    return None


def _update(session: Session, statement: sa.Update) -> int:
    """Run an UPDATE; return how many rows it changed."""
    result = session.execute(statement, execution_options={"synchronize_session": False})
    return cast("CursorResult[Any]", result).rowcount


def _finish_values(outcome: CommandOutcome, now: datetime, max_output_bytes: int) -> dict[str, Any]:
    # Cap what is stored, not what arrived: each NUL becomes U+FFFD (3 bytes) on the way in, since
    # PostgreSQL text cannot hold NUL, so the cap applies after that substitution.
    output, truncated = cap_output(storable(outcome.output), max_output_bytes)
    return {
        "state": outcome.state,
        "exit_code": outcome.exit_code,
        "output": output,
        "output_truncated": truncated or outcome.output_truncated,
        "error": storable(outcome.error) if outcome.error is not None else None,
        "finished_at": now,
        "env": sa.null(),
        "stdin": sa.null(),
    }


def _event(
    session: Session,
    execution_id: int,
    lease_name: str,
    sandbox_id: str | None,
    outcome: str,
    detail: str | None,
    controller_id: str,
) -> None:
    message = f"execution {execution_id}" + (f": {detail}" if detail else "")
    session.add(
        Event(
            lease_name=lease_name,
            sandbox_id=sandbox_id,
            action="exec",
            outcome=outcome,
            message=message,
            controller_id=controller_id,
        )
    )


def _detail(outcome: CommandOutcome) -> str | None:
    if outcome.state in ("succeeded", "failed"):
        return f"exit {outcome.exit_code}"
    return outcome.error


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
) -> bool:
    """Record the outcome of a row this worker claimed; False if the row is no longer ours."""
    now = clock()
    with db.session() as session:
        done = _update(
            session,
            sa.update(Execution)
            .where(
                Execution.id == execution_id,
                Execution.state == "running",
                Execution.claimed_by == worker_id,
            )
            .values(**_finish_values(outcome, now, max_output_bytes)),
        )
        if done == 1:
            _event(session, execution_id, lease_name, sandbox_id, outcome.state, _detail(outcome), worker_id)
            return True
    with db.session() as session:  # someone else ended it (interrupted, cancelled): still no secrets
        _update(
            session,
            sa.update(Execution).where(Execution.id == execution_id).values(env=sa.null(), stdin=sa.null()),
        )
        state = session.scalar(sa.select(Execution.state).where(Execution.id == execution_id))
    log.warning(
        "execution %d finished as %s but is now %s: result dropped", execution_id, outcome.state, state
    )
    return False


def execute_now(
    db: Database,
    provider: SandboxProvider,
    settings: ExecSettings,
    *,
    lease_name: str,
    command: str,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout_seconds: int | None = None,
    worker_id: str | None = None,
    clock: Clock = utcnow,
    on_start: Callable[[int, str, str], None] | None = None,
    interrupted: Callable[[], str | None] | None = None,
) -> tuple[int, CommandOutcome]:
    """Run a command on a Ready lease now and record it as an ``executions`` row.

    ``on_start(execution_id, sandbox_id, marker)`` is called once the row exists, before the
    command starts (a caller that may stop it keeps these). If ``interrupted()`` returns a reason
    when the command returns, the row ends ``interrupted`` with that reason.

    Raises InvalidCommandError or LeaseNotReadyError before anything runs. The returned outcome
    carries the whole output; the row keeps it up to ``max_output_bytes``.
    """
    variables = check_env(env or {})
    command_line(command, cwd=cwd, env=variables)  # refuse a bad request before recording it
    worker = worker_id or make_worker_id("cli")
    timeout = timeout_seconds or settings.default_timeout_seconds
    now = clock()
    with db.session() as session:
        target = ready_target(session, lease_name, now)
    if target.idle:
        wake(provider, target.sandbox_id, timeout_seconds=settings.idle_start_timeout_seconds)
    with db.session() as session:
        row = Execution(
            lease_name=lease_name,
            command=command,
            cwd=cwd,
            timeout_seconds=timeout,
            state="running",
            claimed_by=worker,
            sandbox_id=target.sandbox_id,
            created_at=now,
            started_at=now,
        )
        session.add(row)
        session.flush()
        execution_id = row.id
    marker = execution_marker(execution_id, worker)
    if on_start is not None:
        on_start(execution_id, target.sandbox_id, marker)
    with logs.bound(lease=lease_name):
        log.info("execution %d: running on sandbox %s", execution_id, target.sandbox_id)
        # The row must reach a final state whatever happens (KeyboardInterrupt, a bug included).
        outcome = CommandOutcome(state="interrupted", error="interrupted before the command returned")
        try:
            outcome = run_command(
                provider,
                target.sandbox_id,
                command,
                cwd=cwd,
                workspace=target.workspace,
                env=variables,
                stdin=stdin,
                timeout_seconds=timeout,
                marker=marker,
            )
            reason = interrupted() if interrupted is not None else None
            if reason is not None:
                outcome = CommandOutcome(
                    state="interrupted",
                    output=outcome.output,
                    output_truncated=outcome.output_truncated,
                    error=reason,
                )
        except BaseException as exc:
            outcome = CommandOutcome(state="interrupted", error=f"interrupted: {type(exc).__name__}")
            raise
        finally:
            finish(
                db,
                execution_id,
                worker,
                outcome,
                lease_name=lease_name,
                sandbox_id=target.sandbox_id,
                max_output_bytes=settings.max_output_bytes,
                clock=clock,
            )
        log.info("execution %d: %s", execution_id, _detail(outcome) or outcome.state)
    return execution_id, outcome


def enqueue(
    db: Database,
    *,
    lease_name: str,
    command: str,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout_seconds: int | None = None,
    clock: Clock = utcnow,
) -> int:
    """Insert a ``queued`` row (env and command validated first); return its id."""
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
) -> ExecutionRecord:
    """Poll until the row reaches a terminal state; TimeoutError after ``timeout_seconds``."""
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    while True:
        record = get_record(db, execution_id)
        if record is None:
            raise ExecutionError(f"execution {execution_id} disappeared from the database")
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
    marker: str | None  # set when it was running: stop_in_sandbox(sandbox_id, marker) stops it


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
        was, claimed_by, sandbox_id = row.state, row.claimed_by, row.sandbox_id
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
    marker = execution_marker(execution_id, claimed_by) if was == "running" else None
    return Cancelled(execution_id, lease_name, was, sandbox_id, marker)


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
    ) -> None:
        self.db = db
        self.provider = provider
        self.settings = settings
        self.worker_id = worker_id or make_worker_id()
        self._clock = clock
        self._grace = interrupt_grace_seconds
        self._host = socket.gethostname()
        self._lock = threading.Lock()
        self._inflight: set[Future[None]] = set()
        self._closed = False
        self._last_recover = float("-inf")
        self._running: dict[int, Job] = {}
        self._stopping: set[int] = set()
        self._pool = ThreadPoolExecutor(
            max_workers=settings.max_concurrent, thread_name_prefix="leasectl-exec"
        )

    # -- public ----------------------------------------------------------------------------------

    def run_once(self, *, wait: bool = True) -> int:
        """Claim what can run now (up to the free slots) and start it; return how many rows were
        processed (started, or ended in error without running). With ``wait`` (the default), return
        only once the commands started by this call have finished."""
        started: list[Future[None]] = []
        processed = 0
        with self._lock:
            if self._closed:
                return 0
            if time.monotonic() - self._last_recover >= RECOVER_EVERY_SECONDS:
                self.recover_interrupted()
                self._sweep_cancelled()
            if self._running:
                self._stop_cancelled()
            if not self._anything_queued():
                return 0
            self._inflight = {f for f in self._inflight if not f.done()}
            free = self.settings.max_concurrent - len(self._inflight)
            while free > 0:
                jobs, ended = self._claim(free)
                processed += len(jobs) + ended
                for job in jobs:
                    future = self._pool.submit(self._run, job)
                    self._inflight.add(future)
                    started.append(future)
                if len(jobs) + ended < free:
                    break  # nothing more is runnable now
                free -= len(jobs)  # rows that ended in error took no slot: claim again
        if wait and started:
            futures.wait(started)
        return processed

    def drain(self) -> int:
        """Run everything runnable now, then return the number of rows processed."""
        total = 0
        while n := self.run_once(wait=True):
            total += n
        return total

    def run_forever(self, stop: threading.Event) -> None:
        """Poll every ``exec.poll_interval_seconds`` until ``stop`` is set, then shut down."""
        self.recover_interrupted()
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

        Rows still running when the process exits become ``interrupted`` at the next start.
        """
        with self._lock:
            self._closed = True
            pending = {f for f in self._inflight if not f.done()}
        _, not_done = futures.wait(pending, timeout=timeout) if pending else (set(), set())
        self._pool.shutdown(wait=not not_done, cancel_futures=True)
        if not_done:
            log.warning("execution dispatcher: %d command(s) still running at shutdown", len(not_done))
        return not not_done

    def recover_interrupted(self) -> int:
        """Mark ``running`` rows whose worker is gone ``interrupted`` (see the module docstring)."""
        self._last_recover = time.monotonic()
        now = self._clock()
        marked: list[tuple[int, str, str | None, str]] = []
        with self.db.session() as session:
            rows = session.execute(
                sa.select(
                    Execution.id,
                    Execution.lease_name,
                    Execution.sandbox_id,
                    Execution.claimed_by,
                    Execution.started_at,
                    Execution.timeout_seconds,
                ).where(Execution.state == "running")
            ).all()
            for row in rows:
                if row.claimed_by == self.worker_id:
                    continue
                reason = self._gone(row.claimed_by, row.started_at, row.timeout_seconds, now)
                if reason is None:
                    continue
                result = _update(
                    session,
                    sa.update(Execution)
                    .where(
                        Execution.id == row.id,
                        Execution.state == "running",
                        Execution.claimed_by.is_(None)
                        if row.claimed_by is None
                        else Execution.claimed_by == row.claimed_by,
                    )
                    .values(
                        state="interrupted",
                        error=reason,
                        finished_at=now,
                        env=sa.null(),
                        stdin=sa.null(),
                    ),
                )
                if result == 1:
                    _event(
                        session, row.id, row.lease_name, row.sandbox_id, "interrupted", reason, self.worker_id
                    )
                    marked.append((row.id, row.lease_name, row.sandbox_id, reason))
        for execution_id, lease_name, _, reason in marked:
            with logs.bound(lease=lease_name):
                log.warning("execution %d: %s", execution_id, reason)
        return len(marked)

    # -- internals -------------------------------------------------------------------------------

    def _gone(
        self, claimed_by: str | None, started_at: datetime | None, timeout: int | None, now: datetime
    ) -> str | None:
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
        """Stop, in the sandbox, commands of this dispatcher whose rows were cancelled meanwhile."""
        ids = [i for i in self._running if i not in self._stopping]
        if not ids:
            return
        with self.db.session(readonly=True) as session:
            cancelled = session.scalars(
                sa.select(Execution.id).where(Execution.id.in_(ids), Execution.state == "cancelled")
            ).all()
        for execution_id in cancelled:
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
        with self.db.session() as session:
            found = session.scalar(sa.select(Execution.id).where(Execution.state == "queued").limit(1))
            return found is not None

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

    def _claim(self, limit: int) -> tuple[list[Job], int]:
        """One claim transaction: up to ``limit`` rows become running (returned as jobs) or end in
        error (counted); rows for leases still starting stay queued."""
        now = self._clock()
        cutoff = now - timedelta(seconds=self.settings.queue_wait_seconds)
        query = (
            sa.select(Execution, Lease, LeaseStatus)
            .options(_LEASE_COLUMNS)
            .outerjoin(Lease, Lease.name == Execution.lease_name)
            .outerjoin(LeaseStatus, LeaseStatus.lease_name == Execution.lease_name)
            .where(Execution.state == "queued")
            .where(
                sa.or_(
                    LeaseStatus.phase.in_(RUNNABLE_PHASES),
                    Lease.id.is_(None),
                    Lease.desired_state != "running",
                    Lease.expires_at <= now,
                    Execution.created_at <= cutoff,
                )
            )
            .order_by(Execution.id)
            .limit(limit)
        )
        if not self.db.is_sqlite:
            query = query.with_for_update(of=Execution, skip_locked=True)
        jobs: list[Job] = []
        ended: list[tuple[int, str, str]] = []
        with self.db.session() as session:
            for execution, lease, status in session.execute(query).tuples():
                job, problem = self._decide(execution, lease, status, now)
                if job is None and problem is None:
                    continue  # still waiting for its lease
                values: dict[str, Any] = {"env": sa.null(), "stdin": sa.null()}
                if job is not None:
                    values |= {
                        "state": "running",
                        "claimed_by": self.worker_id,
                        "started_at": now,
                        "sandbox_id": job.sandbox_id,
                    }
                else:
                    values |= {"state": "error", "error": problem, "finished_at": now}
                result = _update(
                    session,
                    sa.update(Execution)
                    .where(Execution.id == execution.id, Execution.state == "queued")
                    .values(**values),
                )
                if result != 1:
                    continue
                if job is not None:
                    jobs.append(job)
                else:
                    assert problem is not None
                    _event(
                        session, execution.id, execution.lease_name, None, "error", problem, self.worker_id
                    )
                    ended.append((execution.id, execution.lease_name, problem))
        for execution_id, lease_name, problem in ended:
            with logs.bound(lease=lease_name):
                log.warning("execution %d: %s", execution_id, problem)
        return jobs, len(ended)

    def _decide(
        self, row: Execution, lease: Lease | None, status: LeaseStatus | None, now: datetime
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
        with self._lock:
            self._running[job.id] = job
        try:
            self._run_job(job)
        finally:
            with self._lock:
                self._running.pop(job.id, None)
                self._stopping.discard(job.id)

    def _run_job(self, job: Job) -> None:
        with logs.bound(lease=job.lease_name):
            log.info("execution %d: running on sandbox %s", job.id, job.sandbox_id)
            try:
                if job.idle:
                    wake(
                        self.provider,
                        job.sandbox_id,
                        timeout_seconds=self.settings.idle_start_timeout_seconds,
                    )
                outcome = run_command(
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
            except (InvalidCommandError, LeaseNotReadyError) as exc:
                outcome = CommandOutcome(state="error", error=str(exc))
            except Exception as exc:
                log.exception("execution %d: unexpected failure", job.id)
                outcome = CommandOutcome(
                    state="error", error=_short_error(f"{type(exc).__name__}: {exc}", job.env)
                )
            try:
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
            except sa.exc.SQLAlchemyError:
                log.exception("execution %d: could not record its result (%s)", job.id, outcome.state)
                return
            log.info("execution %d: %s", job.id, _detail(outcome) or outcome.state)
