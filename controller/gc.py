"""Garbage collection: orphaned sandboxes, stale rows and retention. Called by ``leasectl gc`` and by
the daemon every ``controller.gc_interval_seconds`` (leader only, with its elector).

Owns the ``orphan_sightings`` table (the grace clock) and the deletion of rows nobody needs any more;
never writes an operator column except when purging ``absent`` leases, which is off by default.

Orphans
    A sandbox is an orphan iff it carries ``leasectl-instance=<this instance>`` and either has no
    ``leasectl-lease`` label or names a lease that has no row in ``leases`` (e.g. deleted with SQL).
    Sandboxes without the instance label, or with another instance's, are never selected, listed or
    changed. Duplicates of an existing lease are the planner's business, not GC's.

    :func:`find_orphans` is the pure decision: observed sandboxes + lease names + the sightings
    recorded so far + ``now`` -> an :class:`OrphanReport`. An orphan becomes deletable once it has
    been one for ``grace_seconds``, counted from when the controller first saw it orphaned (a row in
    ``orphan_sightings``, so a restart does not reset the clock), and never from before the sandbox
    was created: deletable iff ``now - max(first_seen, created_at) >= grace``.

    :func:`collect_garbage` is the effectful pass: ONE ``list_sandboxes`` call, then the database
    reads (sandboxes are listed *before* the lease names are read, so a sandbox created for a lease
    inserted meanwhile cannot look orphaned), the finder, and (unless ``dry_run``) the writes:
    sightings, then per deletable orphan one ``provider.get`` by id, one ``provider.delete`` and one
    ``events`` row (action ``gc-delete``), then stale-row cleanup and retention.

    The list is eventually consistent and has been seen to flap (absent, then present again) and to
    show stale state, so it never decides a deletion alone: the ``get`` just before the delete must
    confirm that the sandbox still exists, still carries this instance's label and is still an
    orphan (its lease label names no lease), and is not already being destroyed; otherwise it is not
    deleted. A sighting whose sandbox is missing from one list is dropped, so a sandbox that flaps
    absent -> present starts its grace clock again.

    Labels are outside data: a ``leasectl-lease`` label is bounded (:func:`bounded`, a readable prefix
    and a digest) before it reaches a column or an event, so a long or odd label cannot fail a write.

Stale rows
    ``lease_status`` rows of leases that no longer exist are removed once no observed sandbox carries
    their lease label or their recorded sandbox id/name. Leases with desired state ``absent`` in
    phase ``Deleted`` whose sandbox is gone are purged (lease and status rows) once they have been
    so for ``controller.deleted_lease_retention_days``, when that is set.

Retention
    ``events`` older than ``event_retention_days`` and terminal ``executions`` older than
    ``execution_retention_days`` (by ``finished_at``, else ``created_at``) are deleted in transactions
    of at most ``retention_batch_size`` rows each, so no single statement locks a large table.

Fencing: with an elector, every writing transaction calls ``elector.fence(session)`` and every
sandbox deletion is preceded by a leadership check, so a deposed leader writes and deletes nothing
(``NotLeaderError`` propagates). A dry run writes nothing and needs no leadership.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from controller import logs
from controller.config import Settings
from controller.db import Database
from controller.errors import NotFoundError, NotLeaderError, ProviderError, RateLimitedError
from controller.providers.base import (
    LABEL_INSTANCE,
    LABEL_LEASE,
    STATE_DESTROYED,
    STATE_DESTROYING,
    ObservedSandbox,
    SandboxProvider,
)
from models import EXECUTION_TERMINAL_STATES, Event, Execution, Lease, LeaseStatus, OrphanSighting, utcnow

if TYPE_CHECKING:
    from controller.leader import LeaderElector

log = logging.getLogger(__name__)

GC_DELETE_ACTION = "gc-delete"
LABEL_COLUMN_CHARS = 63  # orphan_sightings.lease_label, events.lease_name
NAME_COLUMN_CHARS = 128  # orphan_sightings.sandbox_name
DELETED_PHASE = "Deleted"

OrphanStatus = Literal["deletable", "in_grace", "deleting"]


# -- the pure orphan finder -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sighting:
    """One row of ``orphan_sightings``: when a sandbox was first (and last) seen orphaned."""

    sandbox_id: str
    sandbox_name: str | None
    lease_label: str | None
    reason: str
    first_seen_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True)
class Orphan:
    """An orphaned sandbox of this instance and where its grace clock stands.

    ``orphaned_seconds`` counts from ``max(first_seen_at, created_at)`` (negative if a clock is
    ahead); ``remaining_seconds`` is how long until it may be deleted (0 when deletable).
    ``status`` is ``deletable``, ``in_grace``, or ``deleting`` (already being destroyed: left alone).
    """

    sandbox: ObservedSandbox
    reason: str
    first_seen_at: datetime
    orphaned_seconds: float
    remaining_seconds: float
    status: OrphanStatus

    @property
    def deletable(self) -> bool:
        return self.status == "deletable"

    @property
    def lease_label(self) -> str | None:
        return self.sandbox.labels.get(LABEL_LEASE)


@dataclass(frozen=True)
class OrphanReport:
    """What :func:`find_orphans` decided.

    ``orphans``        every orphan of this instance (sorted by sandbox id), deletable or not;
    ``sightings``      the sighting every orphan should have after this pass (new ones start at
                       ``now``; known ones keep ``first_seen_at`` and get ``last_seen_at = now``);
    ``new_sightings``  the subset of ``sightings`` that were not recorded before;
    ``dropped``        ids of recorded sightings whose sandbox is gone or no longer orphaned.
    """

    orphans: tuple[Orphan, ...]
    sightings: tuple[Sighting, ...]
    new_sightings: tuple[Sighting, ...]
    dropped: tuple[str, ...]

    @property
    def deletable(self) -> tuple[Orphan, ...]:
        return tuple(o for o in self.orphans if o.status == "deletable")

    @property
    def in_grace(self) -> tuple[Orphan, ...]:
        return tuple(o for o in self.orphans if o.status == "in_grace")


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def bounded(value: str | None, limit: int = LABEL_COLUMN_CHARS) -> str | None:
    """``value`` if it fits ``limit`` characters, else a readable prefix, ``~`` and a 16-hex digest of
    the whole value (so two long labels stay apart); never longer than ``limit``."""
    if value is None or len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{value[: limit - len(digest) - 1]}~{digest}"


def orphan_reason(sandbox: ObservedSandbox, lease_names: AbstractSet[str], *, instance: str) -> str | None:
    """Why ``sandbox`` is an orphan of ``instance``, or None if it is not one (or not ours at all)."""
    if sandbox.labels.get(LABEL_INSTANCE) != instance:
        return None
    lease = sandbox.labels.get(LABEL_LEASE)
    if lease is None:
        return f"no {LABEL_LEASE} label"
    if lease not in lease_names:
        return f"lease {bounded(lease)!r} does not exist"
    return None


def find_orphans(
    observed: Sequence[ObservedSandbox],
    lease_names: AbstractSet[str],
    sightings: Mapping[str, Sighting],
    now: datetime,
    *,
    instance: str,
    grace_seconds: float,
) -> OrphanReport:
    """Select this instance's orphans and decide which may be deleted now. Pure: no I/O, no clock."""
    now = _aware(now)
    orphans: list[Orphan] = []
    current: list[Sighting] = []
    new: list[Sighting] = []
    kept_ids: set[str] = set()
    seen_ids: set[str] = set()
    for sandbox in sorted(observed, key=lambda s: s.id):
        if sandbox.id in seen_ids or sandbox.state == STATE_DESTROYED:
            continue  # a list may repeat an item across pages; destroyed ones are gone
        seen_ids.add(sandbox.id)
        reason = orphan_reason(sandbox, lease_names, instance=instance)
        if reason is None:
            continue
        known = sightings.get(sandbox.id)
        if known is None:
            sighting = Sighting(
                sandbox.id,
                bounded(sandbox.name, NAME_COLUMN_CHARS),
                bounded(sandbox.lease_name),
                reason,
                now,
                now,
            )
            new.append(sighting)
        else:
            sighting = replace(
                known,
                sandbox_name=bounded(sandbox.name, NAME_COLUMN_CHARS),
                lease_label=bounded(sandbox.lease_name),
                reason=reason,
                last_seen_at=now,
            )
        current.append(sighting)
        kept_ids.add(sandbox.id)
        start = _aware(sighting.first_seen_at)
        if sandbox.created_at is not None:
            start = max(start, _aware(sandbox.created_at))
        orphaned = (now - start).total_seconds()
        remaining = max(0.0, grace_seconds - orphaned)
        status: OrphanStatus
        if sandbox.state == STATE_DESTROYING:
            status = "deleting"
        elif orphaned >= grace_seconds:
            status = "deletable"
        else:
            status = "in_grace"
        orphans.append(Orphan(sandbox, reason, sighting.first_seen_at, orphaned, remaining, status))
    dropped = tuple(sorted(set(sightings) - kept_ids))
    return OrphanReport(tuple(orphans), tuple(current), tuple(new), dropped)


