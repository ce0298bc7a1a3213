"""An in-memory ``SandboxProvider`` for fast unit tests: state in dicts, a call log, fault hooks.

Used by tests (planner/applier/convergence, execution) in place of ``providers.daytona``; nothing in
the daemon uses it. Tests assert on its state (``sandboxes``, ``calls``, ``counters``), not on mocks.

Behaviour, by default, follows Daytona's server (../shared/reference/daytona-server-semantics.md):
every lifecycle call takes effect at once (create lands in ``started``, start -> ``started``, stop ->
``stopped``, ...). Names are unique (create with a taken name raises ``ConflictError``); an operation
the current state does not allow raises ``StateConflictError`` (a transition in progress, a stop of a
stopped sandbox, an archive of an archived one; a start of a started one is a no-op); a sandbox in
``error`` refuses start/stop/archive; a create/start/recover that ends in ``error``/``build_failed``
raises ``StartFailedError`` while the sandbox stays (``create_waits``); ``quota`` live sandboxes at
most (``CapacityError`` beyond); an ephemeral sandbox (``auto_delete_interval`` 0) is deleted by stop
and refuses archive. ``get`` returns None for an unknown id or name, ``delete`` of a missing sandbox
is a no-op. Scripting hooks:

- ``fail_next(op, error, times=1, after_effect=False)``: the next ``times`` calls of ``op`` (or ``"*"``)
  raise ``error`` (an exception, or a callable making one), before the effect or, with
  ``after_effect=True``, after it (a create whose answer was lost).
- ``script_create(state, ...)``: the next creates land in ``error`` / ``build_failed`` / any state.
- ``stick_next(op, state)``: the next ``op`` leaves the sandbox in the transitional ``state``;
  ``stick(id, state)`` does it now; ``release(id)`` finishes the transition. While stuck, lifecycle
  calls other than delete raise ``ConflictError``.
- ``fall_into_error(id, recoverable=..., reason=...)``, ``set_state(id, state)``: out-of-band changes;
  ``remove(id)``: deleted behind the controller's back; ``add_sandbox(...)``: seed existing sandboxes.
- ``list_lag`` seconds of the injectable clock: ``list_sandboxes`` omits sandboxes created less than
  ``list_lag`` ago, still shows (in their last state) sandboxes deleted less than ``list_lag`` ago,
  and shows every sandbox in the state it had ``list_lag`` ago (states lag too, as on Daytona).
  The default clock is a manual one moved by ``advance(seconds)``.
- ``on_call(op, key)``: called outside the lock before each call (latency, barriers in tests).
- ``list_hook(result) -> result``: rewrites what ``list_sandboxes`` answers (a list that flaps, shows
  stale labels or states); ``get`` keeps telling the truth.
- ``exec_hook(sandbox_id, command, cwd, env, timeout)``: answers ``exec`` (default: echoes the command)
  and session commands (run when started; with ``hold_session_commands`` they show their output but
  stay running until ``finish_commands()``); ``delete_session`` ends its running commands with -1.

``calls`` is the list of ``(op, sandbox id or name)`` in call order (``list`` logs ``""``);
``counters`` counts calls per op. Every method is thread-safe (one re-entrant lock).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from controller.errors import (
    CapacityError,
    ConflictError,
    NotFoundError,
    PermanentError,
    StartFailedError,
    StateConflictError,
)
from controller.providers.base import (
    STATE_ARCHIVED,
    STATE_BUILD_FAILED,
    STATE_DESTROYED,
    STATE_ERROR,
    STATE_PAUSED,
    STATE_STARTED,
    STATE_STOPPED,
    CreateRequest,
    ExecResult,
    ObservedSandbox,
    SandboxUpdate,
    SessionCommand,
)

log = logging.getLogger(__name__)

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
OPS = (
    "list",
    "get",
    "create",
    "start",
    "stop",
    "archive",
    "recover",
    "delete",
    "exec",
    "work_dir",
    "make_dir",
    "upload",
    "delete_file",
    "session_create",
    "session_execute",
    "session_command",
    "session_logs",
    "session_delete",
)

ErrorSpec = BaseException | Callable[[], BaseException]
_REFUSAL = {
    "stop": "Sandbox is not in a stoppable state",
    "archive": "Sandbox is not stopped",
    "start": "Sandbox is not in valid state",
    "recover": "Sandbox is not in an errored state",
}
ExecHook = Callable[[str, str, str | None, Mapping[str, str] | None, int | None], ExecResult]


@dataclass
class MemoryCommand:
    """A session command as the memory provider holds it: it ran through ``exec_hook`` when it was
    started, unless ``hold_session_commands`` keeps it running until :meth:`MemoryProvider.finish`."""

    command: str
    exit_code: int | None = None
    output: str = ""
    result: ExecResult | None = None


@dataclass
class MemorySandbox:
    """One sandbox as the memory provider holds it (mutable; read it in tests)."""

    id: str
    name: str
    state: str
    labels: dict[str, str]
    created_at: float
    request: CreateRequest | None = None
    error_reason: str | None = None
    recoverable: bool = False
    pending_state: str | None = None  # set while stuck in a transitional state
    deleted_at: float | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    # session id -> command id -> the command's state (sessions of the toolbox)
    sessions: dict[str, dict[str, MemoryCommand]] = field(default_factory=dict)
    # (time, state, error_reason, recoverable) of every change, for a list that lags in states
    history: list[tuple[float, str, str | None, bool]] = field(default_factory=list)

    def record(self, at: float) -> None:
        self.history.append((at, self.state, self.error_reason, self.recoverable))

    def observe_at(self, when: float) -> ObservedSandbox:
        """The sandbox as it was at ``when`` (what a list lagging to ``when`` shows)."""
        current = self.observe()
        past = next((h for h in reversed(self.history) if h[0] <= when), None)
        if past is None:
            past = self.history[0] if self.history else None
        if past is None:
            return current
        _, state, reason, recoverable = past
        return replace(current, state=state, error_reason=reason, recoverable=recoverable)

    def observe(self) -> ObservedSandbox:
        req = self.request
        return ObservedSandbox(
            id=self.id,
            name=self.name,
            state=self.state,
            labels=dict(self.labels),
            created_at=EPOCH + timedelta(seconds=self.created_at),
            error_reason=self.error_reason,
            recoverable=self.recoverable,
            snapshot=req.snapshot if req else None,
            target=req.target if req else None,
            cpu=req.cpu if req else None,
            memory=req.memory if req else None,
            disk=req.disk if req else None,
            gpu=req.gpu if req else None,
        )


@dataclass
class _Fault:
    error: ErrorSpec
    remaining: int
    after_effect: bool


class _ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class MemoryProvider:
    """A ``SandboxProvider`` held in dicts. See the module docstring for the hooks."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        list_lag: float = 0.0,
        work_dir: str = "/home/daytona",
        exec_hook: ExecHook | None = None,
        on_call: Callable[[str, str], None] | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._manual = _ManualClock()
        self.clock: Callable[[], float] = clock or self._manual
        self.list_lag = list_lag
        self.work_dir_path = work_dir
        self.exec_hook = exec_hook
        self.hold_session_commands = False
        self._command_ids = itertools.count(1)
        self.on_call = on_call
        self.list_hook: Callable[[list[ObservedSandbox]], list[ObservedSandbox]] | None = None
        self.sandboxes: dict[str, MemorySandbox] = {}  # live ones, by id
        self.graveyard: dict[str, MemorySandbox] = {}  # deleted ones, by id (kept forever)
        self.calls: list[tuple[str, str]] = []
        self.counters: Counter[str] = Counter()
        self._faults: dict[str, deque[_Fault]] = {}
        self._create_script: deque[tuple[str, str | None, bool]] = deque()
        self._stick_next: dict[str, deque[str]] = {}
        self._ids = itertools.count(1)
        self.quota: int | None = None  # live sandboxes allowed; a create over it: CapacityError
        self.create_waits = True  # create/start/recover that end in error raise StartFailedError

    # -- scripting ------------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the default (manual) clock."""
        with self._lock:
            self._manual.now += seconds

    def fail_next(self, op: str, error: ErrorSpec, times: int = 1, *, after_effect: bool = False) -> None:
        if op != "*" and op not in OPS:
            raise ValueError(f"unknown operation {op!r}")
        with self._lock:
            self._faults.setdefault(op, deque()).append(_Fault(error, times, after_effect))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._create_script.clear()
            self._stick_next.clear()

    def script_create(
        self, state: str, *, reason: str | None = None, recoverable: bool = False, times: int = 1
    ) -> None:
        """The next ``times`` creates land in ``state`` (e.g. ``build_failed``, ``error``)."""
        with self._lock:
            self._create_script.extend([(state, reason, recoverable)] * times)

    def stick_next(self, op: str, state: str) -> None:
        """The next ``op`` leaves its sandbox in transitional ``state`` until ``release``."""
        with self._lock:
            self._stick_next.setdefault(op, deque()).append(state)

    def stick(self, sandbox_id: str, state: str) -> None:
        with self._lock:
            sb = self._live(sandbox_id)
            sb.pending_state = sb.pending_state or sb.state
            self._set(sb, state)

    def release(self, sandbox_id: str) -> None:
        """Finish a stuck transition (a stuck delete removes the sandbox)."""
        with self._lock:
            sb = self._live(sandbox_id)
            final, sb.pending_state = sb.pending_state, None
            if final == STATE_DESTROYED:
                self._bury(sb)
            elif final is not None:
                self._set(sb, final)

    def fall_into_error(
        self, sandbox_id: str, *, recoverable: bool = False, reason: str = "injected"
    ) -> None:
        self.set_state(sandbox_id, STATE_ERROR, reason=reason, recoverable=recoverable)

    def set_state(
        self, sandbox_id: str, state: str, *, reason: str | None = None, recoverable: bool = False
    ) -> None:
        """Change a sandbox's state out of band (no call is logged)."""
        with self._lock:
            sb = self._live(sandbox_id)
            sb.pending_state = None
            sb.error_reason = reason if state in (STATE_ERROR, "build_failed") else None
            sb.recoverable = recoverable if state == STATE_ERROR else False
            self._set(sb, state)

    def remove(self, sandbox_id: str) -> None:
        """Delete a sandbox behind the controller's back (no call is logged)."""
        with self._lock:
            self._bury(self._live(sandbox_id))

    def add_sandbox(
        self,
        name: str,
        labels: Mapping[str, str],
        state: str = STATE_STARTED,
        *,
        sandbox_id: str | None = None,
        created_at: float | None = None,
        recoverable: bool = False,
        error_reason: str | None = None,
    ) -> MemorySandbox:
        """Seed a sandbox that exists before the test (no call is logged)."""
        with self._lock:
            if self._by_name(name) is not None:
                raise ValueError(f"name {name} taken")
            sb = MemorySandbox(
                id=sandbox_id or self._new_id(),
                name=name,
                state=state,
                labels=dict(labels),
                created_at=self.clock() if created_at is None else created_at,
                recoverable=recoverable,
                error_reason=error_reason,
            )
            sb.record(sb.created_at)
            self.sandboxes[sb.id] = sb
            return sb

    def find_any(self, id_or_name: str) -> MemorySandbox | None:
        """A sandbox by id or name, live or deleted (for assertions on the call log)."""
        with self._lock:
            for pool in (self.sandboxes, self.graveyard):
                if id_or_name in pool:
                    return pool[id_or_name]
            for pool in (self.sandboxes, self.graveyard):
                for sb in pool.values():
                    if sb.name == id_or_name:
                        return sb
            return None

    # -- internals ------------------------------------------------------------------------------

    def _new_id(self) -> str:
        return f"sb-{next(self._ids):05d}"

    def _by_name(self, name: str) -> MemorySandbox | None:
        return next((sb for sb in self.sandboxes.values() if sb.name == name), None)

    def _live(self, sandbox_id: str) -> MemorySandbox:
        sb = self.sandboxes.get(sandbox_id) or self._by_name(sandbox_id)
        if sb is None:
            raise NotFoundError(f"sandbox {sandbox_id} not found")
        return sb

    def _set(self, sb: MemorySandbox, state: str) -> None:
        sb.state = state
        sb.record(self.clock())

    def _bury(self, sb: MemorySandbox) -> None:
        self.sandboxes.pop(sb.id, None)
        sb.deleted_at = self.clock()
        self.graveyard[sb.id] = sb

    def _enter(self, op: str, key: str) -> _Fault | None:
        """Log the call, run ``on_call``, and take the fault due for this call, if any."""
        with self._lock:
            self.calls.append((op, key))
            self.counters[op] += 1
        if self.on_call is not None:
            self.on_call(op, key)
        with self._lock:
            for name in (op, "*"):
                queue = self._faults.get(name)
                if queue:
                    fault = queue[0]
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        queue.popleft()
                    if not fault.after_effect:
                        raise _make(fault.error)
                    return fault
        return None

    def _transition(self, op: str, sb: MemorySandbox, final: str) -> None:
        queue = self._stick_next.get(op)
        if queue:
            self._set(sb, queue.popleft())
            sb.pending_state = final
        else:
            self._set(sb, final)

    def _check_not_stuck(self, sb: MemorySandbox, op: str) -> None:
        if sb.pending_state is not None:
            raise StateConflictError(
                f"sandbox {sb.id} is {sb.state}: cannot {op} while a transition is in progress"
            )

    # -- SandboxProvider --------------------------------------------------------------------------

    def list_sandboxes(self, labels: Mapping[str, str]) -> list[ObservedSandbox]:
        fault = self._enter("list", "")
        with self._lock:
            now = self.clock()
            visible = [sb for sb in self.sandboxes.values() if now - sb.created_at >= self.list_lag]
            visible += [
                sb
                for sb in self.graveyard.values()
                if sb.deleted_at is not None and now - sb.deleted_at < self.list_lag
            ]
            result = [
                sb.observe_at(now - self.list_lag) if self.list_lag > 0 else sb.observe()
                for sb in sorted(visible, key=lambda s: (s.created_at, s.id))
                if all(sb.labels.get(k) == v for k, v in labels.items())
            ]
        _after(fault)
        hook = self.list_hook
        return hook(result) if hook is not None else result

    def get(self, id_or_name: str) -> ObservedSandbox | None:
        fault = self._enter("get", id_or_name)
        with self._lock:
            sb = self.sandboxes.get(id_or_name) or self._by_name(id_or_name)
            result = sb.observe() if sb is not None else None
        _after(fault)
        return result

    def create(self, request: CreateRequest) -> ObservedSandbox:
        fault = self._enter("create", request.name)
        with self._lock:
            if self._by_name(request.name) is not None:
                raise ConflictError(f"Sandbox with name {request.name} already exists")
            if self.quota is not None and len(self.sandboxes) >= self.quota:
                raise CapacityError(f"Total sandbox limit exceeded. Maximum allowed: {self.quota}.")
            sb = MemorySandbox(
                id=self._new_id(),
                name=request.name,
                state=STATE_STARTED,
                labels=dict(request.labels),
                created_at=self.clock(),
                request=request,
            )
            sb.history.append((sb.created_at, "creating", None, False))
            self.sandboxes[sb.id] = sb
            if self._create_script:
                state, reason, recoverable = self._create_script.popleft()
                sb.error_reason, sb.recoverable = reason, recoverable
                self._set(sb, state)
            else:
                self._transition("create", sb, STATE_STARTED)
            result = sb.observe()
        _after(fault)
        if self.create_waits and result.state in (STATE_ERROR, STATE_BUILD_FAILED):
            raise StartFailedError(f"Sandbox failed to start: {result.error_reason or result.state}")
        return result

    def _lifecycle(self, op: str, sandbox_id: str, allowed: frozenset[str], final: str) -> None:
        """Daytona's rules (daytona-server-semantics.md): a start of a started sandbox is a no-op;
        every other call its state does not allow is refused (StateConflictError), repeats included."""
        fault = self._enter(op, sandbox_id)
        with self._lock:
            sb = self._live(sandbox_id)
            self._check_not_stuck(sb, op)
            ephemeral = sb.request is not None and sb.request.auto_delete_interval == 0
            if op == "start" and sb.state == final:
                pass  # already started: accepted, nothing to do
            elif sb.state == STATE_ERROR and op != "recover":
                raise StateConflictError(f"Sandbox {sb.id} is in an errored state")
            elif op == "archive" and ephemeral:
                raise PermanentError(f"Sandbox {sb.id} is ephemeral and cannot be archived")
            elif sb.state in allowed:
                if op == "recover" and not sb.recoverable:
                    raise StateConflictError(f"Sandbox {sb.id} is not recoverable")
                if op == "stop" and ephemeral:
                    self._bury(sb)  # Daytona deletes an ephemeral sandbox when it stops
                else:
                    if final != STATE_ERROR:
                        sb.error_reason, sb.recoverable = None, False
                    self._transition(op, sb, final)
            else:
                raise StateConflictError(_REFUSAL.get(op, f"Sandbox {sb.id} is {sb.state}: cannot {op}"))
        _after(fault)
        if self.create_waits and op in ("start", "recover"):
            with self._lock:
                state = sb.state
            if state in (STATE_ERROR, STATE_BUILD_FAILED):
                raise StartFailedError(f"Sandbox failed to start: {sb.error_reason or state}")

    def start(self, sandbox_id: str) -> None:
        allowed = frozenset({STATE_STOPPED, STATE_PAUSED, STATE_ARCHIVED, "archiving"})
        self._lifecycle("start", sandbox_id, allowed, STATE_STARTED)

    def stop(self, sandbox_id: str) -> None:
        self._lifecycle("stop", sandbox_id, frozenset({STATE_STARTED, STATE_PAUSED}), STATE_STOPPED)

    def archive(self, sandbox_id: str) -> None:
        self._lifecycle("archive", sandbox_id, frozenset({STATE_STOPPED}), STATE_ARCHIVED)

    def recover(self, sandbox_id: str) -> None:
        self._lifecycle("recover", sandbox_id, frozenset({STATE_ERROR}), STATE_STARTED)

    def update(self, sandbox_id: str, update: SandboxUpdate) -> None:
        """Daytona's setters: the intervals go into the sandbox's request, labels replace all labels."""
        fault = self._enter("update", sandbox_id)
        with self._lock:
            sb = self._live(sandbox_id)
            if sb.state == STATE_DESTROYED or sb.pending_state == STATE_DESTROYED:
                raise StateConflictError(f"Sandbox {sb.id} is being destroyed")
            intervals = {
                name: getattr(update, name)
                for name in ("auto_stop_interval", "auto_archive_interval", "auto_delete_interval")
                if getattr(update, name) is not None
            }
            if intervals and sb.request is not None:
                sb.request = replace(sb.request, **intervals)
            if update.labels is not None:
                sb.labels = dict(update.labels)
        _after(fault)

    def delete(self, sandbox_id: str) -> None:
        fault = self._enter("delete", sandbox_id)
        with self._lock:
            sb = self.sandboxes.get(sandbox_id) or self._by_name(sandbox_id)
            if sb is not None and sb.pending_state == STATE_DESTROYED:
                raise StateConflictError("Sandbox state change in progress")
            if sb is not None:
                queue = self._stick_next.get("delete")
                if queue:
                    self._set(sb, queue.popleft())
                    sb.pending_state = STATE_DESTROYED
                else:
                    self._bury(sb)
        _after(fault)

    def exec(
        self,
        sandbox_id: str,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: int | None = None,
    ) -> ExecResult:
        fault = self._enter("exec", sandbox_id)
        with self._lock:
            sb = self._live(sandbox_id)
            if sb.state != STATE_STARTED:
                raise ConflictError(f"sandbox {sb.id} is {sb.state}: cannot exec")
            hook = self.exec_hook
        result = hook(sb.id, command, cwd, env, timeout) if hook else ExecResult(0, command)
        _after(fault)
        return result

    def work_dir(self, sandbox_id: str) -> str:
        fault = self._enter("work_dir", sandbox_id)
        with self._lock:
            self._started(sandbox_id, "get the work dir")
        _after(fault)
        return self.work_dir_path

    def make_dir(self, sandbox_id: str, path: str) -> None:
        fault = self._enter("make_dir", sandbox_id)
        with self._lock:
            self._started(sandbox_id, "make a directory").dirs.add(path)
        _after(fault)

    def upload(self, sandbox_id: str, path: str, data: bytes) -> None:
        fault = self._enter("upload", sandbox_id)
        with self._lock:
            self._started(sandbox_id, "upload").files[path] = bytes(data)
        _after(fault)

    def delete_file(self, sandbox_id: str, path: str) -> None:
        fault = self._enter("delete_file", sandbox_id)
        with self._lock:
            self._started(sandbox_id, "delete a file").files.pop(path, None)
        _after(fault)

    # -- sessions ----------------------------------------------------------------------------------

    def create_session(self, sandbox_id: str, session_id: str) -> None:
        fault = self._enter("session_create", sandbox_id)
        with self._lock:
            sb = self._started(sandbox_id, "create a session")
            if session_id in sb.sessions:
                raise ConflictError(f"session {session_id} already exists")
            sb.sessions[session_id] = {}
        _after(fault)

    def session_execute(self, sandbox_id: str, session_id: str, command: str) -> str:
        fault = self._enter("session_execute", sandbox_id)
        with self._lock:
            commands = self._session(sandbox_id, session_id)
            hook = self.exec_hook
            command_id = f"cmd-{next(self._command_ids)}"
            held = self.hold_session_commands
        result = hook(sandbox_id, command, None, None, None) if hook else ExecResult(0, command)
        entry = MemoryCommand(command, output=result.output, result=result)
        if not held:
            entry.exit_code = result.exit_code if result.exit_code is not None else -1
        with self._lock:
            commands[command_id] = entry
        _after(fault)
        return command_id

    def finish_commands(self) -> None:
        """End every held session command with the exit code its ``exec_hook`` result gave."""
        with self._lock:
            self.hold_session_commands = False
            for sb in self.sandboxes.values():
                for commands in sb.sessions.values():
                    for entry in commands.values():
                        if entry.exit_code is None and entry.result is not None:
                            code = entry.result.exit_code
                            entry.exit_code = code if code is not None else -1

    def session_command(self, sandbox_id: str, session_id: str, command_id: str) -> SessionCommand:
        fault = self._enter("session_command", sandbox_id)
        with self._lock:
            entry = self._command(sandbox_id, session_id, command_id)
            answer = SessionCommand(command_id, entry.exit_code)
        _after(fault)
        return answer

    def session_logs(self, sandbox_id: str, session_id: str, command_id: str) -> str:
        fault = self._enter("session_logs", sandbox_id)
        with self._lock:
            output = self._command(sandbox_id, session_id, command_id).output
        _after(fault)
        return output

    def delete_session(self, sandbox_id: str, session_id: str) -> None:
        fault = self._enter("session_delete", sandbox_id)
        with self._lock:
            commands = self._started(sandbox_id, "delete a session").sessions.pop(session_id, {})
            for entry in commands.values():
                if entry.exit_code is None:
                    entry.exit_code = -1
        _after(fault)

    def _session(self, sandbox_id: str, session_id: str) -> dict[str, MemoryCommand]:
        sb = self._started(sandbox_id, "use a session")
        if session_id not in sb.sessions:
            raise NotFoundError(f"session {session_id} not found")
        return sb.sessions[session_id]

    def _command(self, sandbox_id: str, session_id: str, command_id: str) -> MemoryCommand:
        commands = self._session(sandbox_id, session_id)
        if command_id not in commands:
            raise NotFoundError(f"command {command_id} not found")
        return commands[command_id]

    def _started(self, sandbox_id: str, what: str) -> MemorySandbox:
        sb = self._live(sandbox_id)
        if sb.state != STATE_STARTED:
            raise ConflictError(f"sandbox {sb.id} is {sb.state}: cannot {what}")
        return sb


def _make(error: ErrorSpec) -> BaseException:
    return error if isinstance(error, BaseException) else error()


def _after(fault: _Fault | None) -> None:
    if fault is not None:
        raise _make(fault.error)
