"""Runs the planner's actions through a sandbox provider: concurrency, rate limits, 429 pause, back-off.

Called by ``controller.reconciler`` once per pass (``Applier.apply``); the daemon owns one ``Applier``
for its lifetime and calls ``shutdown`` on exit. It owns effects only: it decides nothing about
*what* to do (that is ``controller.planner``) and writes nothing (the reconciler turns each
``Outcome`` into ``lease_status`` values with ``Outcome.status_values`` and into an event).

- Bounded concurrency: one shared pool of ``max_concurrent_actions`` workers.
- Never two actions for one lease at once, even across overlapping ``apply`` calls: an action whose
  lease is already in flight is not run (outcome ``busy``); the next pass re-plans it.
- Rate limits (token buckets, waited for in the worker): every provider call takes a token of the
  global API bucket (``api_rate_per_second``, burst one second's worth); a create also takes one of
  the create bucket (``create_rate_per_minute``, burst one second's worth). Daytona documents
  separate limits for creation (tier 1: 300 per minute, DESIGN.md) and much higher ones for other
  authenticated and lifecycle calls (tens of thousands per minute), so the API default of 20/s
  (``controller.api_rate_per_second``) is about politeness and emulator load, not a hard ceiling.
- A 429 (``RateLimitedError``) pauses the calls of its scope until its ``retry_after`` (or the
  back-off base when the API gave none): Daytona's throttlers are named, so a ``sandbox-create`` 429
  pauses creates, ``sandbox-lifecycle`` pauses start/stop/archive/recover/delete, and
  ``authenticated`` (or a plain ``Retry-After``) pauses every call.
- Quota and capacity refusals (``CapacityError``) are retried with the lease's back-off, capped at
  ``blocked_backoff_max_seconds`` so that a lease converges soon after capacity returns; the lease
  shows phase ``Blocked`` with the reason.
- A create answered ``started`` realizes the lease's workspace (``Action.workspace_dir``) in the same
  action, so the lease is ``Ready`` after one pass; if that fails the create still succeeded and the
  planner asks for ``realize_workspace`` next pass.
- A create that failed in a way that may have left a sandbox (a late "failed to start", a name
  conflict, no answer) is followed at once by one ``get`` by the deterministic name: a sandbox of this
  lease found there is recorded (an errored one is then recovered or replaced by the planner), never
  left behind and never duplicated.
- A lifecycle call refused by the sandbox's state (``StateConflictError``: stop of a stopped sandbox,
  delete while destroying, ...) is followed by one ``get``: when the sandbox is no longer in the state
  the action was planned from, the list was stale; the outcome is ``reobserved`` (not a failure) and
  carries the fresh observation, from which the reconciler plans the lease again.
- A wait for tokens or for a pause longer than ``action_timeout_seconds`` gives up (outcome
  ``deferred``; not counted as a failure). Provider calls are bounded by the provider's own time-outs.
- Per-lease exponential back-off with full jitter over [base, min(cap, base * 2**(n-1))] for the n-th
  consecutive failure, returned as ``Outcome.next_attempt_at``; success resets it. The failure count
  comes from the action (``Action.failures``, read from ``lease_status`` by the planner).
- ``before_create(action)`` runs in the worker just before ``provider.create``; if it raises, the
  create is not called. ``on_done(outcome)`` runs in the worker as soon as its action has finished,
  while the lease is still marked in flight (the reconciler records the lease's status there, so a
  quick action is not held back by a slow one of the same pass); an exception in it is logged and
  the outcome is returned as usual. ``on_outcome(outcome)`` is called for every finished action once
  the whole batch is done.
- ``fence()`` runs in the worker at the moment each call that changes a sandbox (create, delete,
  start, stop, archive, recover) is sent, after every wait; if it raises ``NotLeaderError`` the call
  is not made (outcome ``fenced``, not a failure). The reconciler passes one that re-checks the
  leadership term the pass was planned under, so a replica deposed while it waited touches nothing.
- ``shutdown()``: no new action starts (outcome ``skipped``); actions in flight finish.
"""

