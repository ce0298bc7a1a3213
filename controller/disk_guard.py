"""The disk guard: keep the disk held by stopped sandboxes under a cap by archiving the longest-stopped.

Pure, called by ``controller.reconciler`` after the planner and the quota gate when
``policy.disk_guard_gib`` is set. Daytona counts the disk of every sandbox that is not archived
against the organization's quota, so stopped sandboxes left alone can fill it until every create
fails; archived ones hold none. The guard adds an ``archive`` action (its reason becomes the event
message) for stopped sandboxes of leases that have nothing else to do this pass, longest stopped
first (since the start of their ``stopped`` segment in ``usage``; one stopped since the last pass
has none yet and counts as the most recent), until the disk of
the stopped ones left is at or under the cap. It never touches a paused lease, an ephemeral sandbox
(Daytona cannot archive those), a sandbox no lease owns (garbage collection's) or one whose lease
has another action this pass. The planner takes an archived sandbox as converged for a lease desired
``stopped`` (phase Stopped) and as ``Idle`` for a lease Daytona parked; ``start`` restores it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from controller.planner import Action, LeaseView, Plan
from controller.providers.base import LABEL_LEASE, STATE_STOPPED, ObservedSandbox
from controller.quotas import resources_of

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def guard(
    the_plan: Plan,
    leases: Sequence[LeaseView],
    observed: Sequence[ObservedSandbox],
    *,
    cap_gib: int,
    since: Mapping[str, datetime],
    instance: str,
) -> Plan:
    """The plan with the archives that bring stopped disk under ``cap_gib`` added."""
    by_name = {lease.name: lease for lease in leases}
    acting = {a.sandbox_id for a in the_plan.actions if a.sandbox_id is not None}
    stopped = [sb for sb in observed if sb.state == STATE_STOPPED and sb.id not in acting]
    held = {sb.id: resources_of(sb, by_name.get(sb.labels.get(LABEL_LEASE, ""))).disk for sb in stopped}
    total = sum(held.values())
    if total <= cap_gib:
        return the_plan
    busy = {a.lease_name for a in the_plan.actions}

    def eligible(sb: ObservedSandbox) -> bool:
        lease = by_name.get(sb.labels.get(LABEL_LEASE, ""))
        decision = the_plan.decisions.get(lease.name) if lease is not None else None
        return (
            lease is not None
            and decision is not None
            and decision.sandbox_id == sb.id  # the lease's kept sandbox
            and lease.name not in busy
            and not lease.paused
            and not lease.ephemeral
        )

    # Known stop times first, oldest first; a sandbox without one (it stopped since the last pass)
    # is the most recently stopped: after them, by creation.
    candidates = sorted(
        (sb for sb in stopped if eligible(sb)),
        key=lambda sb: (sb.id not in since, since.get(sb.id) or _EPOCH, sb.created_at or _EPOCH, sb.id),
    )
    actions = list(the_plan.actions)
    decisions = dict(the_plan.decisions)
    for sb in candidates:
        if total <= cap_gib:
            break
        lease_name = sb.labels[LABEL_LEASE]
        when = since.get(sb.id)
        stopped_for = f"stopped since {when.isoformat()}" if when is not None else "just stopped"
        reason = (
            f"disk guard: stopped sandboxes hold {total} GiB, over the cap of {cap_gib} GiB "
            f"(policy.disk_guard_gib); archiving sandbox {sb.name} ({sb.id}, {held[sb.id]} GiB, "
            f"{stopped_for}), the longest stopped"
        )
        action = Action(
            kind="archive",
            lease_name=lease_name,
            reason=reason,
            sandbox_id=sb.id,
            sandbox_name=sb.name,
            instance=instance,
            from_state=sb.state,
            policy="disk-guard",
        )
        actions.append(action)
        decisions[lease_name] = replace(decisions[lease_name], message=reason, action=action)
        total -= held[sb.id]
    return replace(the_plan, actions=tuple(actions), decisions=decisions)
