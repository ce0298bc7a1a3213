"""The pure planner: desired leases + controller memory + observed sandboxes -> at most one action per lease.

Called by ``controller.reconciler`` once per pass (and by ``leasectl plan``). Nothing here does I/O,
reads a clock or draws a random number: frozen dataclasses and ``now`` go in, frozen dataclasses come
out, so every decision is testable table-driven (tests/unit/test_planner.py).

Inputs
    ``LeaseView``   desired state of one ``leases`` row (spec hash and the ready-made ``CreateRequest``).
    ``StatusView``  what the controller remembers in ``lease_status`` (recorded sandbox id, create
                    attempt, failures and back-off, the spec that failed permanently, workspace).
    ``ObservedSandbox`` the (eventually consistent) list of this instance's sandboxes.

Outputs
    ``Plan.actions``    at most one ``Action`` per lease, for ``controller.applier``.
    ``Plan.decisions``  one ``Decision`` per lease: the status values to write even when no action runs
                        (``Decision.status_values()``); the applier's ``Outcome.status_values()`` is
                        laid over them for leases that had an action.

Rules (DESIGN.md "Reconcile semantics", issue 4), in the order they are applied to one lease:

1. Only sandboxes labelled ``leasectl-instance=<instance>`` and ``leasectl-lease=<a lease we were
   given>`` are considered; anything else (another instance, unlabelled, a lease that no longer
   exists) is ignored here (garbage collection owns those). ``destroyed`` sandboxes count as gone.
2. An expired lease (``expires_at <= now``) is treated as desired ``absent``.
3. ``paused`` leases are observed and never acted on (phase ``Paused``), whatever else holds.
4. Several live sandboxes for one lease: one is kept, preferring, in order, the one recorded in
   ``status.sandbox_id``, one carrying the lease's current spec hash, one ``started``, one not in
   ``error``/``build_failed``, the newest, and finally the smallest id (so the choice is stable). The
   others are deleted, one per pass, before anything else is done for the lease. ``destroying``
   sandboxes are never chosen and never deleted again; we wait for them.
5. No live sandbox, but ``status`` records a sandbox id or a create attempt that the list does not
   show: ``lookup`` (get by id, then by the deterministic name) before anything is created. A lookup
   that finds nothing clears the record; the next pass may create. No time bound is needed: the name
   is deterministic and unique per organization, so a create racing a lost one fails with a conflict
   (retried with back-off) instead of making a second sandbox.
6. The table below, for the kept sandbox (``-`` = no action).
7. Back-off: if the table asks for an action and ``status.next_attempt_at > now``, no action; the
   phase stays what it was and the message says until when. A lease in ``Failed`` whose spec changed
   is not held back by the old back-off.

=========  =================  ==========================  ===========================  ====================
observed   running            stopped                     archived                     absent / expired
=========  =================  ==========================  ===========================  ====================
none       create (Failed if  - (Stopped)                 - (Archived)                 - (Deleted)
           spec failed)
started    realize_workspace  stop (Stopping)             stop (Archiving)             delete (Deleting)
           once, then Ready
stopped    start              - (Stopped)                 archive (Archiving)          delete
paused     start              - (Stopped)                 stop (Archiving)             delete
archived   start              - (Stopped, stays archived) - (Archived)                 delete
error      recover if         - (Error; left for the      - (Error; as for stopped)    delete
           recoverable, else  operator: desired running
           delete (replace)   recovers, absent deletes)
build_     - (Failed; no      - (Failed)                  - (Failed)                   delete
failed     create loop)
transit.   wait (Provisioning wait (Stopping)             wait (Archiving)             delete (Deleting)
           / Deleting)
unknown    wait, phase kept   wait, phase kept            wait, phase kept             delete
=========  =================  ==========================  ===========================  ====================

A wait on a transitional state has no end of its own: Daytona keeps a pending change as long as it
takes and refuses every other one meanwhile (a delete too). ``lease_status.observed_since`` records
when the sandbox entered its state; past ``controller.stuck_after_seconds`` the message says it is
stuck and for how long (the phase stays), so an operator sees it in ``get``, on the status page and
with SQL.

A create carries the lease's ``workspace_dir``: when Daytona answers the create with the sandbox
``started`` (it waits for that), the applier realizes the workspace in the same action, so the lease
is ``Ready`` after one pass; otherwise (still starting, or the realize failed) ``realize_workspace``
follows on a later pass as in the table.

Idle: on a lease with ``auto_stop_interval`` (> 0), a stopped or archived sandbox that the lease had
Ready (or Idle) is one Daytona parked for inactivity: phase ``Idle``, no start (``leasectl exec`` and
the queue start it on demand). Without ``auto_stop_interval`` the sandbox is created with auto-stop
off (0), so Daytona never stops it behind our back. Ephemeral (``auto_delete_interval`` 0): Daytona
deletes the sandbox when it stops and refuses to archive it, so a lease desired stopped/archived
never gets a stop or archive for one: phase ``Failed`` with the reason, the sandbox left as it is.
``Blocked`` (quota or capacity) comes from the applier's outcome; while its back-off holds the phase
stays ``Blocked`` with the reason.

Spec change (the sandbox's ``leasectl-spec`` label differs from the lease's spec hash): on a lease
desired ``running`` the old sandbox is deleted (phase ``Provisioning``, "replacing ...") and the new one
is created on a later pass, once the old one is gone, under a new name (the name contains the spec
hash). Leases desired ``stopped``/``archived`` keep their old sandbox (and its disk) untouched by a spec
change; it is replaced when the lease is next desired ``running``. ``recover`` and the replacement of an
unrecoverable ``error`` sandbox are *penalized* actions: even when the call succeeds they count as a
failure, so a sandbox that keeps falling into error is retried with growing back-off, not in a loop.
A converged lease (``Ready``, ``Stopped``, ``Archived``, ``Deleted`` with no action) resets failures.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final, Literal, NamedTuple

from controller.providers.base import (
    LABEL_INSTANCE,
    LABEL_LEASE,
    LABEL_SETTINGS,
    LABEL_SPEC,
    RESERVED_LABEL_PREFIX,
    STATE_ARCHIVED,
    STATE_BUILD_FAILED,
    STATE_DESTROYED,
    STATE_DESTROYING,
    STATE_ERROR,
    STATE_PAUSED,
    STATE_STARTED,
    STATE_STOPPED,
    TRANSITIONAL_STATES,
    CreateRequest,
    Mount,
    NetworkSettings,
    ObservedSandbox,
    SandboxUpdate,
    field_template,
    frozen_instance,
)
from controller.schedules import Schedule, in_force

STUCK_AFTER_SECONDS: Final = 900.0  # controller.stuck_after_seconds's default

DesiredState = Literal["running", "stopped", "archived", "absent"]
DESIRED_STATES: Final = ("running", "stopped", "archived", "absent")

ActionKind = Literal[
    "create", "start", "stop", "archive", "recover", "delete", "lookup", "realize_workspace", "update"
]
ACTION_KINDS: Final = (
    "create",
    "update",
    "start",
    "stop",
    "archive",
    "recover",
    "delete",
    "lookup",
    "realize_workspace",
)

# lease_status.phase values (models.PHASES holds the same list for the database constraint).
PENDING: Final = "Pending"
PROVISIONING: Final = "Provisioning"
READY: Final = "Ready"
STOPPING: Final = "Stopping"
STOPPED: Final = "Stopped"
ARCHIVING: Final = "Archiving"
ARCHIVED: Final = "Archived"
DELETING: Final = "Deleting"
DELETED: Final = "Deleted"
ERROR: Final = "Error"
FAILED: Final = "Failed"
PAUSED: Final = "Paused"
BLOCKED: Final = "Blocked"  # waiting on a quota or capacity (set from an applier outcome)
IDLE: Final = "Idle"  # stopped by Daytona's auto-stop on a lease that asked for it

_KNOWN_STABLE = frozenset(
    {STATE_STARTED, STATE_STOPPED, STATE_PAUSED, STATE_ARCHIVED, STATE_ERROR, STATE_BUILD_FAILED}
)
_MAX_NAME = 63
_CUT_DIGEST = 16  # hex digits of the (instance, lease) digest in a name whose lease part was cut
_UNSAFE = re.compile(r"[^a-z0-9-]+")


# -- names, labels, create requests ------------------------------------------------------------------


def _dns_part(value: str) -> str:
    return _UNSAFE.sub("-", value.lower()).strip("-") or "x"


def sandbox_name(instance: str, lease_name: str, spec_hash: str) -> str:
    """The deterministic sandbox name, at most 63 characters, lowercase letters, digits and dashes.

    ``<instance>-<lease>-<spec8>-<id6>`` when the whole lease name fits: ``spec8`` is the first 8
    characters of the spec hash (a replacement never reuses the old name); ``id6`` is a digest of
    (instance, lease), which keeps names apart where the dashes make the readable part ambiguous
    (``a-b``/``c`` vs ``a``/``b-c``). The readable part is then unique per lease by itself.

    When the lease name must be cut to fit, the cut part no longer tells leases apart, so the digest
    grows to 16 hex characters (64 bits) at the expense of the readable prefix:
    ``<instance>-<lease prefix>-<spec8>-<id16>``. Names that fit are unchanged by this rule (existing
    sandboxes keep their names); sandboxes are found by their labels, never by the name format, so a
    sandbox named by an older rule is kept, not replaced.
    """
    spec8 = _dns_part(spec_hash)[:8]
    whole = f"{instance}\x00{lease_name}".encode()
    inst = _dns_part(instance)[:32].strip("-") or "x"
    lease = _dns_part(lease_name)
    ident = hashlib.sha256(whole).hexdigest()[:6]
    if len(inst) + len(lease) + len(spec8) + len(ident) + 3 <= _MAX_NAME:
        return f"{inst}-{lease}-{spec8}-{ident}"
    ident = hashlib.sha256(whole).hexdigest()[:_CUT_DIGEST]
    room = _MAX_NAME - len(inst) - len(spec8) - len(ident) - 3
    lease = lease[: max(room, 1)].strip("-") or "x"
    return f"{inst}-{lease}-{spec8}-{ident}"[:_MAX_NAME]


def ownership_labels(
    instance: str, lease_name: str, spec_hash: str, settings_hash: str | None = None
) -> dict[str, str]:
    """The labels that prove a sandbox is ours: instance, lease and spec hash (and the hash of the
    in-place settings it carries)."""
    labels = {LABEL_INSTANCE: instance, LABEL_LEASE: lease_name, LABEL_SPEC: spec_hash}
    if settings_hash is not None:
        labels[LABEL_SETTINGS] = settings_hash
    return labels


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def build_create_request(
    instance: str,
    lease_name: str,
    spec_hash: str,
    spec: Mapping[str, Any],
    settings_hash: str | None = None,
) -> CreateRequest:
    """The ``CreateRequest`` for a lease from its spec columns (``controller.specs.SPEC_COLUMNS``).

    User labels are kept except those under the reserved ``leasectl-`` prefix, which the ownership
    labels always win over. ``env`` and ``labels`` may be None.
    """
    user_labels = {
        str(k): str(v)
        for k, v in (spec.get("labels") or {}).items()
        if not str(k).startswith(RESERVED_LABEL_PREFIX)
    }
    labels = {**user_labels, **ownership_labels(instance, lease_name, spec_hash, settings_hash)}
    raw_env = spec.get("env") or {}
    env = {str(k): str(v) for k, v in raw_env.items() if not isinstance(v, Mapping)}
    refs = {
        str(k): {str(a): str(b) for a, b in v.items()} for k, v in raw_env.items() if isinstance(v, Mapping)
    }
    return CreateRequest(
        secret_refs=refs,
        name=sandbox_name(instance, lease_name, spec_hash),
        labels=labels,
        env=env,
        snapshot=spec.get("snapshot"),
        image=spec.get("image"),
        target=spec.get("target"),
        language=spec.get("language"),
        cpu=_int_or_none(spec.get("cpu")),
        memory=_int_or_none(spec.get("memory")),
        disk=_int_or_none(spec.get("disk")),
        gpu=_int_or_none(spec.get("gpu")),
        # Daytona auto-stops after 15 idle minutes unless told otherwise; a lease that does not ask
        # for auto-stop must never be stopped behind the controller's back.
        auto_stop_interval=_int_or_none(spec.get("auto_stop_interval")) or 0,
        auto_archive_interval=_int_or_none(spec.get("auto_archive_interval")),
        # ephemeral: true is Daytona's auto_delete_interval 0 (the SDK sends exactly that)
        auto_delete_interval=0 if spec.get("ephemeral") else _int_or_none(spec.get("auto_delete_interval")),
        os_user=spec.get("os_user"),
        public=spec.get("public"),
        network=network_settings(spec),
        gpu_type=spec.get("gpu_type"),
        spot=spec.get("spot"),
        auto_pause_interval=_int_or_none(spec.get("auto_pause_interval")),
        secrets={str(k): str(v) for k, v in (spec.get("secrets") or {}).items()},
        dockerfile=(spec.get("build") or {}).get("dockerfile"),
        build_context=tuple(str(c) for c in (spec.get("build") or {}).get("context") or ()),
        volumes=tuple(
            Mount(volume=str(m["volume"]), mount_path=str(m["mount_path"]), subpath=m.get("subpath"))
            for m in spec.get("volumes") or ()
        ),
    )


def network_settings(spec: Mapping[str, Any]) -> NetworkSettings | None:
    """The network policy of a lease's spec columns, or None when the lease says nothing about it."""
    block, allow, domains = (
        spec.get("network_block_all"),
        spec.get("network_allow_list"),
        spec.get("domain_allow_list"),
    )
    if block is None and allow is None and domains is None:
        return None
    return NetworkSettings(
        block_all=bool(block),
        allow_list=tuple(str(v) for v in allow or ()),
        domain_allow_list=tuple(str(v) for v in domains or ()),
    )