from __future__ import annotations

import contextvars
import logging
import posixpath
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from controller import logs
from controller.errors import (
    SCOPE_ALL,
    SCOPE_CREATE,
    SCOPE_LIFECYCLE,
    CapacityError,
    ConflictError,
    NotFoundError,
    NotLeaderError,
    PermanentError,
    ProviderError,
    RateLimitedError,
    StartFailedError,
    StateConflictError,
    TransientError,
)
from controller.planner import BLOCKED, FAILED, READY, Action, LeaseView
from controller.providers.base import (
    LABEL_INSTANCE,
    LABEL_LEASE,
    STATE_BUILD_FAILED,
    STATE_ERROR,
    STATE_STARTED,
    ObservedSandbox,
    SandboxProvider,
)
from controller.secrets import SecretError, resolve

log = logging.getLogger(__name__)

T = TypeVar("T")
ActionHook = Callable[[Action], None]
Fence = Callable[[], None]
OutcomeHook = Callable[["Outcome"], None]

# error_kind values of an Outcome
RATE_LIMITED = "rate_limited"
TRANSIENT = "transient"
PERMANENT = "permanent"
NOT_FOUND = "not_found"
CONFLICT = "conflict"
BLOCKED_KIND = "blocked"  # quota or capacity: phase Blocked
START_FAILED = "start_failed"  # the sandbox fell into error while the call waited
REOBSERVED = "reobserved"  # refused by a state the list did not show yet: not a failure
INTERNAL = "error"
BEFORE_CREATE = "before_create"
BUSY = "busy"  # another action for the lease was in flight: not run
SKIPPED = "skipped"  # shutting down: not run
DEFERRED = "deferred"  # waited too long for a rate limit: not run
FENCED = "fenced"  # leadership lost (or moved to a new term) before the call was sent: not run
NOT_RUN = frozenset({BUSY, SKIPPED, DEFERRED, BEFORE_CREATE, FENCED})
REOBSERVABLE = frozenset({"start", "stop", "archive", "recover", "delete"})


@dataclass(frozen=True)
class ApplierConfig:
    """Limits of the applier; the defaults match ``controller.*`` in config.example.yaml."""

    max_concurrent_actions: int = 8
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 600.0
    api_rate_per_second: float = 20.0
    create_rate_per_minute: float = 300.0  # Daytona tier 1
    action_timeout_seconds: float = 120.0
    blocked_backoff_max_seconds: float = 60.0  # cap of the back-off while quota/capacity is exhausted


# lease_status columns that describe the lease's sandbox, cleared when it is known to be gone.
NO_SANDBOX: dict[str, Any] = {
    "sandbox_id": None,
    "sandbox_name": None,
    "observed_state": None,
    "spec_hash": None,
    "workspace_path": None,
    "ready_at": None,
    "spec_fields": None,
}


