"""One command on a lease, now: the provider calls (one request, or a Daytona session followed to its
end), how a command ended, secrets kept out of what is stored, and ``leasectl exec``'s direct path
(:func:`execute_now`).

Nothing here imports SQLAlchemy, the models or the settings models: ``leasectl exec`` runs one
command and its start-up is mostly imports (issue 14). The rows the direct path reads and writes go
through an :class:`ExecRows`: :class:`controller.exec_rows.DriverRows` (the driver itself, for the
plain URLs :mod:`controller.dbapi` knows) or ``controller.execution.DatabaseRows`` (SQLAlchemy Core,
for any other URL and for callers holding a ``Database``). :mod:`controller.execution` (the queue
and its :class:`~controller.execution.Dispatcher`) builds on the same functions and re-exports
them; its docstring describes the row states, sessions, markers and fencing that both follow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from controller import logs
from controller.errors import (
    AUTH_HINT,
    AuthError,
    CapacityError,
    ConflictError,
    LeasectlError,
    NotFoundError,
    NotSentError,
    PermanentError,
    ProviderError,
    RateLimitedError,
    StateConflictError,
)
from controller.execution_script import (
    ScriptInputError,
    build_script,
    stop_script,
    validate_env,
    wrap_for_exec,
)
from controller.providers.base import SandboxProvider, SessionCommand
from controller.secrets import is_ref, resolvable_values

if TYPE_CHECKING:
    from controller.config import ExecSettings
    from controller.db import Database

log = logging.getLogger(__name__)

STDIN_DIR = "/tmp"
ERROR_MAX_CHARS = 4000
EXIT_TIMED_OUT = 124  # what `leasectl exec` (like coreutils `timeout`) exits with on a time-out

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Now, timezone-aware UTC (as ``models.utcnow``, which this module does not import)."""
    return datetime.now(UTC)


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


# Not a row state: the attempt provably did not start the command; the queue tries it again.
NOT_STARTED = "not_started"
MAY_HAVE_RUN = (
    "the command may or may not have run (the request that starts it was sent, its answer was lost); "
    "it is not retried"
)


@dataclass(frozen=True)
class CommandOutcome:
    """How one command ended. ``exit_code`` is None unless the command ran to its end."""

    state: str  # succeeded | failed | timed_out | error | unknown | interrupted | not_started
    exit_code: int | None = None
    output: str = ""
    output_truncated: bool = False
    error: str | None = None
    retry_after: float | None = None  # not_started: the server's hint, if any
    auth_failed: bool = False  # not_started: the API refused our credentials (AuthError, 401/403)

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
    return redact_values(text, env.values())


