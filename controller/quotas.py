"""Quotas: limits on what runs, per value of a label (each team), for one value, or for the instance.

Owns the quota model (:class:`QuotaView`), what a sandbox holds (:func:`resources_of`), the use of
every quota scope (:func:`usage`) and the gate the reconciler puts after the planner (:func:`gate`).
Pure: frozen dataclasses and the observed fleet in, a :class:`~controller.planner.Plan` out.

What counts (issue 16): a sandbox *runs* - and holds its CPU, memory, disk and GPU and one of the
``sandboxes`` - in every observed state except ``stopped``, ``archived``, ``archiving``, ``paused``,
``error``, ``build_failed``, ``destroying`` and ``destroyed`` (an unknown state counts: the stricter
reading). A lease whose create was recorded but whose sandbox the list does not show yet counts too.
Every observed sandbox of the instance counts by its own labels, whether or not a lease wants it.
Resources the API does not report are the lease's, else Daytona's defaults (1 CPU, 1 GiB, 3 GiB).

The gate: actions that make a sandbox run (``create``, ``start``, ``recover``) are admitted one by
one in a stable order - the lease created first goes first, then by name - while every quota that
applies to the lease has room; an admitted action counts at once, so one pass never overshoots. An
action that does not fit becomes phase ``Blocked`` with a message naming the quota and its use, and
every later candidate under the same quota waits behind it (first come, first served: a large lease
is not starved by small ones). Quotas never stop what already runs: lowering one blocks new starts
until use falls below it. Idle sandboxes that ``exec`` starts on demand are not gated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

from controller.planner import BLOCKED, Decision, LeaseView, Plan, StatusView
from controller.providers.base import RESERVED_LABEL_PREFIX, ObservedSandbox

DIMENSIONS: Final = ("sandboxes", "cpu", "memory", "disk", "gpu")
UNITS: Final = {"sandboxes": "", "cpu": " CPU", "memory": " GiB memory", "disk": " GiB disk", "gpu": " GPU"}
DEFAULT_CPU: Final = 1
DEFAULT_MEMORY: Final = 1  # GiB
DEFAULT_DISK: Final = 3  # GiB
NOT_RUNNING: Final = frozenset(
    {"stopped", "archived", "archiving", "paused", "error", "build_failed", "destroying", "destroyed"}
)
GROWING: Final = frozenset({"create", "start", "recover"})
INSTANCE_SCOPE: Final = "instance"
_LATE: Final = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Resources:
    sandboxes: int = 0
    cpu: int = 0
    memory: int = 0
    disk: int = 0
    gpu: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(*(getattr(self, d) + getattr(other, d) for d in DIMENSIONS))

    def get(self, dimension: str) -> int:
        return int(getattr(self, dimension))


@dataclass(frozen=True)
class QuotaView:
    """One quota. ``label`` '' = the whole instance; ``value`` '' = every value of ``label`` on its own."""

    label: str = ""
    value: str = ""
    sandboxes: int | None = None
    cpu: int | None = None
    memory: int | None = None
    disk: int | None = None
    gpu: int | None = None

    @property
    def name(self) -> str:
        if not self.label:
            return INSTANCE_SCOPE
        return f"{self.label}={self.value}" if self.value else f"{self.label}=*"

    def limit(self, dimension: str) -> int | None:
        value = getattr(self, dimension)
        return None if value is None else int(value)

    def scope(self, labels: Mapping[str, str]) -> str | None:
        """The scope a sandbox with ``labels`` uses under this quota (None: the quota does not apply)."""
        if not self.label:
            return INSTANCE_SCOPE
        found = labels.get(self.label)
        if found is None or (self.value and found != self.value):
            return None
        return f"{self.label}={found}"


def _user_labels(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if not k.startswith(RESERVED_LABEL_PREFIX)}


def lease_resources(lease: LeaseView) -> Resources:
    req = lease.create
    return Resources(
        sandboxes=1,
        cpu=req.cpu or DEFAULT_CPU,
        memory=req.memory or DEFAULT_MEMORY,
        disk=req.disk or DEFAULT_DISK,
        gpu=req.gpu or 0,
    )


def resources_of(sb: ObservedSandbox, lease: LeaseView | None = None) -> Resources:
    """What a sandbox holds: what the API reports, else what its lease asks, else the defaults."""
    base = (
        lease_resources(lease)
        if lease is not None
        else Resources(1, DEFAULT_CPU, DEFAULT_MEMORY, DEFAULT_DISK)
    )
    return Resources(
        sandboxes=1,
        cpu=sb.cpu if sb.cpu is not None else base.cpu,
        memory=sb.memory if sb.memory is not None else base.memory,
        disk=sb.disk if sb.disk is not None else base.disk,
        gpu=sb.gpu if sb.gpu is not None else base.gpu,
    )


def runs(state: str | None) -> bool:
    return state is not None and state not in NOT_RUNNING


def usage(
    quotas: Sequence[QuotaView],
    leases: Sequence[LeaseView],
    statuses: Mapping[str, StatusView],
    observed: Sequence[ObservedSandbox],
    *,
    lease_label: str,
) -> dict[str, Resources]:
    """Use per scope (``instance``, ``team=ml``, ...) of everything that runs now."""
    by_name = {lease.name: lease for lease in leases}
    use: dict[str, Resources] = {}
    seen: set[str] = set()

    def add(labels: Mapping[str, str], held: Resources) -> None:
        for scope in {s for q in quotas if (s := q.scope(labels)) is not None}:
            use[scope] = use.get(scope, Resources()) + held

    for sb in observed:
        if not runs(sb.state):
            continue
        owner = sb.labels.get(lease_label)
        lease = by_name.get(owner) if owner is not None else None
        seen.add(owner or "")
        add(_user_labels(sb.labels), resources_of(sb, lease))
    for lease in leases:  # a create on its way that the list does not show yet
        status = statuses.get(lease.name)
        if lease.name not in seen and status is not None and status.create_attempt_name is not None:
            add(_user_labels(lease.create.labels), lease_resources(lease))
    return use


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    reason: str = ""


def gate(
    the_plan: Plan,
    leases: Sequence[LeaseView],
    statuses: Mapping[str, StatusView],
    observed: Sequence[ObservedSandbox],
    quotas: Sequence[QuotaView],
    *,
    lease_label: str,
) -> Plan:
    """The plan with every action that would run a sandbox beyond a quota turned into a wait."""
    if not quotas or not any(a.kind in GROWING for a in the_plan.actions):
        return the_plan
    use = usage(quotas, leases, statuses, observed, lease_label=lease_label)
    by_name = {lease.name: lease for lease in leases}
    sandbox_by_id = {sb.id: sb for sb in observed}
    candidates = sorted(
        (a for a in the_plan.actions if a.kind in GROWING and a.lease_name in by_name),
        key=lambda a: (by_name[a.lease_name].created_at or _LATE, a.lease_name),
    )
    blocked_scopes: dict[str, str] = {}  # scope -> the lease waiting first under it
    waiting: dict[str, int] = {}
    decisions: dict[str, Decision] = dict(the_plan.decisions)
    refused: set[str] = set()
    for action in candidates:
        lease = by_name[action.lease_name]
        sb = sandbox_by_id.get(action.sandbox_id or "")
        need = resources_of(sb, lease) if sb is not None else lease_resources(lease)
        labels = _user_labels(lease.create.labels)
        reason = ""
        for quota in quotas:
            scope = quota.scope(labels)
            if scope is None:
                continue
            named = scope if scope == quota.name else f"{quota.name} ({scope})"
            if scope in blocked_scopes:
                waiting[scope] = waiting.get(scope, 0) + 1
                reason = (
                    f"quota {named}: waiting behind {blocked_scopes[scope]} "
                    f"({waiting[scope]} in line before this lease; oldest lease first)"
                )
                break
            held = use.get(scope, Resources())
            for dim in DIMENSIONS:
                limit = quota.limit(dim)
                if limit is not None and need.get(dim) > limit:
                    # It can never fit: it waits, but nobody waits behind it.
                    reason = (
                        f"quota {named} {dim}: this lease needs {need.get(dim)}{UNITS[dim]}, "
                        f"more than the limit of {limit}; raise the quota or shrink the lease"
                    )
                    break
                if limit is not None and held.get(dim) + need.get(dim) > limit:
                    reason = (
                        f"quota {named} {dim}: {held.get(dim)}/{limit}{UNITS[dim]} in use, "
                        f"this lease needs {need.get(dim)}"
                    )
                    blocked_scopes[scope] = lease.name
                    break
            if reason:
                break
        if reason:
            refused.add(lease.name)
            decision = decisions[lease.name]
            decisions[lease.name] = replace(
                decision,
                phase=BLOCKED,
                message=f"Blocked: {reason}; then: {action.kind}",
                action=None,
                reset_failures=False,
            )
            continue
        for scope in {s for q in quotas if (s := q.scope(labels)) is not None}:
            use[scope] = use.get(scope, Resources()) + need
    actions = tuple(a for a in the_plan.actions if not (a.kind in GROWING and a.lease_name in refused))
    return replace(the_plan, actions=actions, decisions=decisions)


def matching(quotas: Iterable[QuotaView], labels_of_leases: Iterable[Mapping[str, str]]) -> dict[str, int]:
    """How many leases each quota applies to (a quota whose label no lease has shows 0)."""
    labels = list(labels_of_leases)
    return {q.name: sum(1 for lab in labels if q.scope(lab) is not None) for q in quotas}