@dataclass(frozen=True)
class Outcome:
    """What happened to one action. ``failures``/``next_attempt_at`` are the lease's new back-off state."""

    action: Action
    ok: bool
    started_at: datetime
    finished_at: datetime
    error_kind: str | None = None
    message: str | None = None
    sandbox: ObservedSandbox | None = None  # returned by create, found by lookup
    workspace_path: str | None = None  # realize_workspace
    failures: int = 0
    next_attempt_at: datetime | None = None
    observed_gone: bool = False  # reobserved: the sandbox no longer exists

    @property
    def reobserved(self) -> bool:
        return self.error_kind == REOBSERVED

    @property
    def sandbox_id(self) -> str | None:
        return self.sandbox.id if self.sandbox is not None else self.action.sandbox_id

    @property
    def permanent(self) -> bool:
        return self.error_kind == PERMANENT

    @property
    def ran(self) -> bool:
        """False when the provider was never asked (busy, skipped, deferred, before_create failed)."""
        return self.error_kind not in NOT_RUN

    def status_values(self, lease: LeaseView | None = None) -> dict[str, Any]:
        """Column -> value for ``lease_status``, laid over ``Decision.status_values()`` of the pass."""
        action = self.action
        if not self.ok:
            return self._failure_values(lease)
        if self.reobserved:  # the reconciler plans the lease again from the fresh observation
            return {"message": self.message or action.reason}
        values: dict[str, Any] = {"message": self.message or action.reason}
        if action.penalize:
            values.update(failures=self.failures, next_attempt_at=self.next_attempt_at)
        elif action.kind == "lookup" and self.sandbox is None:
            # Found nothing of ours (e.g. after a create that ended in 409 on a name taken by
            # another sandbox): not progress, so the failure count and its back-off stay.
            pass
        else:
            values.update(failures=0, next_attempt_at=None, last_error=None)
        kind = action.kind
        if kind == "create" and self.sandbox is not None:
            values.update(
                _new_sandbox(self.sandbox, action.spec_hash),
                failed_spec_hash=None,
                spec_fields=dict(action.fields) if action.fields else None,
            )
            if self.workspace_path is not None:  # realized in the same action: Ready now
                values.update(phase=READY, workspace_path=self.workspace_path, ready_at=self.finished_at)
        elif kind == "update":
            values.update(
                spec_hash=action.spec_hash, spec_fields=dict(action.fields) if action.fields else None
            )
        elif kind == "lookup":
            values.update(create_attempt_name=None, create_attempt_at=None)
            if self.sandbox is not None:
                sb = self.sandbox
                values.update(
                    sandbox_id=sb.id, sandbox_name=sb.name, observed_state=sb.state, spec_hash=sb.spec_hash
                )
                if sb.id != action.sandbox_id:
                    values.update(workspace_path=None, ready_at=None, spec_fields=None)
            else:
                values.update(NO_SANDBOX)
        elif kind == "delete" and not action.duplicate:
            values.update(NO_SANDBOX)
        elif kind == "realize_workspace":
            values.update(phase=READY, workspace_path=self.workspace_path, ready_at=self.finished_at)
        return values

    def _failure_values(self, lease: LeaseView | None) -> dict[str, Any]:
        action = self.action
        if self.error_kind in (BUSY, SKIPPED, DEFERRED, FENCED):
            return {"message": f"{action.kind} not run: {self.message}"}
        values: dict[str, Any] = {
            "failures": self.failures,
            "next_attempt_at": self.next_attempt_at,
            "last_error": f"{action.kind}: {self.message}",
        }
        when = self.next_attempt_at.isoformat() if self.next_attempt_at else "the next pass"
        if action.kind == "create" and self.sandbox is not None:
            # The create failed but left a sandbox (found by name): record it so that the planner
            # recovers or replaces it instead of creating a second one.
            values.update(
                _new_sandbox(self.sandbox, self.sandbox.spec_hash),
                create_attempt_name=None,
                create_attempt_at=None,
            )
        if action.kind == "create" and self.error_kind in (BLOCKED_KIND, RATE_LIMITED):
            # Refused before anything was made (quota, throttler): there is nothing to look up.
            values.update(create_attempt_name=None, create_attempt_at=None)
        if self.error_kind == BLOCKED_KIND:
            values.update(phase=BLOCKED, message=f"Blocked: {self.message}; next attempt after {when}")
        elif action.kind == "create" and self.permanent:
            values.update(
                phase=FAILED,
                failed_spec_hash=action.spec_hash or (lease.spec_hash if lease else None),
                create_attempt_name=None,
                create_attempt_at=None,
                message=f"create refused ({self.message}); change the spec to retry",
            )
        else:
            values.update(
                phase="Error",
                message=f"{action.kind} failed ({self.error_kind}): {self.message}; retry after {when}",
            )
        return values


def _new_sandbox(sb: ObservedSandbox, spec_hash: str | None) -> dict[str, Any]:
    """``lease_status`` columns for a sandbox the lease has just got (nothing realized in it yet)."""
    return {
        "sandbox_id": sb.id,
        "sandbox_name": sb.name,
        "observed_state": sb.state,
        "spec_hash": spec_hash,
        "workspace_path": None,
        "ready_at": None,
        "spec_fields": None,
    }