def apply_sightings(sightings: Mapping[str, Sighting], report: OrphanReport) -> dict[str, Sighting]:
    """The sightings after ``report`` was recorded (what the database holds after a non-dry pass)."""
    result = {k: v for k, v in sightings.items() if k not in set(report.dropped)}
    result.update((s.sandbox_id, s) for s in report.sightings)
    return result


# -- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deletion:
    """One attempted orphan deletion; ``error`` is None when the provider accepted it."""

    orphan: Orphan
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class CleanupCounts:
    """Rows removed (or, in a dry run, that would be removed)."""

    stale_status_rows: int = 0
    purged_leases: int = 0
    events: int = 0
    executions: int = 0


@dataclass(frozen=True)
class GcResult:
    """The outcome of one :func:`collect_garbage` run.

    ``deleted`` holds the orphans whose deletion the provider accepted (empty in a dry run);
    ``failed`` the attempts that failed; ``skipped`` deletable orphans not attempted (rate limited).
    In a dry run ``report.deletable`` is what would be deleted and ``cleanup`` counts what would go.
    """

    run_id: str
    dry_run: bool
    grace_seconds: float
    report: OrphanReport
    deleted: tuple[Orphan, ...] = ()
    failed: tuple[Deletion, ...] = ()
    skipped: tuple[Orphan, ...] = ()
    cleanup: CleanupCounts = CleanupCounts()

    @property
    def would_delete(self) -> tuple[Orphan, ...]:
        return self.report.deletable