# Minutes added to Daytona's wall-clock ttl over the lease's expires_at: while leasectl runs it
# deletes the sandbox at expires_at; Daytona's own end matters only when leasectl is down.
TTL_MARGIN_MINUTES: Final = 10


def ttl_minutes(expires_at: datetime | None, now: datetime) -> int | None:
    """Daytona's ``ttl_minutes`` for a sandbox created ``now`` for a lease expiring at ``expires_at``:
    the minutes left, rounded up (at least 1), plus ``TTL_MARGIN_MINUTES``; None without an expiry."""
    if expires_at is None:
        return None
    left = (expires_at - now).total_seconds() / 60
    return max(1, math.ceil(left)) + TTL_MARGIN_MINUTES


# -- inputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseView:
    """Desired state of one lease (from the ``leases`` row)."""

    name: str
    desired_state: str  # one of DESIRED_STATES
    spec_hash: str
    create: CreateRequest  # carries the deterministic name and the ownership labels
    paused: bool = False
    expires_at: datetime | None = None
    workspace_dir: str = "workspace"  # relative to the sandbox work dir, or absolute
    # The in-place settings (labels, intervals): their hash is the sandbox's ``leasectl-settings``
    # label; a sandbox whose label differs gets an ``update`` action, never a replacement.
    settings_hash: str | None = None
    # The hash leasectl put on sandboxes before in-place updates (all spec columns); a sandbox carrying
    # it for the current spec is up to date and is only relabelled (upgrade without replacements).
    legacy_spec_hash: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict)  # spec column -> digest of its value
    # `leasectl rollout`: a sandbox created before this time is replaced (desired running only).
    rollout_requested_at: datetime | None = None
    schedule: Schedule | None = None  # the desired state follows it (controller.schedules)
    created_at: datetime | None = None  # queue order behind a quota (controller.quotas)

    @property
    def ephemeral(self) -> bool:
        """Daytona deletes an ephemeral sandbox (auto_delete_interval 0) when it stops."""
        return self.create.auto_delete_interval == 0

    @property
    def parks_when_idle(self) -> bool:
        """The lease asked for auto-stop: a sandbox Daytona stopped for inactivity is not drift."""
        return bool(self.create.auto_stop_interval)