def redact_values(text: str, values: Iterable[str]) -> str:
    """``text`` with every non-trivial value (3 characters or more) masked, longest first."""
    for value in sorted({v for v in values if len(v) >= 3}, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def secret_values_of(raw: str | None) -> tuple[str, ...]:
    """:func:`lease_secret_values` of a lease env column read as text (the claim reads it along)."""
    try:
        env = json.loads(raw) if raw else {}
    except ValueError:
        return ()
    if not isinstance(env, dict):
        return ()
    refs = {str(k): v for k, v in env.items() if is_ref(v)}
    return tuple(resolvable_values(refs)) if refs else ()


def _redacted(outcome: CommandOutcome, secrets: Sequence[str]) -> CommandOutcome:
    if not secrets:
        return outcome
    error = redact_values(outcome.error, secrets) if outcome.error is not None else None
    return replace(outcome, output=redact_values(outcome.output, secrets), error=error)


def _short_error(text: str, env: Mapping[str, str]) -> str:
    text = redact(text, env)
    return text if len(text) <= ERROR_MAX_CHARS else text[: ERROR_MAX_CHARS - 3] + "..."


def may_have_started(exc: ProviderError) -> bool:
    """Whether a failed call that starts a command (exec, session execute) may have started it.

    Pure; the table of causes is in docs/execution.md. No: the request never reached the server
    (:class:`NotSentError`: connection refused, or the sandbox lookup before it failed), 429 (a
    throttler answers before anything runs), 401/403 (:class:`AuthError`: the credentials were
    refused), any other 4xx but 408 (the server refused the request).
    Yes: no answer after sending (time-out, reset), 408, 5xx: the server may have acted on it.
    """
    if isinstance(exc, NotSentError | RateLimitedError | AuthError):
        return False
    status = exc.status
    if status is not None:
        return status == 408 or status >= 500
    # No status (the in-memory provider, or no answer): refusals are typed, the rest may have run.
    return not isinstance(exc, NotFoundError | PermanentError | ConflictError | CapacityError)


def not_started(what: str, exc: BaseException, env: Mapping[str, str]) -> CommandOutcome:
    """The outcome of an attempt that provably did not start the command."""
    return CommandOutcome(
        state=NOT_STARTED,
        error=_short_error(f"{what}: {type(exc).__name__}: {exc}", env),
        retry_after=getattr(exc, "retry_after", None),
        auth_failed=isinstance(exc, AuthError),
    )


def auth_failure_message(outcome: CommandOutcome) -> str:
    """What ``leasectl exec`` says when the API refused the credentials: the status (in the error)
    and where the key comes from; never the key."""
    return f"the Daytona API refused the credentials, the command never ran: {AUTH_HINT} ({outcome.error})"


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
            try:
                provider.upload(sandbox_id, stdin_path, stdin)
            except ProviderError as exc:
                return not_started("stdin upload failed", exc, variables)
        try:
            result = provider.exec(sandbox_id, line, timeout=timeout_seconds)
        except ProviderError as exc:
            if not may_have_started(exc):
                return not_started("exec not started", exc, variables)
            detail = _short_error(f"{type(exc).__name__}: {exc}", variables)
            return CommandOutcome(state="unknown", error=f"{MAY_HAVE_RUN} ({detail})")
    finally:
        if stdin_path is not None:
            _remove_stdin(provider, sandbox_id, stdin_path)
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


def _remove_stdin(provider: SandboxProvider, sandbox_id: str, path: str) -> None:
    try:
        provider.delete_file(sandbox_id, path)
    except ProviderError as exc:
        log.warning("could not remove %s from sandbox %s: %s", path, sandbox_id, exc)


def execution_marker(execution_id: int, claimed_by: str | None) -> str:
    """The marker the command of row ``execution_id`` runs under when ``claimed_by`` runs it; anyone
    holding the row can derive it to stop the command."""
    digest = hashlib.sha256((claimed_by or "").encode()).hexdigest()[:12]
    return f"x{execution_id}-{digest}"


STOP_TIMEOUT_SECONDS = 30


def stop_in_sandbox(
    provider: SandboxProvider, sandbox_id: str, marker: str, session_id: str | None = None
) -> str | None:
    """Kill the processes of the command running under ``marker`` (SIGTERM, then SIGKILL) through
    the toolbox, after deleting its session if it runs in one. None when none is left, else why
    that is not certain."""
    if session_id is not None:
        try:
            provider.delete_session(sandbox_id, session_id)
        except ProviderError as exc:
            log.warning("could not delete session %s in sandbox %s: %s", session_id, sandbox_id, exc)
    try:
        result = provider.exec(sandbox_id, stop_script(marker), timeout=STOP_TIMEOUT_SECONDS)
    except ProviderError as exc:
        log.warning("could not stop command %s in sandbox %s: %s", marker, sandbox_id, exc)
        return f"could not reach the sandbox to stop it ({type(exc).__name__}: {exc})"
    if result.timed_out or result.exit_code != 0:
        return "some of its processes may still run (they did not stop on SIGKILL)"
    return None


# -- session commands ----------------------------------------------------------------------------

LOST_GRACE_SECONDS = 120.0  # after its deadline, how long a follower keeps trying to reach a command
# The pause before the first poll of a session command; it doubles after each poll up to
# log_poll_seconds. A short command (``true`` on the local API) has ended 10-20 ms after its execute
# answered: polling at once would only find it running, and a first pause of 50 ms would be most
# of such a command's wall time.
FIRST_POLL_SECONDS = 0.01


def _sandbox_gone(provider: SandboxProvider, sandbox_id: str) -> str | None:
    """Why the sandbox can no longer hold a session (gone, or not started: its sessions died with
    its processes), or None when it is started or cannot be looked up now."""
    try:
        observed = provider.get(sandbox_id)
    except ProviderError:
        return None
    if observed is None:
        return f"sandbox {sandbox_id} is gone"
    if observed.state != "started":
        return f"sandbox {sandbox_id} is {observed.state}"
    return None


def new_session_id(execution_id: int) -> str:
    """A fresh Daytona session id for one attempt of row ``execution_id``."""
    return f"leasectl-x{execution_id}-{uuid.uuid4().hex[:10]}"


def session_stdin_path(session_id: str) -> str:
    """Where the stdin of the command of ``session_id`` is uploaded (derivable after a re-attach)."""
    return f"{STDIN_DIR}/leasectl-stdin-{session_id}"


def start_in_session(
    provider: SandboxProvider,
    sandbox_id: str,
    session_id: str,
    line: str,
    *,
    env: Mapping[str, str],
    stdin: bytes | None = None,
    on_session: Callable[[], None] | None = None,
) -> tuple[str | None, CommandOutcome | None]:
    """Upload stdin, create the session and start ``line`` in it asynchronously.

    ``(command_id, None)`` once it runs; ``(None, outcome)`` when it did not start (``not_started``)
    or may have (``unknown``). ``on_session()`` runs once the session exists, before the command is
    sent (the caller records the session on the row first).
    """
    stdin_path = session_stdin_path(session_id) if stdin is not None else None
    try:
        if stdin is not None and stdin_path is not None:
            provider.upload(sandbox_id, stdin_path, stdin)
        provider.create_session(sandbox_id, session_id)
    except ProviderError as exc:
        if stdin_path is not None:
            _remove_stdin(provider, sandbox_id, stdin_path)
        return None, not_started("session not created", exc, env)
    if on_session is not None:
        try:
            on_session()
        except Exception as exc:  # not recorded (the database, typically): the command is not sent
            _drop_session(provider, sandbox_id, session_id, stdin_path)
            return None, not_started("session not recorded", exc, env)
    try:
        return provider.session_execute(sandbox_id, session_id, line), None
    except ProviderError as exc:
        if not may_have_started(exc):
            _drop_session(provider, sandbox_id, session_id, stdin_path)
            return None, not_started("session execute not started", exc, env)
        detail = _short_error(f"{type(exc).__name__}: {exc}", env)
        return None, CommandOutcome(state="unknown", error=f"{MAY_HAVE_RUN} ({detail})")


def _drop_session(
    provider: SandboxProvider, sandbox_id: str, session_id: str, stdin_path: str | None
) -> None:
    try:
        provider.delete_session(sandbox_id, session_id)
    except ProviderError as exc:
        log.warning("could not delete session %s in sandbox %s: %s", session_id, sandbox_id, exc)
    if stdin_path is not None:
        _remove_stdin(provider, sandbox_id, stdin_path)


# should_stop() answers None (go on), ("detach", why): leave the command running for another
# worker, or (state, why): stop it in the sandbox and end the row in ``state``.
StopCheck = Callable[[], tuple[str, str] | None]
DETACH = "detach"


def follow_session(
    provider: SandboxProvider,
    sandbox_id: str,
    session_id: str,
    command_id: str,
    *,
    deadline: datetime,
    timeout_seconds: int,
    poll_seconds: float,
    max_output_bytes: int | None,
    on_output: Callable[[str], None] | None = None,
    should_stop: StopCheck | None = None,
    has_stdin: bool = False,
    clock: Clock = utcnow,
    sleep: Callable[[float], None] = time.sleep,
    lost_grace_seconds: float = LOST_GRACE_SECONDS,
) -> CommandOutcome:
    """Poll a session command until it ends, passing its output so far (capped) to ``on_output``
    whenever it grew; stop it at ``deadline`` (``timed_out``) or when ``should_stop`` says so.

    The exit code is read before the logs, so the logs read after the command ended are complete.
    A command whose session is gone (the sandbox restarted) ends ``interrupted``: its result cannot be
    learned; one that cannot be reached until ``lost_grace_seconds`` after its deadline ends
    ``unknown``; one whose sandbox stopped or went away ends ``interrupted`` too. The first poll
    comes ``FIRST_POLL_SECONDS`` after the start and the pauses double up to ``poll_seconds``, so
    short commands pay little. The session (and the stdin file) are removed when the command has ended.
    """
    marker = execution_marker_for_session(session_id)
    stdin_path = session_stdin_path(session_id) if has_stdin else None
    output = ""
    truncated = False
    # Short commands end within the first polls: start fast, then slow down to ``poll_seconds``.
    pause = min(FIRST_POLL_SECONDS, poll_seconds)
    sleep(pause)  # a command started just now has not ended yet

    def publish(text: str) -> None:
        nonlocal output, truncated
        capped, cut = cap_output(text, max_output_bytes)
        if capped != output or cut != truncated:
            output, truncated = capped, cut
            if on_output is not None:
                on_output(output)

    def stop(state: str, reason: str) -> CommandOutcome:
        problem = stop_in_sandbox(provider, sandbox_id, marker, session_id)
        if stdin_path is not None:
            _remove_stdin(provider, sandbox_id, stdin_path)
        return CommandOutcome(
            state=state,
            output=output,
            output_truncated=truncated,
            error=reason + (f"; {problem}" if problem else ""),
        )

    while True:
        request = should_stop() if should_stop is not None else None
        if request is not None:
            state, reason = request
            if state == DETACH:
                return CommandOutcome(state=DETACH, output=output, error=reason)
            return stop(state, reason)
        try:
            command: SessionCommand = provider.session_command(sandbox_id, session_id, command_id)
            text = provider.session_logs(sandbox_id, session_id, command_id)
        except NotFoundError as exc:
            return CommandOutcome(
                state="interrupted",
                output=output,
                output_truncated=truncated,
                error=f"interrupted: its session command is gone ({exc}); its result cannot be learned",
            )
        except ProviderError as exc:
            gone = _sandbox_gone(provider, sandbox_id)
            if gone is not None:
                return CommandOutcome(
                    state="interrupted",
                    output=output,
                    output_truncated=truncated,
                    error=f"interrupted: {gone} while the command ran ({exc}); its result cannot be learned",
                )
            now = clock()
            if now >= deadline + timedelta(seconds=lost_grace_seconds):
                return CommandOutcome(
                    state="unknown",
                    output=output,
                    output_truncated=truncated,
                    error=f"could not reach the command until after its time-out ({exc}); it may still run",
                )
            log.warning("session command %s in sandbox %s: %s (will retry)", command_id, sandbox_id, exc)
            sleep(poll_seconds)
            continue
        publish(text)
        pause = min(poll_seconds, pause * 2)
        if command.exit_code is not None:
            _drop_session(provider, sandbox_id, session_id, stdin_path)
            code = command.exit_code
            return CommandOutcome(
                state="succeeded" if code == 0 else "failed",
                exit_code=code,
                output=output,
                output_truncated=truncated,
            )
        if clock() >= deadline:
            outcome = stop("timed_out", f"timed out after {timeout_seconds} s")
            return outcome
        sleep(pause)


def execution_marker_for_session(session_id: str) -> str:
    """The marker of a command run in session ``session_id`` (any worker can derive it)."""
    digest = hashlib.sha256(session_id.encode()).hexdigest()[:12]
    return f"s-{digest}"


# -- rows ----------------------------------------------------------------------------------------


RUNNABLE_PHASES = ("Ready", "Idle")


@dataclass(frozen=True)
class Target:
    """A Ready (or Idle) lease: where its commands run."""

    lease_name: str
    sandbox_id: str
    workspace: str | None
    idle: bool = False


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
        hint = f": {AUTH_HINT}" if isinstance(exc, AuthError) else ""
        raise LeaseNotReadyError(f"could not start idle sandbox {sandbox_id}: {exc}{hint}") from exc
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


@dataclass(frozen=True)
class _LeaseView:
    """The lease columns the queue reads (a claim selects them with Core, no ORM object)."""

    desired_state: str
    expires_at: datetime | None


@dataclass(frozen=True)
class _StatusView:
    """The status columns the queue reads."""

    phase: str
    sandbox_id: str | None
    workspace_path: str | None


def _not_runnable(lease_name: str, lease: _LeaseView | None, now: datetime) -> str | None:
    """Why commands can never run on this lease as it is, or None."""
    if lease is None:
        return f"no such lease: {lease_name!r}"
    if lease.desired_state != "running":
        return f"lease {lease_name!r} is not desired running (desired state {lease.desired_state})"
    if lease.expires_at is not None and lease.expires_at <= now:
        return f"lease {lease_name!r} expired at {lease.expires_at.isoformat()}"
    return None


def runnable_target(lease_name: str, status: _StatusView | None) -> Target:
    """The sandbox of a lease whose status is ``status`` (None: no status row yet), or
    LeaseNotReadyError when it is not Ready (or Idle) with a sandbox."""
    if status is None or status.phase not in RUNNABLE_PHASES or not status.sandbox_id:
        phase = status.phase if status is not None else "Pending"
        raise LeaseNotReadyError(f"lease {lease_name!r} is not Ready (phase {phase})")
    return Target(lease_name, status.sandbox_id, status.workspace_path, idle=status.phase == "Idle")


def _detail(outcome: CommandOutcome) -> str | None:
    if outcome.state in ("succeeded", "failed"):
        return f"exit {outcome.exit_code}"
    return outcome.error


def stored_result(
    outcome: CommandOutcome, now: datetime, max_output_bytes: int, secrets: Sequence[str] = ()
) -> dict[str, Any]:
    """The result columns of a finished row: secrets masked, text a database can store, output
    capped (after the NUL substitution: each NUL becomes U+FFFD, 3 bytes, since PostgreSQL text
    cannot hold NUL)."""
    outcome = _redacted(outcome, secrets)
    output, truncated = cap_output(storable(outcome.output), max_output_bytes)
    return {
        "state": outcome.state,
        "exit_code": outcome.exit_code,
        "output": output,
        "output_truncated": truncated or outcome.output_truncated,
        "error": storable(outcome.error) if outcome.error is not None else None,
        "finished_at": now,
    }


def event_message(execution_id: int, outcome: CommandOutcome) -> str:
    """The message of a finished row's ``exec`` event (``outcome`` already redacted)."""
    detail = _detail(outcome)
    return f"execution {execution_id}" + (f": {detail}" if detail else "")


class ExecRows(ABC):
    """The rows :func:`execute_now` reads and writes, and how: one implementation per way to the
    database (the driver, SQLAlchemy); both store the same values in the same formats.

    Every write to the row after its insert is fenced (``state = 'running' AND claimed_by =
    worker``): a row someone else ended (cancelled, declared interrupted) is left as it is."""

    @abstractmethod
    def ready_target(self, lease_name: str, now: datetime) -> Target:
        """The schema guard (:class:`~controller.errors.SchemaError` on a schema this leasectl was
        not built for), then the lease's sandbox, or :class:`LeaseNotReadyError` saying why not."""

    @abstractmethod
    def secret_values(self, lease_name: str) -> tuple[str, ...]:
        """:func:`secret_values_of` the lease's env column read as text."""

    @abstractmethod
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
        """Insert the row ``running``, claimed by ``worker``, created and started at ``now``; its id."""

    @abstractmethod
    def record(self, execution_id: int, worker: str, values: Mapping[str, Any]) -> None:
        """Set ``values`` (any of ``output``, ``output_truncated``, ``session_id``, ``command_id``,
        ``attempts``, ``attempt_log``) on the row if it still runs under ``worker``."""

    @abstractmethod
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
        """Record the outcome and its event in one transaction if the row still runs under
        ``worker``, and return True; else clear the row's ``env`` and ``stdin``, log that the result
        was dropped and return False."""


def _database_rows(db: Database) -> ExecRows:
    from controller.execution import DatabaseRows

    return DatabaseRows(db)


def execute_now(
    db: Database | ExecRows,
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
    on_output: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, CommandOutcome]:
    """Run a command on a Ready lease now and record it as an ``executions`` row.

    ``on_start(execution_id, sandbox_id, marker)`` is called once the row exists, before the
    command starts (a caller that may stop it keeps these). If ``interrupted()`` returns a reason
    (polled while a session command runs, and when the command returns), the command is stopped and
    the row ends ``interrupted`` with that reason. Commands whose time-out reaches
    ``exec.session_min_timeout_seconds`` run in a session: ``on_output(text)`` then receives the
    output so far whenever it grew, and the row shows it too. An attempt that provably did not start
    the command is tried again (back-off as in the queue) for up to ``exec.queue_wait_seconds``,
    except one the API refused for its credentials (401/403, :class:`AuthError`): a wrong key does
    not heal while a user waits, so the row ends ``error`` at once, saying to check the key. An
    unexpected exception (a bug) ends the row ``error`` too, and propagates.

    Raises InvalidCommandError or LeaseNotReadyError before anything runs. The returned outcome
    carries the whole output; the row keeps it up to ``max_output_bytes``.
    """
    variables = check_env(env or {})
    command_line(command, cwd=cwd, env=variables)  # refuse a bad request before recording it
    worker = worker_id or make_worker_id("cli")
    timeout = timeout_seconds or settings.default_timeout_seconds
    use_session = timeout >= settings.session_min_timeout_seconds
    now = clock()
    rows = db if isinstance(db, ExecRows) else _database_rows(db)
    target = rows.ready_target(lease_name, now)  # the schema guard first: rows are written next
    if target.idle:
        wake(provider, target.sandbox_id, timeout_seconds=settings.idle_start_timeout_seconds)
    secrets = rows.secret_values(lease_name)
    execution_id = rows.insert_running(
        lease_name=lease_name,
        command=command,
        cwd=cwd,
        timeout_seconds=timeout,
        worker=worker,
        sandbox_id=target.sandbox_id,
        now=now,
    )
    session_id = new_session_id(execution_id) if use_session else None
    marker = (
        execution_marker_for_session(session_id) if session_id else execution_marker(execution_id, worker)
    )
    if on_start is not None:
        on_start(execution_id, target.sandbox_id, marker)

    def record(**values: Any) -> None:
        if "output" in values:
            text, cut = cap_output(redact_values(values["output"], secrets), settings.max_output_bytes)
            values |= {"output": storable(text), "output_truncated": cut}
        rows.record(execution_id, worker, values)

    publish = _fan_out(on_output, lambda text: record(output=text))

    def should_stop() -> tuple[str, str] | None:
        reason = interrupted() if interrupted is not None else None
        return ("interrupted", reason) if reason is not None else None

    def attempt() -> CommandOutcome:
        if session_id is None:
            return run_command(
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
        line = command_line(
            command,
            cwd=cwd,
            workspace=target.workspace,
            env=variables,
            stdin_path=session_stdin_path(session_id) if stdin is not None else None,
            marker=marker,
        )
        command_id, early = start_in_session(
            provider,
            target.sandbox_id,
            session_id,
            line,
            env=variables,
            stdin=stdin,
            on_session=lambda: record(session_id=session_id),
        )
        if early is not None:
            return early
        assert command_id is not None
        record(command_id=command_id)
        return follow_session(
            provider,
            target.sandbox_id,
            session_id,
            command_id,
            deadline=clock() + timedelta(seconds=timeout),
            timeout_seconds=timeout,
            poll_seconds=settings.log_poll_seconds,
            max_output_bytes=None,
            on_output=lambda text: publish(redact_values(text, secrets)),
            should_stop=should_stop,
            has_stdin=stdin is not None,
            clock=clock,
            sleep=sleep,
        )

    with logs.bound(lease=lease_name):
        log.info("execution %d: running on sandbox %s", execution_id, target.sandbox_id)
        # The row must reach a final state whatever happens (KeyboardInterrupt, a bug included).
        outcome = CommandOutcome(state="interrupted", error="interrupted before the command returned")
        history: list[dict[str, str]] = []
        try:
            while True:
                outcome = attempt()
                if outcome.state != NOT_STARTED:
                    break
                history.append({"at": clock().isoformat(), "reason": outcome.error or "not started"})
                delay = retry_delay(
                    len(history),
                    base=settings.retry_backoff_seconds,
                    cap=settings.retry_backoff_max_seconds,
                    retry_after=outcome.retry_after,
                    jitter=random.random(),
                )
                record(attempts=len(history), attempt_log=history)
                if outcome.auth_failed:
                    outcome = CommandOutcome(state="error", error=auth_failure_message(outcome))
                    break
                waited = (clock() - now).total_seconds()
                if waited + delay > settings.queue_wait_seconds or should_stop() is not None:
                    outcome = CommandOutcome(
                        state="error",
                        error=f"not started after {len(history)} attempt(s) (it never ran); "
                        f"last: {outcome.error}",
                    )
                    break
                log.info(
                    "execution %d: not started (%s); retry in %.1f s", execution_id, outcome.error, delay
                )
                sleep(delay)
            reason = interrupted() if interrupted is not None else None
            if reason is not None and outcome.state != "interrupted":
                outcome = CommandOutcome(
                    state="interrupted",
                    output=outcome.output,
                    output_truncated=outcome.output_truncated,
                    error=reason,
                )
        except Exception as exc:  # a bug: the row says so (not "interrupted"), the caller sees it
            text = redact_values(f"unexpected failure: {type(exc).__name__}: {exc}", secrets)
            outcome = CommandOutcome(state="error", error=_short_error(text, variables))
            raise
        except BaseException as exc:
            outcome = CommandOutcome(state="interrupted", error=f"interrupted: {type(exc).__name__}")
            raise
        finally:
            rows.finish(
                execution_id,
                worker,
                outcome,
                lease_name=lease_name,
                sandbox_id=target.sandbox_id,
                max_output_bytes=settings.max_output_bytes,
                clock=clock,
                secrets=secrets,
            )
        outcome = _redacted(outcome, secrets)
        log.info("execution %d: %s", execution_id, _detail(outcome) or outcome.state)
    return execution_id, outcome


def _fan_out(*callbacks: Callable[[str], None] | None) -> Callable[[str], None]:
    def call(text: str) -> None:
        for callback in callbacks:
            if callback is not None:
                callback(text)

    return call


def retry_delay(
    attempts: int, *, base: float, cap: float, retry_after: float | None = None, jitter: float = 1.0
) -> float:
    """Back-off before attempt ``attempts + 1``: ``base * 2**(attempts-1)`` capped at ``cap``, scaled
    by ``0.5 + jitter/2`` (``jitter`` in [0, 1]); never shorter than the server's ``retry_after``."""
    delay = min(cap, base * 2 ** max(0, attempts - 1)) * (0.5 + max(0.0, min(1.0, jitter)) / 2)
    return float(max(delay, retry_after or 0.0))