# -- database reads ------------------------------------------------------------------------------


def _row_to_sighting(row: OrphanSighting) -> Sighting:
    return Sighting(
        sandbox_id=row.sandbox_id,
        sandbox_name=row.sandbox_name,
        lease_label=row.lease_label,
        reason=row.reason or "",
        first_seen_at=row.first_seen_at,
        last_seen_at=row.last_seen_at,
    )


def read_sightings(session: Session) -> dict[str, Sighting]:
    return {row.sandbox_id: _row_to_sighting(row) for row in session.scalars(sa.select(OrphanSighting))}


def read_lease_names(session: Session) -> set[str]:
    return set(session.scalars(sa.select(Lease.name)))


# -- the effectful pass ----------------------------------------------------------------------------


@contextmanager
def _writing(db: Database, elector: LeaderElector | None) -> Iterator[Session]:
    """A write transaction, fenced by ``elector`` when one is given."""
    with db.session() as session:
        if elector is not None:
            elector.fence(session)
        yield session


def _check_leader(elector: LeaderElector | None) -> None:
    if elector is not None and not elector.is_leader():
        raise NotLeaderError(f"not the leader of instance {elector.instance}; GC refused")


def _rowcount(result: Any) -> int:
    return int(cast("CursorResult[Any]", result).rowcount or 0)


def collect_garbage(
    db: Database,
    provider: SandboxProvider,
    settings: Settings,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    elector: LeaderElector | None = None,
    grace_seconds: float | None = None,
    clock: Callable[[], datetime] = utcnow,
    controller_id: str | None = None,
) -> GcResult:
    """One GC run: orphans, stale rows, retention. ``now`` defaults to ``clock()``; ``grace_seconds``
    overrides ``controller.orphan_grace_seconds``. Raises NotLeaderError (before or between writes)
    when ``elector`` no longer leads; provider errors of the list call propagate, per-sandbox delete
    errors are recorded in ``failed`` and as events.
    """
    c = settings.controller
    instance = c.instance
    grace = c.orphan_grace_seconds if grace_seconds is None else grace_seconds
    when = _aware(now) if now is not None else clock()
    run_id = uuid.uuid4().hex[:12]
    who = controller_id or (elector.holder if elector is not None else f"gc-{run_id}")
    with logs.bound(pass_id=run_id):
        if not dry_run:
            _check_leader(elector)
        # List first, then read the lease names: see the module docstring.
        observed = provider.list_sandboxes({LABEL_INSTANCE: instance})
        with db.session() as session:
            lease_names = read_lease_names(session)
            known = read_sightings(session)
        report = find_orphans(observed, lease_names, known, when, instance=instance, grace_seconds=grace)
        for orphan in report.orphans:
            log.debug(
                "orphan %s (%s): %s; %s, orphaned %.0fs",
                orphan.sandbox.id,
                orphan.sandbox.name,
                orphan.reason,
                orphan.status,
                orphan.orphaned_seconds,
            )
        if dry_run:
            cleanup = _count_cleanup(db, settings, observed, when)
            return GcResult(run_id, True, grace, report, cleanup=cleanup)

        _record_sightings(db, elector, report)
        deleted, failed, skipped = _delete_orphans(db, elector, provider, report, when, who, run_id, instance)
        gone = {o.sandbox.id for o in deleted}
        still_there = [s for s in observed if s.id not in gone and s.state != STATE_DESTROYED]
        stale = remove_stale_status_rows(db, still_there, elector=elector)
        purged = purge_deleted_leases(db, settings, still_there, when, elector=elector)
        events, executions = apply_retention(db, settings, when, elector=elector)
        cleanup = CleanupCounts(stale, purged, events, executions)
        log.info(
            "gc done: %d orphan(s), %d deleted, %d failed, %d in grace; removed %d stale status row(s), "
            "%d purged lease(s), %d event(s), %d execution(s)",
            len(report.orphans),
            len(deleted),
            len(failed),
            len(report.in_grace),
            stale,
            purged,
            events,
            executions,
        )
        return GcResult(run_id, False, grace, report, tuple(deleted), tuple(failed), tuple(skipped), cleanup)


