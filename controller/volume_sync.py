"""The reconciler's volume step: Daytona volumes declared in ``volumes`` are created before the leases
that mount them, and deleted only when declared ``absent`` and no lease mounts them any more.

:func:`plan_volumes` decides purely (declared desired states, the volumes Daytona has, the names
leases mount); :func:`sync_volumes` reads the ``volumes`` rows (one SELECT), lists Daytona's volumes
only when there is a row (a fleet without volumes costs no request), runs the decisions and writes one
event per call. A lease waits for its volumes in the applier (``VolumeNotReadyError``, phase
Blocked), which looks each one up right before the create. Called by ``controller.reconciler``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from controller.db import Database
from controller.errors import ProviderError
from controller.planner import LeaseView, StatusView
from controller.providers.base import ObservedVolume, SandboxProvider
from models import Event, Volume, utcnow

log = logging.getLogger(__name__)

# Volume states in which a delete is already under way (nothing to do).
_GOING = frozenset({"pending_delete", "deleting", "deleted"})


@dataclass(frozen=True)
class VolumeDecision:
    """What to do about one declared volume: ``create``, ``delete`` or nothing (``kind`` None)."""

    name: str
    kind: str | None
    reason: str
    volume_id: str | None = None


def mounted_volumes(leases: Iterable[LeaseView], statuses: Mapping[str, StatusView]) -> dict[str, list[str]]:
    """Volume name -> the leases that mount it: every lease not desired absent, and an absent one
    while it still has a sandbox."""
    mounted: dict[str, list[str]] = {}
    for lease in leases:
        status = statuses.get(lease.name)
        if lease.desired_state == "absent" and (status is None or status.sandbox_id is None):
            continue
        for mount in lease.create.volumes:
            mounted.setdefault(mount.volume, []).append(lease.name)
    return mounted


def plan_volumes(
    declared: Mapping[str, str],
    observed: Sequence[ObservedVolume],
    mounted: Mapping[str, Sequence[str]],
) -> list[VolumeDecision]:
    """Pure: per declared volume (name -> ``present``/``absent``) what to do, by name."""
    by_name = {v.name: v for v in observed}
    decisions = []
    for name, desired in sorted(declared.items()):
        volume = by_name.get(name)
        if desired == "present":
            if volume is None:
                decisions.append(VolumeDecision(name, "create", f"creating volume {name}"))
            else:
                decisions.append(VolumeDecision(name, None, f"volume {name} is {volume.state}", volume.id))
        elif volume is None or volume.state in _GOING:
            decisions.append(VolumeDecision(name, None, f"volume {name} is gone or going"))
        elif mounted.get(name):
            users = ", ".join(sorted(mounted[name]))
            decisions.append(
                VolumeDecision(name, None, f"volume {name} is kept: still mounted by {users}", volume.id)
            )
        else:
            decisions.append(
                VolumeDecision(name, "delete", f"deleting volume {name} (declared absent)", volume.id)
            )
    return decisions


def sync_volumes(
    db: Database,
    provider: SandboxProvider,
    leases: Sequence[LeaseView],
    statuses: Mapping[str, StatusView],
    *,
    controller_id: str,
    pass_id: str,
    fence: Callable[[], None] | None = None,
) -> list[VolumeDecision]:
    """Create and delete declared volumes as :func:`plan_volumes` says; return the decisions. A
    failed call is logged and written as an event; the next pass tries again."""
    with db.session(readonly=True) as session:
        declared = dict(session.execute(sa.select(Volume.name, Volume.desired_state)).tuples().all())
    if not declared:
        return []
    decisions = plan_volumes(declared, provider.list_volumes(), mounted_volumes(leases, statuses))
    events: list[Event] = []
    for decision in decisions:
        if decision.kind is None:
            log.debug("%s", decision.reason)
            continue
        try:
            if fence is not None:
                fence()
            if decision.kind == "create":
                created = provider.create_volume(decision.name)
                outcome, message = "ok", f"created volume {decision.name} ({created.id}), {created.state}"
            else:
                assert decision.volume_id is not None
                provider.delete_volume(decision.volume_id)
                outcome, message = "ok", f"deleted volume {decision.name} ({decision.volume_id})"
        except ProviderError as exc:
            outcome, message = "error", f"{decision.reason} failed: {exc}"
            log.warning("%s", message)
        else:
            log.info("%s", message)
        events.append(
            Event(
                at=utcnow(),
                lease_name=None,
                action=f"volume_{decision.kind}",
                outcome=outcome,
                message=message,
                controller_id=controller_id,
                pass_id=pass_id,
            )
        )
    if events:
        with db.session() as session:
            session.add_all(events)
    return decisions