@dataclass(frozen=True)
class StatusView:
    """What the controller remembers about one lease (the ``lease_status`` row)."""

    sandbox_id: str | None = None
    sandbox_name: str | None = None
    observed_state: str | None = None
    observed_since: datetime | None = None  # when the recorded sandbox was first seen in that state
    phase: str | None = PENDING
    spec_hash: str | None = None  # spec hash of the sandbox last kept
    failed_spec_hash: str | None = None  # set with phase Failed: no retry until the spec hash changes
    message: str | None = None
    last_error: str | None = None
    failures: int | None = 0
    next_attempt_at: datetime | None = None
    ready_at: datetime | None = None
    workspace_path: str | None = None
    create_attempt_name: str | None = None
    create_attempt_at: datetime | None = None
    spec_fields: Mapping[str, str] | None = None  # field digests of the recorded sandbox's spec


# -- outputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One provider operation for one lease. ``reason`` becomes the event message.

    ``failures`` is the lease's failure count when planned (the applier derives the back-off from it);
    ``penalize`` makes even a successful call count as a failure (recover, replace after error);
    ``duplicate`` marks the deletion of an extra sandbox (the kept one's record stays);
    ``lookup_name`` is the create-attempt name a ``lookup`` tries after the id; ``instance`` is the
    controller instance (a ``lookup`` adopts only a sandbox labelled with it and with the lease).
    """

    kind: str  # one of ACTION_KINDS
    lease_name: str
    reason: str
    sandbox_id: str | None = None
    sandbox_name: str | None = None
    create: CreateRequest | None = None
    spec_hash: str | None = None
    workspace_dir: str | None = None
    lookup_name: str | None = None
    failures: int = 0
    penalize: bool = False
    duplicate: bool = False
    instance: str = ""
    from_state: str | None = None  # the observed state the action was planned from
    update: SandboxUpdate | None = None  # what an ``update`` action changes in place
    fields: Mapping[str, str] | None = None  # field digests the sandbox has after create/update
    policy: str | None = None  # a policy asked for it (e.g. "disk-guard"): the event keeps the reason


@dataclass(frozen=True)
class Decision:
    """What the planner concluded for one lease; ``status_values()`` is written to ``lease_status``."""

    lease_name: str
    phase: str
    message: str
    observed_state: str | None
    sandbox_id: str | None
    sandbox_name: str | None
    spec_hash: str | None
    action: Action | None = None
    desired_state: str = "running"
    workspace_path: str | None = None
    ready_at: datetime | None = None
    failed_spec_hash: str | None = None
    clear_create_attempt: bool = False
    reset_failures: bool = False
    spec_fields: Mapping[str, str] | None = None
    keep_spec_fields: bool = True  # False: the recorded field digests no longer describe the sandbox
    observed_since: datetime | None = None  # set by _base: when observed_state was first seen

    def status_values(self) -> dict[str, Any]:
        """Column -> value for ``lease_status``; omitted columns are left as they are."""
        values: dict[str, Any] = {
            "phase": self.phase,
            "message": self.message,
            "observed_state": self.observed_state,
            "observed_since": self.observed_since,
            "sandbox_id": self.sandbox_id,
            "sandbox_name": self.sandbox_name,
            "spec_hash": self.spec_hash,
            "workspace_path": self.workspace_path,
            "ready_at": self.ready_at,
            "failed_spec_hash": self.failed_spec_hash,
        }
        if not self.keep_spec_fields or self.spec_fields is not None:
            values["spec_fields"] = dict(self.spec_fields) if self.spec_fields is not None else None
        if self.clear_create_attempt:
            values["create_attempt_name"] = None
            values["create_attempt_at"] = None
        if self.reset_failures:
            values["failures"] = 0
            values["next_attempt_at"] = None
            values["last_error"] = None
        return values


@dataclass(frozen=True)
class Plan:
    """The actions of one pass (at most one per lease) and a decision for every lease."""

    actions: tuple[Action, ...]
    decisions: Mapping[str, Decision]
    ignored: tuple[str, ...] = field(default=())  # ids of listed sandboxes that are not the planner's

    @property
    def changes(self) -> bool:
        return bool(self.actions)


# -- planning ----------------------------------------------------------------------------------------


def is_expired(lease: LeaseView, now: datetime) -> bool:
    return lease.expires_at is not None and lease.expires_at <= now


def effective_desired(lease: LeaseView, now: datetime) -> str:
    """The desired state the planner works towards: ``absent`` once expired or desired absent (a
    pruned lease goes whatever its schedule says); else the state its schedule puts in force at
    ``now`` (its own ``desired_state`` until an entry has fired)."""
    if is_expired(lease, now):
        return "absent"
    if lease.schedule is None or lease.desired_state == "absent":
        return lease.desired_state
    return str(in_force(lease.schedule, now, lease.desired_state).value)


def _keep_order(lease: LeaseView, status: StatusView) -> Callable[[ObservedSandbox], tuple[Any, ...]]:
    def key(sb: ObservedSandbox) -> tuple[Any, ...]:
        created = sb.created_at.timestamp() if sb.created_at is not None else float("-inf")
        return (
            sb.id != status.sandbox_id,
            sb.spec_hash != lease.spec_hash,
            sb.state != STATE_STARTED,
            sb.state in (STATE_ERROR, STATE_BUILD_FAILED),
            -created,
            sb.id,
        )

    return key


def _describe(sb: ObservedSandbox) -> str:
    return f"sandbox {sb.name} ({sb.id})"


def plan(
    leases: Iterable[LeaseView],
    statuses: Mapping[str, StatusView],
    observed: Sequence[ObservedSandbox],
    now: datetime,
    *,
    instance: str,
    stuck_after_seconds: float = STUCK_AFTER_SECONDS,
) -> Plan:
    """Plan one pass. See the module docstring for the rules."""
    lease_list = list(leases)
    names = {lease.name for lease in lease_list}
    # Only leases with a sandbox get a group (most have exactly one); the others plan with ().
    by_lease: dict[str, list[ObservedSandbox]] = {}
    ignored: list[str] = []
    for sb in observed:
        labels = sb.labels
        lease_name = labels.get(LABEL_LEASE)
        if labels.get(LABEL_INSTANCE) != instance or lease_name not in names:
            ignored.append(sb.id)
            continue
        group = by_lease.get(lease_name)
        if group is None:
            by_lease[lease_name] = [sb]
        else:
            group.append(sb)
    actions: list[Action] = []
    decisions: dict[str, Decision] = {}
    no_sandboxes: tuple[ObservedSandbox, ...] = ()
    for lease in lease_list:
        name = lease.name
        status = statuses.get(name) or _NO_STATUS
        decision = _plan_lease(
            lease, status, by_lease.get(name, no_sandboxes), now, instance, stuck_after_seconds
        )
        decisions[name] = decision
        if decision.action is not None:
            actions.append(decision.action)
    return Plan(actions=tuple(actions), decisions=decisions, ignored=tuple(ignored))


_NO_STATUS: Final = StatusView()  # a lease without a lease_status row (frozen: one serves all)


class _Ctx(NamedTuple):
    """What every rule of one lease's plan reads (a named tuple: immutable, and cheap to make once
    per lease per pass)."""

    lease: LeaseView
    status: StatusView
    desired: str
    now: datetime
    failures: int
    instance: str
    stuck_after_seconds: float


def _plan_lease(
    lease: LeaseView,
    status: StatusView,
    sandboxes: Sequence[ObservedSandbox],
    now: datetime,
    instance: str,
    stuck_after_seconds: float,
) -> Decision:
    expires_at = lease.expires_at
    if expires_at is not None and expires_at <= now:
        desired = "absent"
    elif lease.schedule is None:  # the common case, without a call
        desired = lease.desired_state
    else:
        desired = effective_desired(lease, now)
    ctx = _Ctx(lease, status, desired, now, int(status.failures or 0), instance, stuck_after_seconds)
    keep: ObservedSandbox | None
    extras: Sequence[ObservedSandbox] = ()
    destroying: Sequence[ObservedSandbox] = ()
    if len(sandboxes) == 1:  # the common case: one sandbox, nothing to choose or sort
        only = sandboxes[0]
        keep = None if only.state in (STATE_DESTROYED, STATE_DESTROYING) else only
        if only.state == STATE_DESTROYING:
            destroying = sandboxes
    else:
        live = [sb for sb in sandboxes if sb.state not in (STATE_DESTROYED, STATE_DESTROYING)]
        destroying = [sb for sb in sandboxes if sb.state == STATE_DESTROYING]
        live.sort(key=_keep_order(lease, status))
        keep = live[0] if live else None
        extras = live[1:]

    if lease.paused:
        return _paused(ctx, keep)

    decision = _natural(ctx, keep, extras, destroying, sandboxes)
    if decision.action is None:
        return decision
    return _apply_backoff(ctx, decision)


def observed_since(
    status: StatusView, sandbox_id: str | None, state: str | None, now: datetime
) -> datetime | None:
    """When the lease's sandbox entered ``state``: as recorded while the record names the same
    sandbox in the same state, else ``now`` (None without a state). A row recorded before the
    column existed starts now."""
    if state is None:
        return None
    since = status.observed_since
    if since is None or state != status.observed_state or sandbox_id != status.sandbox_id:
        return now
    return since


# The transitional states waited on for a kept sandbox (a destroying one is never kept).
WAITED_STATES: Final = TRANSITIONAL_STATES - {STATE_DESTROYING}


def stuck_for(state: str | None, since: datetime | None, now: datetime, limit: float) -> float | None:
    """Seconds a sandbox has been in the transitional ``state`` since ``since`` when that is at
    least ``limit`` (controller.stuck_after_seconds), else None: the one rule of the lease's
    "stuck" message and of the ``leasectl_leases_stuck`` gauge."""
    if state not in WAITED_STATES:
        return None
    waited = (now - since).total_seconds() if since is not None else 0.0
    return waited if waited >= limit else None


def _waiting(ctx: _Ctx, sb: ObservedSandbox) -> str:
    """The message of a lease whose sandbox is in a transitional state: how long past
    ``controller.stuck_after_seconds`` (Daytona keeps a pending change as long as it takes, and
    refuses every other change meanwhile: waiting is all the controller can do)."""
    state = sb.state
    since = observed_since(ctx.status, sb.id, state, ctx.now)
    waited = stuck_for(state, since, ctx.now, ctx.stuck_after_seconds)
    if waited is None:
        return f"{_describe(sb)} is {state}; waiting"
    return (
        f"{_describe(sb)} is stuck: {state} for {_duration(waited)} (more than "
        f"controller.stuck_after_seconds, {ctx.stuck_after_seconds:g} s); waiting, as Daytona "
        "refuses other changes while one is pending"
    )


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def _base(ctx: _Ctx, keep: ObservedSandbox | None, phase: str, message: str, **kw: Any) -> Decision:
    """A decision about ``keep`` (or about the recorded sandbox when nothing is kept)."""
    status = ctx.status
    failed = status.failed_spec_hash if status.failed_spec_hash == ctx.lease.spec_hash else None
    if keep is not None:
        same = keep.id == status.sandbox_id
        values: dict[str, Any] = {
            "observed_state": keep.state,
            "sandbox_id": keep.id,
            "sandbox_name": keep.name,
            "spec_hash": keep.spec_hash,
            "workspace_path": status.workspace_path if same else None,
            "ready_at": status.ready_at if same else None,
            "clear_create_attempt": True,
            "keep_spec_fields": same,
        }
    else:
        values = {
            "observed_state": None,
            "sandbox_id": status.sandbox_id,
            "sandbox_name": status.sandbox_name,
            "spec_hash": status.spec_hash,
            "workspace_path": status.workspace_path,
            "ready_at": status.ready_at,
        }
    values["failed_spec_hash"] = failed
    if kw:
        values.update(kw)
    # observed_since(), inlined: this runs for every lease of every pass
    state, since = values["observed_state"], status.observed_since
    if state is None:
        since = None
    elif since is None or state != status.observed_state or values["sandbox_id"] != status.sandbox_id:
        since = ctx.now
    values["observed_since"] = since
    values["lease_name"] = ctx.lease.name
    values["phase"] = phase
    values["message"] = message
    values["desired_state"] = ctx.desired
    return _new_decision(values)


_DECISION_TEMPLATE: Final = field_template(Decision)


def _new_decision(values: Mapping[str, Any]) -> Decision:
    """``Decision(**values)`` without the frozen dataclass's ``__init__`` (17 fields: about a third of
    the cost of planning a converged lease); ``_base`` gives every field without a default."""
    return frozen_instance(Decision, _DECISION_TEMPLATE, values)


def _action(ctx: _Ctx, kind: str, reason: str, sb: ObservedSandbox | None = None, **kw: Any) -> Action:
    return Action(
        kind=kind,
        lease_name=ctx.lease.name,
        instance=ctx.instance,
        reason=reason,
        sandbox_id=sb.id if sb is not None else kw.pop("sandbox_id", None),
        sandbox_name=sb.name if sb is not None else kw.pop("sandbox_name", None),
        from_state=sb.state if sb is not None else None,
        failures=ctx.failures,
        **kw,
    )


def _paused(ctx: _Ctx, keep: ObservedSandbox | None) -> Decision:
    what = f"{_describe(keep)} is {keep.state}" if keep is not None else "no sandbox observed"
    return _base(ctx, keep, PAUSED, f"paused: observed only ({what})")


def _apply_backoff(ctx: _Ctx, decision: Decision) -> Decision:
    status = ctx.status
    if status.next_attempt_at is None or status.next_attempt_at <= ctx.now:
        return decision
    spec_changed_after_failure = (
        status.phase == FAILED
        and status.failed_spec_hash is not None
        and status.failed_spec_hash != ctx.lease.spec_hash
    )
    if spec_changed_after_failure:
        return decision
    assert decision.action is not None
    until = status.next_attempt_at.isoformat()
    if status.phase == BLOCKED:
        message = (
            f"Blocked: {status.last_error or 'waiting for quota or capacity'}; "
            f"next attempt after {until}, then: {decision.action.kind}"
        )
    else:
        message = (
            f"backing off until {until} after {ctx.failures} failure(s); "
            f"then: {decision.action.kind} ({decision.action.reason})"
        )
    return replace(decision, phase=status.phase or ERROR, message=message, action=None, reset_failures=False)


def _converged(ctx: _Ctx, keep: ObservedSandbox | None, phase: str, message: str, **kw: Any) -> Decision:
    return _base(ctx, keep, phase, message, reset_failures=True, **kw)


_WAIT_PHASE = {"running": PROVISIONING, "stopped": STOPPING, "archived": ARCHIVING, "absent": DELETING}


def _natural(
    ctx: _Ctx,
    keep: ObservedSandbox | None,
    extras: Sequence[ObservedSandbox],
    destroying: Sequence[ObservedSandbox],
    seen: Sequence[ObservedSandbox],
) -> Decision:
    lease, status, desired = ctx.lease, ctx.status, ctx.desired

    # Extra sandboxes first (for ``absent`` every live sandbox goes, the kept one last).
    if extras:
        after = _natural(ctx, keep, (), destroying, seen)
        extra = extras[0]
        kept = f"keeping {_describe(keep)}" if keep is not None and desired != "absent" else "lease absent"
        reason = f"deleting duplicate {_describe(extra)} ({extra.state}); {kept}"
        action = _action(ctx, "delete", reason, extra, duplicate=True)
        return replace(after, message=f"{reason}; then: {after.message}", action=action, reset_failures=False)

    if keep is None:
        return _nothing_live(ctx, destroying, seen)

    sb = keep
    state = sb.state
    other_spec = sb.spec_hash != lease.spec_hash
    legacy = other_spec and _legacy_match(lease, sb)  # (a legacy match has another spec hash)
    spec_differs = other_spec and not legacy

    if desired == "absent":
        why = "lease expired" if is_expired(lease, ctx.now) and lease.desired_state != "absent" else "absent"
        reason = f"deleting {_describe(sb)} ({state}): lease {why}"
        return _base(ctx, sb, DELETING, reason, action=_action(ctx, "delete", reason, sb))

    if state not in _KNOWN_STABLE and state not in TRANSITIONAL_STATES:
        phase = status.phase or PENDING
        return _base(ctx, sb, phase, f"{_describe(sb)} is in unknown state {state!r}; waiting")

    if state in TRANSITIONAL_STATES:
        return _base(ctx, sb, _WAIT_PHASE[desired], _waiting(ctx, sb))

    if (
        not spec_differs
        and state in _UPDATABLE
        and lease.settings_hash is not None
        and (legacy or sb.settings_hash != lease.settings_hash)
        and not (desired == "running" and lease.rollout_requested_at is not None and _rollout_due(lease, sb))
    ):
        return _update(ctx, sb, legacy)

    if desired == "running":
        return _running(ctx, sb, spec_differs)
    if desired == "stopped":
        return _stopped(ctx, sb)
    return _archived(ctx, sb)


def _nothing_live(
    ctx: _Ctx, destroying: Sequence[ObservedSandbox], seen: Sequence[ObservedSandbox]
) -> Decision:
    lease, status, desired = ctx.lease, ctx.status, ctx.desired
    if destroying:
        sb = destroying[0]
        return _base(
            ctx,
            None,
            DELETING,
            f"{_describe(sb)} is destroying; waiting",
            observed_state=sb.state,
            sandbox_id=sb.id,
            sandbox_name=sb.name,
        )
    seen_ids = {sb.id for sb in seen}
    seen_names = {sb.name for sb in seen}
    missing_id = status.sandbox_id is not None and status.sandbox_id not in seen_ids
    missing_attempt = status.create_attempt_name is not None and status.create_attempt_name not in seen_names
    if missing_id or missing_attempt:
        target = ", ".join(
            part
            for part in (
                f"id {status.sandbox_id}" if missing_id else "",
                f"name {status.create_attempt_name}" if missing_attempt else "",
            )
            if part
        )
        reason = f"recorded sandbox ({target}) missing from the list; looking it up before acting"
        action = _action(
            ctx,
            "lookup",
            reason,
            sandbox_id=status.sandbox_id if missing_id else None,
            sandbox_name=status.sandbox_name if missing_id else status.create_attempt_name,
            lookup_name=status.create_attempt_name if missing_attempt else None,
        )
        phase = {"running": PROVISIONING, "absent": DELETING}.get(desired, status.phase or PENDING)
        return _base(ctx, None, phase, reason, action=action)

    gone: dict[str, Any] = {
        "sandbox_id": None,
        "sandbox_name": None,
        "spec_hash": None,
        "workspace_path": None,
        "ready_at": None,
        "clear_create_attempt": True,
        "keep_spec_fields": False,
    }
    if desired == "absent":
        return _converged(ctx, None, DELETED, "no sandbox; lease absent", **gone)
    if desired == "stopped":
        return _converged(ctx, None, STOPPED, "no sandbox; nothing to create while desired stopped", **gone)
    if desired == "archived":
        return _converged(ctx, None, ARCHIVED, "no sandbox; nothing to create while desired archived", **gone)
    if status.failed_spec_hash is not None and status.failed_spec_hash == lease.spec_hash:
        return _base(
            ctx,
            None,
            FAILED,
            f"spec {lease.spec_hash} failed permanently ({status.last_error or 'see events'}); "
            "change the spec to retry",
            **gone,
        )
    req = replace(lease.create, ttl_minutes=ttl_minutes(lease.expires_at, ctx.now))
    reason = f"creating sandbox {req.name} (spec {lease.spec_hash})"
    action = _action(
        ctx,
        "create",
        reason,
        sandbox_name=req.name,
        create=req,
        spec_hash=lease.spec_hash,
        fields=lease.fields or None,
        workspace_dir=lease.workspace_dir,  # the applier realizes it at once when the create answers started
    )
    # The create attempt is committed by the reconciler just before the call: never clear it here.
    gone.pop("clear_create_attempt")
    return _base(ctx, None, PROVISIONING, reason, action=action, **gone)


# -- in-place updates --------------------------------------------------------------------------------

# The spec fields Daytona changes on a live sandbox (controller.specs.IN_PLACE_COLUMNS; a unit test
# keeps the two equal). Everything else replaces the sandbox.
IN_PLACE_FIELDS: Final = (
    "labels",
    "auto_stop_interval",
    "auto_archive_interval",
    "auto_delete_interval",
    "auto_pause_interval",
    "ephemeral",
    "public",
    "network_block_all",
    "network_allow_list",
    "domain_allow_list",
    "expires_at",
)
# The setter (SandboxUpdate field) that applies each in-place field.
SETTER_OF: Final = {
    "labels": "labels",
    "auto_stop_interval": "auto_stop_interval",
    "auto_archive_interval": "auto_archive_interval",
    "auto_delete_interval": "auto_delete_interval",
    "auto_pause_interval": "auto_pause_interval",
    "ephemeral": "auto_delete_interval",
    "public": "public",
    "network_block_all": "network",
    "network_allow_list": "network",
    "domain_allow_list": "network",
    "expires_at": "ttl_minutes",
}
# Labels the platform puts on a sandbox itself; an update that replaces all labels keeps them.
PLATFORM_LABELS: Final = ("code-toolbox-language",)
DAYTONA_AUTO_ARCHIVE_DEFAULT: Final = 10080  # minutes (7 days): what an unset auto_archive_interval means
_UPDATABLE = frozenset({STATE_STARTED, STATE_STOPPED, STATE_PAUSED, STATE_ARCHIVED})


def _legacy_match(lease: LeaseView, sb: ObservedSandbox) -> bool:
    """A sandbox labelled before in-place updates existed, with the full hash of the current spec."""
    return (
        lease.legacy_spec_hash is not None
        and sb.settings_hash is None
        and sb.spec_hash == lease.legacy_spec_hash
        and sb.spec_hash != lease.spec_hash
    )


# In-place fields whose setter runs on every update the record cannot explain: the ones older
# leasectl ran, and public and the network policy (a sandbox left public or open by a lost record
# is worse than one request more); the other added fields run only when the lease sets them.
_ALWAYS_SET: Final = (
    "labels",
    "auto_stop_interval",
    "auto_archive_interval",
    "auto_delete_interval",
    "public",
    "network_block_all",
)


def changed_fields(status: StatusView, sb: ObservedSandbox, lease: LeaseView) -> list[str] | None:
    """The spec fields whose value differs between the recorded sandbox and the lease, or None when
    the record cannot tell (another sandbox, nothing recorded). A field missing on one side (an
    added field that is unset there) differs from one that is set."""
    known = status.spec_fields
    if not known or not lease.fields or status.sandbox_id != sb.id:
        return None
    names = [*lease.fields, *(f for f in known if f not in lease.fields)]
    return [f for f in names if known.get(f) != lease.fields.get(f)]


def _update(ctx: _Ctx, sb: ObservedSandbox, legacy: bool) -> Decision:
    lease, status = ctx.lease, ctx.status
    desired_labels = {k: v for k, v in lease.create.labels.items() if not k.startswith(RESERVED_LABEL_PREFIX)}
    kept = {k: sb.labels[k] for k in PLATFORM_LABELS if k in sb.labels and k not in desired_labels}
    labels = {
        **kept,
        **desired_labels,
        **ownership_labels(ctx.instance, lease.name, lease.spec_hash, lease.settings_hash),
    }
    req = lease.create
    values: dict[str, Any] = {
        "auto_stop_interval": req.auto_stop_interval or 0,
        "auto_archive_interval": (
            req.auto_archive_interval
            if req.auto_archive_interval is not None
            else DAYTONA_AUTO_ARCHIVE_DEFAULT
        ),
        "auto_delete_interval": req.auto_delete_interval if req.auto_delete_interval is not None else -1,
        "auto_pause_interval": req.auto_pause_interval or 0,
        "public": bool(req.public),
        "network": req.network or NetworkSettings(),  # no policy in the spec: unrestricted
        "ttl_minutes": ttl_minutes(lease.expires_at, ctx.now) or 0,  # re-anchored now; 0 = none
    }
    changed = changed_fields(status, sb, lease)
    if legacy:
        # Created by an older leasectl from this very spec: only the labels are new.
        setters: list[str] = []
        reason = (
            f"update labels in place on {_describe(sb)}: labelled by an older leasectl, spec unchanged "
            f"({sb.spec_hash} is {lease.spec_hash} now)"
        )
    else:
        in_place = [f for f in IN_PLACE_FIELDS if not changed or f in changed]
        if not changed:  # the record cannot tell: every setter, but only settings the spec has
            in_place = [f for f in in_place if f in _ALWAYS_SET or f in lease.fields]
        setters = [SETTER_OF[f] for f in in_place if f != "labels"]
        what = ", ".join(in_place) if changed is not None and in_place else "labels and settings"
        reason = f"update {what} in place on {_describe(sb)}"
    update = SandboxUpdate(labels=labels, **{k: v for k, v in values.items() if k in setters})
    action = _action(
        ctx, "update", reason, sb, update=update, spec_hash=lease.spec_hash, fields=lease.fields or None
    )
    return _base(ctx, sb, status.phase or PENDING, reason, action=action)


def _replace(ctx: _Ctx, sb: ObservedSandbox, why: str, *, penalize: bool = False) -> Decision:
    reason = f"replacing {_describe(sb)} ({sb.state}): {why}; a new sandbox is created once it is gone"
    phase = ERROR if penalize else PROVISIONING
    return _base(ctx, sb, phase, reason, action=_action(ctx, "delete", reason, sb, penalize=penalize))


def _running(ctx: _Ctx, sb: ObservedSandbox, spec_differs: bool) -> Decision:
    lease, status, state = ctx.lease, ctx.status, sb.state
    if spec_differs and state != STATE_BUILD_FAILED:
        changed = changed_fields(status, sb, lease)
        replacing = [f for f in changed or () if f not in IN_PLACE_FIELDS]
        what = f"{', '.join(replacing)} changed" if replacing else "spec changed"
        reason = (
            f"replace: {what} ({sb.spec_hash} -> {lease.spec_hash}); deleting {_describe(sb)} ({state}), "
            "a new sandbox is created once it is gone"
        )
        return _base(ctx, sb, PROVISIONING, reason, action=_action(ctx, "delete", reason, sb))
    if lease.rollout_requested_at is not None and _rollout_due(lease, sb):
        assert lease.rollout_requested_at is not None
        reason = (
            f"replace: rollout requested at {lease.rollout_requested_at.isoformat()}; deleting "
            f"{_describe(sb)} ({state}), a new sandbox is created once it is gone"
        )
        return _base(ctx, sb, PROVISIONING, reason, action=_action(ctx, "delete", reason, sb))
    if spec_differs:  # build_failed under an old spec: replacing is the way out of Failed
        return _replace(ctx, sb, f"build failed under spec {sb.spec_hash}; spec is now {lease.spec_hash}")
    if state == STATE_STARTED:
        same = sb.id == status.sandbox_id
        if same and status.workspace_path:
            ready_at = status.ready_at if status.phase == READY and status.ready_at else ctx.now
            return _converged(ctx, sb, READY, f"{_describe(sb)} is started; ready", ready_at=ready_at)
        reason = f"realizing workspace {lease.workspace_dir!r} in {_describe(sb)}"
        action = _action(ctx, "realize_workspace", reason, sb, workspace_dir=lease.workspace_dir)
        return _base(ctx, sb, PROVISIONING, reason, action=action)
    if state in (STATE_STOPPED, STATE_ARCHIVED) and _idle(ctx, sb):
        return _converged(
            ctx,
            sb,
            IDLE,
            f"{_describe(sb)} is {state}: Daytona parked it after "
            f"{lease.create.auto_stop_interval} idle minute(s) (auto_stop_interval); "
            "`leasectl exec` and queued executions start it on demand",
        )
    if state in (STATE_STOPPED, STATE_PAUSED, STATE_ARCHIVED):
        reason = f"starting {_describe(sb)} ({state})"
        return _base(ctx, sb, PROVISIONING, reason, action=_action(ctx, "start", reason, sb))
    if state == STATE_ERROR:
        why = sb.error_reason or "no reason given"
        if sb.recoverable:
            reason = f"recovering {_describe(sb)}: in error ({why}), recoverable"
            action = _action(ctx, "recover", reason, sb, penalize=True)
            return _base(ctx, sb, ERROR, reason, action=action)
        return _replace(ctx, sb, f"in error ({why}) and not recoverable", penalize=True)
    # build_failed under the current spec: no create loop.
    why = sb.error_reason or "no reason given"
    return _base(
        ctx,
        sb,
        FAILED,
        f"{_describe(sb)} build failed ({why}); change the spec to retry",
        failed_spec_hash=lease.spec_hash,
    )


def _rollout_due(lease: LeaseView, sb: ObservedSandbox) -> bool:
    """A rollout was asked for after this sandbox was created. Level-triggered and crash safe: the
    request stays in the row, and the sandbox created after it satisfies it; no flag to clear."""
    return (
        lease.rollout_requested_at is not None
        and sb.created_at is not None
        and sb.created_at < lease.rollout_requested_at
        and sb.state != STATE_BUILD_FAILED
    )


def _idle(ctx: _Ctx, sb: ObservedSandbox) -> bool:
    """A stopped/archived sandbox of a lease with auto-stop that was Ready (or Idle) under us: Daytona
    parked it for inactivity. A sandbox that was stopped because the lease asked for it (phase
    Stopped, Archived, ...) is started when the lease wants it running again."""
    status = ctx.status
    return (
        ctx.lease.parks_when_idle
        and sb.id == status.sandbox_id
        and status.phase in (READY, IDLE)
        and sb.spec_hash == ctx.lease.spec_hash
    )


def _ephemeral_kept(ctx: _Ctx, sb: ObservedSandbox) -> Decision:
    """An ephemeral sandbox (auto_delete_interval 0) on a lease desired stopped/archived: Daytona
    deletes it on stop and refuses to archive it, so the planner leaves it alone and says why
    (``leasectl apply`` refuses such a lease; only SQL can write one)."""
    return _base(
        ctx,
        sb,
        FAILED,
        f"{_describe(sb)} is ephemeral (auto_delete_interval 0): Daytona deletes it when it stops, so it "
        f"is left {sb.state}; desire running or absent, or set auto_delete_interval to keep it {ctx.desired}",
    )


def _left_in_error(ctx: _Ctx, sb: ObservedSandbox) -> Decision:
    why = sb.error_reason or "no reason given"
    return _base(
        ctx,
        sb,
        ERROR,
        f"{_describe(sb)} is in error ({why}); left as is while desired {ctx.desired}: "
        "desired running recovers or replaces it, absent deletes it",
    )


def _build_failed(ctx: _Ctx, sb: ObservedSandbox) -> Decision:
    why = sb.error_reason or "no reason given"
    return _base(
        ctx,
        sb,
        FAILED,
        f"{_describe(sb)} build failed ({why}); left as is while desired {ctx.desired}",
        failed_spec_hash=sb.spec_hash if sb.spec_hash == ctx.lease.spec_hash else None,
    )


def _stopped(ctx: _Ctx, sb: ObservedSandbox) -> Decision:
    state = sb.state
    if state in (STATE_STARTED, STATE_PAUSED) and ctx.lease.ephemeral:
        return _ephemeral_kept(ctx, sb)
    if state == STATE_STARTED:
        reason = f"stopping {_describe(sb)}"
        return _base(ctx, sb, STOPPING, reason, action=_action(ctx, "stop", reason, sb))
    if state in (STATE_STOPPED, STATE_PAUSED, STATE_ARCHIVED):
        return _converged(ctx, sb, STOPPED, f"{_describe(sb)} is {state}")
    if state == STATE_ERROR:
        return _left_in_error(ctx, sb)
    return _build_failed(ctx, sb)


def _archived(ctx: _Ctx, sb: ObservedSandbox) -> Decision:
    state = sb.state
    if state in (STATE_STARTED, STATE_PAUSED, STATE_STOPPED) and ctx.lease.ephemeral:
        return _ephemeral_kept(ctx, sb)
    if state in (STATE_STARTED, STATE_PAUSED):
        reason = f"stopping {_describe(sb)} before archiving"
        return _base(ctx, sb, ARCHIVING, reason, action=_action(ctx, "stop", reason, sb))
    if state == STATE_STOPPED:
        reason = f"archiving {_describe(sb)}"
        return _base(ctx, sb, ARCHIVING, reason, action=_action(ctx, "archive", reason, sb))
    if state == STATE_ARCHIVED:
        return _converged(ctx, sb, ARCHIVED, f"{_describe(sb)} is archived")
    if state == STATE_ERROR:
        return _left_in_error(ctx, sb)
    return _build_failed(ctx, sb)