def _record_sightings(db: Database, elector: LeaderElector | None, report: OrphanReport) -> None:
    if not report.sightings and not report.dropped:
        return
    with _writing(db, elector) as session:
        if report.dropped:
            session.execute(
                sa.delete(OrphanSighting).where(OrphanSighting.sandbox_id.in_(report.dropped)),
                execution_options={"synchronize_session": False},
            )
        rows = {
            row.sandbox_id: row
            for row in session.scalars(
                sa.select(OrphanSighting).where(
                    OrphanSighting.sandbox_id.in_([s.sandbox_id for s in report.sightings])
                )
            )
        }
        for s in report.sightings:
            row = rows.get(s.sandbox_id)
            if row is None:
                session.add(
                    OrphanSighting(
                        sandbox_id=s.sandbox_id,
                        sandbox_name=s.sandbox_name,
                        lease_label=s.lease_label,
                        reason=s.reason,
                        first_seen_at=s.first_seen_at,
                        last_seen_at=s.last_seen_at,
                    )
                )
            else:  # keep the first sighting the database holds (another run may have written it)
                row.sandbox_name = s.sandbox_name
                row.lease_label = s.lease_label
                row.reason = s.reason
                row.last_seen_at = s.last_seen_at


def _lease_exists(db: Database, label: str | None) -> bool:
    if label is None:
        return False
    if len(label) > LABEL_COLUMN_CHARS:
        return False  # no lease name is that long; do not send it to the database
    with db.session() as session:
        return session.scalar(sa.select(Lease.id).where(Lease.name == label)) is not None


def _confirm(db: Database, provider: SandboxProvider, orphan: Orphan, instance: str) -> str | None:
    """Just before deleting: one ``get`` by id. None if the sandbox is still there, still ours and
    still an orphan; otherwise why it must not be deleted. The list may be stale; the get is not."""
    sandbox_id = orphan.sandbox.id
    current = provider.get(sandbox_id)
    if current is None or current.state == STATE_DESTROYED:
        return "gone by id (the list was stale)"
    if current.id != sandbox_id:
        return f"the id resolves to another sandbox ({current.id})"
    if current.labels.get(LABEL_INSTANCE) != instance:
        return "no longer carries this instance's label"
    if current.state == STATE_DESTROYING:
        return "already being destroyed"
    if _lease_exists(db, current.labels.get(LABEL_LEASE)):
        return f"wanted again (lease {bounded(current.labels.get(LABEL_LEASE))!r} exists)"
    return None