class _Deferred(Exception):
    pass


class _Stopped(Exception):
    pass


class TokenBucket:
    """A thread-safe token bucket; ``reserve()`` takes a token and says how long to wait for it."""

    def __init__(self, rate_per_second: float, capacity: float, monotonic: Callable[[], float]) -> None:
        self.rate = rate_per_second
        self.capacity = max(1.0, capacity)
        self.tokens = self.capacity
        self._monotonic = monotonic
        self._last = monotonic()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        with self._lock:
            now = self._monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
            self._last = now
            self.tokens -= 1.0
            return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Applier:
    """Runs actions through ``provider``; one instance per process (its limits are process-wide)."""

    def __init__(
        self,
        provider: SandboxProvider,
        config: ApplierConfig | None = None,
        *,
        clock: Callable[[], datetime] = _utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        before_create: ActionHook | None = None,
        on_outcome: OutcomeHook | None = None,
    ) -> None:
        self.provider = provider
        self.config = config or ApplierConfig()
        self.clock = clock
        self.monotonic = monotonic
        self._stop = threading.Event()
        self.sleep: Callable[[float], None] = sleep or self._interruptible_sleep
        self.rng = rng or random.Random()
        self.before_create = before_create
        self.on_outcome = on_outcome
        c = self.config
        self.api_bucket = TokenBucket(c.api_rate_per_second, c.api_rate_per_second, monotonic)
        create_per_second = c.create_rate_per_minute / 60.0
        self.create_bucket = TokenBucket(create_per_second, create_per_second, monotonic)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight: set[str] = set()
        self._paused_until: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(max_workers=c.max_concurrent_actions, thread_name_prefix="applier")

    def _interruptible_sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    # -- public ----------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def paused_until(self, scope: str = SCOPE_ALL) -> float:
        """Monotonic time until which calls of ``scope`` wait (after a 429); -inf when not paused."""
        with self._lock:
            return self._paused_until.get(scope, float("-inf"))

    def in_flight(self) -> set[str]:
        with self._lock:
            return set(self._in_flight)

    def backoff_seconds(self, failures: int) -> float:
        """The delay before the next attempt after ``failures`` consecutive failures (>= 1)."""
        c = self.config
        ceiling = min(c.backoff_max_seconds, c.backoff_base_seconds * 2.0 ** max(0, min(failures - 1, 60)))
        floor = min(c.backoff_base_seconds, ceiling)
        with self._lock:
            return self.rng.uniform(floor, ceiling)

    def apply(
        self,
        actions: Sequence[Action],
        *,
        before_create: ActionHook | None = None,
        on_outcome: OutcomeHook | None = None,
        fence: Fence | None = None,
        on_done: OutcomeHook | None = None,
    ) -> list[Outcome]:
        """Run ``actions`` (at most one per lease is run; others are ``busy``); outcomes in input order."""
        hook = before_create or self.before_create
        notify = on_outcome or self.on_outcome
        seen: set[str] = set()
        futures: list[Future[Outcome] | Outcome] = []
        for action in actions:
            if action.lease_name in seen:
                futures.append(self._not_run(action, BUSY, "another action for this lease in this batch"))
                continue
            seen.add(action.lease_name)
            if self.stopping:
                futures.append(self._not_run(action, SKIPPED, "the controller is shutting down"))
                continue
            # Run in a copy of the caller's context so log records keep the pass id.
            context = contextvars.copy_context()
            futures.append(self._pool.submit(context.run, self._run, action, hook, fence, on_done))
        outcomes = [f if isinstance(f, Outcome) else f.result() for f in futures]
        if notify is not None:
            for outcome in outcomes:
                try:
                    notify(outcome)
                except Exception:
                    log.exception("lease %s: on_outcome hook failed", outcome.action.lease_name)
        return outcomes

    def stop(self) -> None:
        """Take no new action; actions in flight finish."""
        self._stop.set()

    def shutdown(self, timeout: float | None = None) -> bool:
        """``stop()``, then wait up to ``timeout`` seconds for actions in flight; True if none is left."""
        self.stop()
        deadline = None if timeout is None else self.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                remaining = None if deadline is None else deadline - self.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._idle.wait(remaining if remaining is None else min(remaining, 0.5))
            left = len(self._in_flight)
        self._pool.shutdown(wait=False)
        if left:
            log.warning("applier shutdown: %d action(s) still in flight", left)
        return left == 0

    # -- one action ------------------------------------------------------------------------------

    def _not_run(self, action: Action, kind: str, message: str) -> Outcome:
        now = self.clock()
        return Outcome(action, False, now, now, kind, message, failures=action.failures)

    def _run(
        self,
        action: Action,
        before_create: ActionHook | None,
        fence: Fence | None = None,
        on_done: OutcomeHook | None = None,
    ) -> Outcome:
        lease = action.lease_name
        with self._lock:
            if lease in self._in_flight:
                busy = True
            else:
                busy = False
                self._in_flight.add(lease)
        if busy:
            return self._not_run(action, BUSY, "another action for this lease is in flight")
        try:
            if self.stopping:
                return self._not_run(action, SKIPPED, "the controller is shutting down")
            with logs.bound(lease=lease):
                outcome = self._execute(action, before_create, fence)
                if on_done is not None:
                    try:
                        on_done(outcome)
                    except Exception:
                        log.exception("lease %s: on_done hook failed", lease)
                return outcome
        finally:
            with self._idle:
                self._in_flight.discard(lease)
                self._idle.notify_all()

    def _execute(
        self, action: Action, before_create: ActionHook | None, fence: Fence | None = None
    ) -> Outcome:
        started = self.clock()
        deadline = self.monotonic() + self.config.action_timeout_seconds
        sandbox: ObservedSandbox | None = None
        workspace: str | None = None
        message: str | None = None
        try:
            if action.kind == "create":
                assert action.create is not None, "a create action carries its CreateRequest"
                request = action.create
                if request.secret_refs:
                    # Resolved here, by the process that creates, at create time: the values travel
                    # in the request only (never in the action, the database or a message).
                    resolved = resolve(request.secret_refs)
                    request = replace(request, env={**request.env, **resolved}, secret_refs={})
                self._gate(deadline, create=True)
                if before_create is not None:
                    try:
                        before_create(action)
                    except Exception as exc:
                        log.warning(
                            "lease %s: create attempt not recorded, create not called: %s",
                            action.lease_name,
                            exc,
                        )
                        return self._not_run(action, BEFORE_CREATE, f"create attempt not recorded: {exc}")
                try:
                    sandbox = self._call(
                        self.provider.create, request, deadline=deadline, gated=True, fence=fence
                    )
                except (StartFailedError, ConflictError, TransientError) as exc:
                    if isinstance(exc, RateLimitedError | CapacityError | StateConflictError):
                        raise
                    return self._after_failed_create(action, started, exc, deadline)
                message = f"created sandbox {sandbox.name} ({sandbox.id}), {sandbox.state}"
                if action.workspace_dir is not None and sandbox.state == STATE_STARTED:
                    workspace = self._realize_after_create(action, sandbox, deadline)
                    if workspace is not None:
                        message = f"{message}; workspace {workspace} ready"
            elif action.kind == "lookup":
                sandbox, message = self._lookup(action, deadline)
            elif action.kind == "realize_workspace":
                workspace = self._realize(action, deadline)
                message = f"workspace {workspace} ready in sandbox {action.sandbox_name}"
            elif action.kind == "delete":
                if action.penalize and action.from_state is not None:
                    # Replacing an errored sandbox destroys it: confirm the state with one get first,
                    # since the list may lag (a sandbox recovered meanwhile would be lost).
                    confirmed = self._confirm(action, started, deadline)
                    if confirmed is not None:
                        log.info("lease %s: delete not run: %s", action.lease_name, confirmed.message)
                        return replace(confirmed, message=f"delete not run: {confirmed.message}")
                try:
                    self._call(
                        self.provider.delete,
                        _sid(action),
                        deadline=deadline,
                        scope=SCOPE_LIFECYCLE,
                        fence=fence,
                    )
                    message = f"deleted sandbox {action.sandbox_name} ({action.sandbox_id})"
                except NotFoundError:
                    message = f"sandbox {action.sandbox_name} ({action.sandbox_id}) was already gone"
            elif action.kind == "update":
                assert action.update is not None, "an update action carries its SandboxUpdate"
                self._call(
                    self.provider.update,
                    _sid(action),
                    action.update,
                    deadline=deadline,
                    scope=SCOPE_LIFECYCLE,
                    fence=fence,
                )
                message = (
                    f"updated {', '.join(action.update.setters)} in place on sandbox "
                    f"{action.sandbox_name} ({action.sandbox_id})"
                )
            elif action.kind in ("start", "stop", "archive", "recover"):
                self._call(
                    getattr(self.provider, action.kind),
                    _sid(action),
                    deadline=deadline,
                    scope=SCOPE_LIFECYCLE,
                    fence=fence,
                )
                message = f"{action.kind} accepted for sandbox {action.sandbox_name} ({action.sandbox_id})"
            else:
                raise ValueError(f"unknown action kind {action.kind!r}")
        except StateConflictError as exc:
            if action.kind not in REOBSERVABLE or action.sandbox_id is None:
                return self._failed(action, started, exc)
            reobserved = self._reobserve(action, started, exc, deadline)
            return reobserved if reobserved is not None else self._failed(action, started, exc)
        except _Deferred as exc:
            return self._not_run(action, DEFERRED, str(exc))
        except _Stopped:
            return self._not_run(action, SKIPPED, "the controller is shutting down")
        except NotLeaderError as exc:
            log.warning("lease %s: %s not sent: %s", action.lease_name, action.kind, exc)
            return self._not_run(action, FENCED, str(exc))
        except Exception as exc:
            return self._failed(action, started, exc)
        finished = self.clock()
        failures, next_at = 0, None
        if action.penalize:
            failures = action.failures + 1
            next_at = finished + timedelta(seconds=self.backoff_seconds(failures))
            message = (
                f"{message}; counted as failure {failures} ({action.reason}), "
                f"next attempt after {next_at.isoformat()}"
            )
        log.info("lease %s: %s ok: %s", action.lease_name, action.kind, message)
        return Outcome(action, True, started, finished, None, message, sandbox, workspace, failures, next_at)

    def _after_failed_create(
        self, action: Action, started: datetime, exc: ProviderError, deadline: float
    ) -> Outcome:
        """A create failed in a way that may have left a sandbox: look it up by name once.

        Found and ours: recorded. A sandbox in error (a late "failed to start") is a failure with
        back-off, and the planner recovers or replaces it; a healthy one (the answer was lost, or
        the name was taken by our own earlier attempt) is adopted as if the create had answered.
        """
        name = action.sandbox_name or (action.create.name if action.create else None)
        found: ObservedSandbox | None = None
        if name:
            try:
                found = self._call(self.provider.get, name, deadline=deadline)
            except (ProviderError, _Deferred) as lookup_exc:
                log.warning(
                    "lease %s: lookup of %s after a failed create failed too: %s",
                    action.lease_name,
                    name,
                    lookup_exc,
                )
        if found is not None and not _ours(found, action):
            log.warning(
                "lease %s: the name %s is taken by sandbox %s, which is not ours",
                action.lease_name,
                name,
                found.id,
            )
            found = None
        if found is None:
            return self._failed(action, started, exc)
        if found.state in (STATE_ERROR, STATE_BUILD_FAILED) or isinstance(exc, StartFailedError):
            failed = self._failed(action, started, exc)
            return replace(
                failed,
                sandbox=found,
                message=f"{failed.message}; found sandbox {found.name} ({found.id}), {found.state}, "
                "by name: it is recovered or replaced, never left behind",
            )
        message = (
            f"create answered {type(exc).__name__} ({exc}); found sandbox {found.name} ({found.id}), "
            f"{found.state}, by name: adopted"
        )
        log.info("lease %s: %s", action.lease_name, message)
        return Outcome(action, True, started, self.clock(), None, message, found)

    def _reobserve(
        self, action: Action, started: datetime, exc: StateConflictError, deadline: float
    ) -> Outcome | None:
        """One ``get`` after a refusal by state; an outcome when the list had been stale, else None."""
        try:
            outcome = self._confirm(action, started, deadline)
        except (ProviderError, _Deferred) as get_exc:
            log.warning("lease %s: re-reading %s failed: %s", action.lease_name, action.sandbox_id, get_exc)
            return None
        if outcome is None:
            return None  # the state we planned from holds: a real refusal, counted as a failure
        message = f"{action.kind} refused ({exc}): {outcome.message}"
        log.info("lease %s: %s", action.lease_name, message)
        return replace(outcome, message=message)

    def _confirm(self, action: Action, started: datetime, deadline: float) -> Outcome | None:
        """None when the sandbox is still in the state the action was planned from; else a
        ``reobserved`` outcome carrying what it is now (the action is not run)."""
        fresh = self._call(self.provider.get, _sid(action), deadline=deadline)
        if fresh is not None and fresh.state == action.from_state:
            return None
        now_state = fresh.state if fresh is not None else "gone"
        message = (
            f"sandbox {action.sandbox_name} is {now_state}, not {action.from_state} as listed; "
            "planned again from a fresh read"
        )
        return Outcome(
            action,
            True,
            started,
            self.clock(),
            REOBSERVED,
            message,
            fresh,
            failures=action.failures,
            observed_gone=fresh is None,
        )

    def _failed(self, action: Action, started: datetime, exc: BaseException) -> Outcome:
        retry_after: float | None = None
        cap: float | None = None
        if isinstance(exc, RateLimitedError):
            kind, retry_after = RATE_LIMITED, exc.retry_after
        elif isinstance(exc, CapacityError):
            kind, retry_after = BLOCKED_KIND, exc.retry_after
            cap = self.config.blocked_backoff_max_seconds
        elif isinstance(exc, SecretError):  # fixed by providing the secret, not by a spec change
            kind = BLOCKED_KIND
            cap = self.config.blocked_backoff_max_seconds
        elif isinstance(exc, StartFailedError):
            kind, retry_after = START_FAILED, exc.retry_after
        elif isinstance(exc, TransientError):
            kind, retry_after = TRANSIENT, exc.retry_after
        elif isinstance(exc, PermanentError):
            kind = PERMANENT
        elif isinstance(exc, NotFoundError):
            kind = NOT_FOUND
        elif isinstance(exc, ConflictError):
            kind = CONFLICT
        elif isinstance(exc, ProviderError):
            kind = INTERNAL
        else:
            kind = INTERNAL
            log.exception("lease %s: %s failed unexpectedly", action.lease_name, action.kind, exc_info=exc)
        failures = action.failures + 1
        delay = self.backoff_seconds(failures)
        if cap is not None:
            delay = min(delay, cap)
        if retry_after is not None:
            delay = max(delay, retry_after)
        finished = self.clock()
        next_at = finished + timedelta(seconds=delay)
        message = str(exc) or type(exc).__name__
        log.warning(
            "lease %s: %s failed (%s, failure %d, next attempt in %.1fs): %s",
            action.lease_name,
            action.kind,
            kind,
            failures,
            delay,
            message,
        )
        return Outcome(action, False, started, finished, kind, message, None, None, failures, next_at)

    def _lookup(self, action: Action, deadline: float) -> tuple[ObservedSandbox | None, str]:
        keys = [k for k in (action.sandbox_id, action.lookup_name) if k]
        for key in keys:
            found = self._call(self.provider.get, key, deadline=deadline)
            if found is None:
                continue
            if not _ours(found, action):
                log.warning(
                    "lease %s: lookup of %s found sandbox %s, which is not ours",
                    action.lease_name,
                    key,
                    found.id,
                )
                continue
            return found, f"found sandbox {found.name} ({found.id}), {found.state}, by {key}"
        return None, f"no sandbox found by {' or '.join(keys)}; the record is cleared"

    def _realize_after_create(self, action: Action, sandbox: ObservedSandbox, deadline: float) -> str | None:
        """The workspace of a sandbox the create answered ``started``, in the same action (the lease is
        Ready after one pass). None when it fails: the create still succeeded, and the planner asks
        for ``realize_workspace`` on the next pass."""
        try:
            return self._realize(action, deadline, sandbox.id)
        except (ProviderError, _Deferred) as exc:
            log.info(
                "lease %s: workspace not realized after create (%s); realized on the next pass",
                action.lease_name,
                exc,
            )
            return None

    def _realize(self, action: Action, deadline: float, sandbox_id: str | None = None) -> str:
        sid = sandbox_id or _sid(action)
        wanted = action.workspace_dir or "workspace"
        if posixpath.isabs(wanted):
            path = posixpath.normpath(wanted)
        else:
            base = self._call(self.provider.work_dir, sid, deadline=deadline)
            path = posixpath.normpath(posixpath.join(base, wanted))
        self._call(self.provider.make_dir, sid, path, deadline=deadline)
        return path

    # -- rate limits -----------------------------------------------------------------------------

    def _call(
        self,
        fn: Callable[..., T],
        *args: Any,
        deadline: float,
        gated: bool = False,
        scope: str = SCOPE_ALL,
        fence: Fence | None = None,
    ) -> T:
        if not gated:
            self._gate(deadline, scope=scope)
        if fence is not None:
            fence()  # after every wait, right before the request: raises NotLeaderError
        try:
            return fn(*args)
        except RateLimitedError as exc:
            self._pause(exc)
            raise

    def _pause(self, exc: RateLimitedError) -> None:
        for scope, retry_after in exc.pauses.items():
            seconds = (
                retry_after
                if retry_after is not None and retry_after > 0
                else self.config.backoff_base_seconds
            )
            with self._lock:
                until = self.monotonic() + seconds
                if until > self._paused_until.get(scope, float("-inf")):
                    self._paused_until[scope] = until
            which = "every provider call" if scope == SCOPE_ALL else f"{scope} calls"
            log.warning("rate limited (429): %s wait %.1fs", which, seconds)

    def _wait(self, seconds: float, deadline: float, why: str) -> None:
        if seconds <= 0:
            return
        if self.monotonic() + seconds > deadline:
            raise _Deferred(f"{why}: would wait {seconds:.1f}s, beyond the action time-out")
        self.sleep(seconds)

    def _gate(self, deadline: float, *, create: bool = False, scope: str = SCOPE_ALL) -> None:
        """Wait for the 429 pauses of the call's scopes to end and for rate-limit tokens (one API
        token, one create token)."""
        scopes = {SCOPE_ALL, SCOPE_CREATE if create else scope}
        while True:
            with self._lock:
                pause = max(self._paused_until.get(s, float("-inf")) for s in scopes) - self.monotonic()
            if pause <= 0:
                break
            if self.stopping:
                raise _Stopped
            self._wait(pause, deadline, "paused after a 429")
        if self.stopping:
            raise _Stopped
        if create:
            self._wait(self.create_bucket.reserve(), deadline, "create rate limit")
        self._wait(self.api_bucket.reserve(), deadline, "API rate limit")


def _ours(found: ObservedSandbox, action: Action) -> bool:
    labels = found.labels
    return labels.get(LABEL_LEASE) == action.lease_name and (
        not action.instance or labels.get(LABEL_INSTANCE) == action.instance
    )


def _sid(action: Action) -> str:
    if action.sandbox_id is None:
        raise ValueError(f"{action.kind} for lease {action.lease_name} carries no sandbox id")
    return action.sandbox_id