def _delete_orphans(
    db: Database,
    elector: LeaderElector | None,
    provider: SandboxProvider,
    report: OrphanReport,
    now: datetime,
    controller_id: str,
    run_id: str,
    instance: str,
) -> tuple[list[Orphan], list[Deletion], list[Orphan]]:
    deleted: list[Orphan] = []
    failed: list[Deletion] = []
    skipped: list[Orphan] = []
    pending = list(report.deletable)
    while pending:
        orphan = pending.pop(0)
        sandbox = orphan.sandbox
        error: str | None = None
        rate_limited = False
        why_not: str | None = None
        try:
            why_not = _confirm(db, provider, orphan, instance)
        except RateLimitedError as exc:
            error, rate_limited = f"{type(exc).__name__}: {exc}", True
        except ProviderError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if why_not is not None:
            log.info("gc: orphan sandbox %s (%s) not deleted: %s", sandbox.id, sandbox.name, why_not)
            _forget_sighting(db, elector, sandbox.id)
            continue
        _check_leader(elector)
        try:
            if error is None:
                provider.delete(sandbox.id)  # an already-gone sandbox is not an error
        except NotFoundError:
            pass  # already gone: that is what we wanted
        except RateLimitedError as exc:
            error, rate_limited = f"{type(exc).__name__}: {exc}", True
        except ProviderError as exc:
            error = f"{type(exc).__name__}: {exc}"
        why = f"{orphan.reason}; orphaned {orphan.orphaned_seconds:.0f}s"
        message = (
            f"deleted orphan sandbox {sandbox.name} ({why})"
            if error is None
            else f"could not delete orphan sandbox {sandbox.name} ({why}): {error}"
        )
        with _writing(db, elector) as session:
            session.add(
                Event(
                    at=now,
                    lease_name=bounded(orphan.lease_label),
                    sandbox_id=sandbox.id,
                    action=GC_DELETE_ACTION,
                    outcome="ok" if error is None else "error",
                    message=message,
                    controller_id=controller_id,
                    pass_id=run_id,
                )
            )
            if error is None:
                session.execute(
                    sa.delete(OrphanSighting).where(OrphanSighting.sandbox_id == sandbox.id),
                    execution_options={"synchronize_session": False},
                )
        if error is None:
            log.info("gc: %s", message)
            deleted.append(orphan)
        else:
            log.warning("gc: %s", message)
            failed.append(Deletion(orphan, error))
            if rate_limited:
                skipped.extend(pending)
                break
    return deleted, failed, skipped


def _forget_sighting(db: Database, elector: LeaderElector | None, sandbox_id: str) -> None:
    """A sandbox the get did not confirm as an orphan: its grace clock starts again if it comes back."""
    with _writing(db, elector) as session:
        session.execute(
            sa.delete(OrphanSighting).where(OrphanSighting.sandbox_id == sandbox_id),
            execution_options={"synchronize_session": False},
        )


# -- stale rows ------------------------------------------------------------------------------------


def _present(observed: Iterable[ObservedSandbox]) -> tuple[set[str], set[str], set[str]]:
    """Lease labels, ids and names of the sandboxes that still exist."""
    labels: set[str] = set()
    ids: set[str] = set()
    names: set[str] = set()
    for s in observed:
        if s.state == STATE_DESTROYED:
            continue
        ids.add(s.id)
        names.add(s.name)
        if s.lease_name is not None:
            labels.add(s.lease_name)
    return labels, ids, names


def _stale_status_candidates(session: Session, observed: Sequence[ObservedSandbox]) -> list[str]:
    labels, ids, names = _present(observed)
    rows = session.execute(
        sa.select(
            LeaseStatus.lease_name,
            LeaseStatus.sandbox_id,
            LeaseStatus.sandbox_name,
            LeaseStatus.create_attempt_name,
        ).where(LeaseStatus.lease_name.not_in(sa.select(Lease.name)))
    ).all()
    return [
        name
        for name, sandbox_id, sandbox_name, attempt in rows
        if name not in labels
        and (sandbox_id is None or sandbox_id not in ids)
        and (sandbox_name is None or sandbox_name not in names)
        and (attempt is None or attempt not in names)
    ]


def remove_stale_status_rows(
    db: Database, observed: Sequence[ObservedSandbox], *, elector: LeaderElector | None = None
) -> int:
    """Delete status rows of leases that no longer exist and whose sandbox is gone; return how many."""
    with _writing(db, elector) as session:
        names = _stale_status_candidates(session, observed)
        if not names:
            return 0
        result = session.execute(
            sa.delete(LeaseStatus)
            .where(LeaseStatus.lease_name.in_(names))
            .where(LeaseStatus.lease_name.not_in(sa.select(Lease.name))),
            execution_options={"synchronize_session": False},
        )
        count = _rowcount(result)
    if count:
        log.info("gc: removed %d status row(s) of deleted leases: %s", count, ", ".join(sorted(names)))
    return count


def _purge_candidates(
    session: Session, settings: Settings, observed: Sequence[ObservedSandbox], now: datetime
) -> list[str]:
    days = settings.controller.deleted_lease_retention_days
    if days is None:
        return []
    cutoff = now - timedelta(days=days)
    labels, ids, _ = _present(observed)
    rows = session.execute(
        sa.select(Lease.name, LeaseStatus.sandbox_id)
        .join(LeaseStatus, LeaseStatus.lease_name == Lease.name)
        .where(Lease.desired_state == "absent")
        .where(LeaseStatus.phase == DELETED_PHASE)
        .where(LeaseStatus.updated_at <= cutoff)
        .where(Lease.updated_at <= cutoff)
    ).all()
    return [
        name
        for name, sandbox_id in rows
        if name not in labels and (sandbox_id is None or sandbox_id not in ids)
    ]


def purge_deleted_leases(
    db: Database,
    settings: Settings,
    observed: Sequence[ObservedSandbox],
    now: datetime,
    *,
    elector: LeaderElector | None = None,
) -> int:
    """Purge ``absent`` leases that have been ``Deleted`` for the retention (if set); return how many."""
    if settings.controller.deleted_lease_retention_days is None:
        return 0
    with _writing(db, elector) as session:
        names = _purge_candidates(session, settings, observed, now)
        if not names:
            return 0
        result = session.execute(
            sa.delete(Lease).where(Lease.name.in_(names)).where(Lease.desired_state == "absent"),
            execution_options={"synchronize_session": False},
        )
        count = _rowcount(result)
        session.execute(
            sa.delete(LeaseStatus)
            .where(LeaseStatus.lease_name.in_(names))
            .where(LeaseStatus.lease_name.not_in(sa.select(Lease.name))),
            execution_options={"synchronize_session": False},
        )
    if count:
        log.info("gc: purged %d deleted lease(s): %s", count, ", ".join(sorted(names)))
    return count


# -- retention -------------------------------------------------------------------------------------


def _old_events(cutoff: datetime) -> sa.Select[tuple[int]]:
    return sa.select(Event.id).where(Event.at < cutoff)


def _old_executions(cutoff: datetime) -> sa.Select[tuple[int]]:
    return (
        sa.select(Execution.id)
        .where(Execution.state.in_(EXECUTION_TERMINAL_STATES))
        .where(sa.func.coalesce(Execution.finished_at, Execution.created_at) < cutoff)
    )


def _delete_in_batches(
    db: Database,
    elector: LeaderElector | None,
    table: type[Event] | type[Execution],
    ids: sa.Select[tuple[int]],
    batch: int,
) -> int:
    total = 0
    while True:
        with _writing(db, elector) as session:
            chosen = ids.order_by(table.id).limit(batch).scalar_subquery()
            result = session.execute(
                sa.delete(table).where(table.id.in_(chosen)),
                execution_options={"synchronize_session": False},
            )
            count = _rowcount(result)
        total += count
        if count < batch:
            return total


def _cutoffs(settings: Settings, now: datetime) -> tuple[datetime, datetime]:
    c = settings.controller
    return now - timedelta(days=c.event_retention_days), now - timedelta(days=c.execution_retention_days)


def apply_retention(
    db: Database, settings: Settings, now: datetime, *, elector: LeaderElector | None = None
) -> tuple[int, int]:
    """Delete old events and old finished executions in bounded batches; return both counts."""
    events_cutoff, executions_cutoff = _cutoffs(settings, now)
    batch = settings.controller.retention_batch_size
    events = _delete_in_batches(db, elector, Event, _old_events(events_cutoff), batch)
    executions = _delete_in_batches(db, elector, Execution, _old_executions(executions_cutoff), batch)
    if events or executions:
        log.info("gc: retention removed %d event(s) and %d execution(s)", events, executions)
    return events, executions


def _count_cleanup(
    db: Database, settings: Settings, observed: Sequence[ObservedSandbox], now: datetime
) -> CleanupCounts:
    """What a real run would remove (read-only, for dry runs)."""
    events_cutoff, executions_cutoff = _cutoffs(settings, now)
    with db.session() as session:
        stale = len(_stale_status_candidates(session, observed))
        purged = len(_purge_candidates(session, settings, observed, now))
        events = session.scalar(sa.select(sa.func.count()).select_from(_old_events(events_cutoff).subquery()))
        executions = session.scalar(
            sa.select(sa.func.count()).select_from(_old_executions(executions_cutoff).subquery())
        )
    return CleanupCounts(stale, purged, int(events or 0), int(executions or 0))
