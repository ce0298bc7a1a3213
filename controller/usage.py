"""Usage: what each sandbox was observed doing, kept as segments, and the report a team is billed from.

Owns the ``usage`` table's rules: :func:`step` (pure) turns the open segments and one pass's
observations into the rows to extend, close and open; :func:`record` runs it against the database
(called by ``controller.reconciler`` after each pass); :func:`report` (pure) adds segments up per
lease or per label value for ``leasectl usage``.

Rules (issue 16): usage is recorded from what is observed, never estimated from desired state.

* A segment is one sandbox in one observed state with one set of resources (what the API reports,
  else the lease's, else Daytona's defaults), from the pass that first saw it so to the pass that saw
  it change (or vanish). A pass that sees the same thing again only moves ``ended_at``: the table
  grows by one row per change of state, not per pass, so it stays small without a separate
  compaction job.
* A pass more than ``usage_max_gap_seconds`` after the last one (the controller was down) does not
  bill the gap: the old segment ends when it was last seen and a new one starts now.
* In the report, a sandbox *runs* in every state but ``stopped``, ``archived``, ``archiving``,
  ``paused``, ``error``, ``build_failed``, ``destroying`` and ``destroyed`` (as for quotas):
  sandbox-hours, CPU-hours, GiB-hours of memory and GPU-hours count running time; GiB-hours of disk
  count every state but ``archived`` and ``destroyed`` (archived sandboxes hold no disk quota).
  Segments are clipped to ``[since, until)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from controller.planner import LeaseView
from controller.providers.base import LABEL_LEASE, RESERVED_LABEL_PREFIX, ObservedSandbox
from controller.quotas import resources_of, runs

NO_DISK: Final = frozenset({"archived", "destroyed"})
NONE_GROUP: Final = "(none)"
_ID_CHUNK: Final = 500  # ids per UPDATE when segments are closed
_INSERT_CHUNK: Final = 1000  # new segments per INSERT (a first pass over 100,000 sandboxes opens all)


class Observation(NamedTuple):
    """One sandbox as one pass saw it (a tuple: a pass builds one per sandbox)."""

    sandbox_id: str
    lease_name: str
    state: str
    cpu: int
    memory: int
    disk: int
    gpu: int
    sandbox_labels: Mapping[str, str]  # every label, reserved ones included: see :meth:`labels`

    def labels(self) -> dict[str, str]:
        """The labels a segment keeps: the sandbox's own, without leasectl's."""
        return {k: v for k, v in self.sandbox_labels.items() if not k.startswith(RESERVED_LABEL_PREFIX)}


class OpenSegment(NamedTuple):
    """An open segment as :func:`step` compares it; ``fresh``: it ended within the allowed gap."""

    id: int
    sandbox_id: str | None
    state: str
    cpu: int
    memory: int
    disk: int
    gpu: int
    fresh: bool


@dataclass(frozen=True)
class Segment:
    lease_name: str
    sandbox_id: str | None
    state: str
    labels: Mapping[str, str]
    cpu: int
    memory: int
    disk: int
    gpu: int
    started_at: datetime
    ended_at: datetime
    id: int | None = None

    def hours(self, since: datetime | None, until: datetime | None) -> float:
        start = max(self.started_at, since) if since is not None else self.started_at
        end = min(self.ended_at, until) if until is not None else self.ended_at
        return max((end - start).total_seconds(), 0.0) / 3600


def observe(observed: Sequence[ObservedSandbox], leases: Mapping[str, LeaseView]) -> list[Observation]:
    """What this pass saw of every sandbox that carries a lease label (a lease's or an orphan's)."""
    found = []
    for sb in observed:
        lease_name = sb.labels.get(LABEL_LEASE)
        if lease_name is None or sb.state == "destroyed":
            continue
        cpu, memory, disk, gpu = sb.cpu, sb.memory, sb.disk, sb.gpu
        if cpu is None or memory is None or disk is None or gpu is None:  # the lease's, else defaults
            held = resources_of(sb, leases.get(lease_name))
            cpu, memory, disk, gpu = held.cpu, held.memory, held.disk, held.gpu
        found.append(Observation(sb.id, lease_name, sb.state, cpu, memory, disk, gpu, sb.labels))
    return found


@dataclass
class Changes:
    extend: list[int] = field(default_factory=list)  # open segment ids whose ended_at becomes now
    close_now: list[int] = field(default_factory=list)  # ended_at = now, closed
    close_as_is: list[int] = field(default_factory=list)  # closed where they were last seen (a gap)
    open: list[Observation] = field(default_factory=list)  # a new segment each, from now


def step(open_segments: Iterable[OpenSegment], seen: Iterable[Observation]) -> Changes:
    """What one pass changes in the usage table (pure)."""
    changes = Changes()
    by_sandbox = {seg.sandbox_id: seg for seg in open_segments}
    for obs in seen:
        seg = by_sandbox.pop(obs.sandbox_id, None)
        if seg is not None:
            if seg.fresh and obs[2:7] == seg[2:7]:  # state and resources unchanged
                changes.extend.append(seg.id)
                continue
            (changes.close_now if seg.fresh else changes.close_as_is).append(seg.id)
        changes.open.append(obs)
    for seg in by_sandbox.values():  # not seen any more: gone
        (changes.close_now if seg.fresh else changes.close_as_is).append(seg.id)
    return changes


def record(
    session: Session,
    observed: Sequence[ObservedSandbox],
    leases: Mapping[str, LeaseView],
    now: datetime,
    max_gap: timedelta,
) -> Changes:
    """Append what one pass observed: one SELECT of the open segments and, when nothing changes,
    one UPDATE, the same count for any fleet (tests/integration/test_pass_cost.py counts them);
    changes add chunked writes (so a first pass over a large fleet never holds every new row). The
    open segments are read as plain tuples of the columns :func:`step` compares, and whether each is
    still within ``max_gap`` is answered by the database: no labels decoded and no timestamp parsed
    per sandbox on a pass that changes nothing."""
    from models import Usage

    table = Usage.__table__
    columns = [table.c[name] for name in OpenSegment._fields[:-1]]
    query = sa.select(*columns, (table.c.ended_at >= now - max_gap).label("fresh"))
    read = 0

    def open_segments() -> Iterator[OpenSegment]:  # streamed: no list of every row at once
        nonlocal read
        for row in session.execute(query.where(table.c.closed.is_(False))):
            read += 1
            yield OpenSegment._make(row)

    changes = step(open_segments(), observe(observed, leases))
    # Every open segment read above is extended or closed: close first (ids in chunks, so a mass
    # change never exceeds SQLite's bound-variable limit), then extend what is still open with no id
    # list at all (a fleet of 100,000 would be 100,000 variables), then open the new segments.
    for start in range(0, len(changes.close_now), _ID_CHUNK):
        ids = changes.close_now[start : start + _ID_CHUNK]
        session.execute(sa.update(Usage).where(Usage.id.in_(ids)).values(ended_at=now, closed=True))
    for start in range(0, len(changes.close_as_is), _ID_CHUNK):
        ids = changes.close_as_is[start : start + _ID_CHUNK]
        session.execute(sa.update(Usage).where(Usage.id.in_(ids)).values(closed=True))
    if changes.extend and len(changes.extend) + len(changes.close_now) + len(changes.close_as_is) == read:
        session.execute(sa.update(Usage).where(Usage.closed.is_(False)).values(ended_at=now))
    else:  # an open segment left alone (two open for one sandbox, written by hand): by id
        for start in range(0, len(changes.extend), _ID_CHUNK):
            ids = changes.extend[start : start + _ID_CHUNK]
            session.execute(sa.update(Usage).where(Usage.id.in_(ids)).values(ended_at=now))
    for start in range(0, len(changes.open), _INSERT_CHUNK):  # rows built a chunk at a time
        session.execute(
            sa.insert(Usage),
            [
                {
                    "lease_name": obs.lease_name,
                    "sandbox_id": obs.sandbox_id,
                    "state": obs.state,
                    "labels": obs.labels(),
                    "cpu": obs.cpu,
                    "memory": obs.memory,
                    "disk": obs.disk,
                    "gpu": obs.gpu,
                    "started_at": now,
                    "ended_at": now,
                    "closed": False,
                }
                for obs in changes.open[start : start + _INSERT_CHUNK]
            ],
        )
    return changes


def _segment(row: Any) -> Segment:
    return Segment(
        lease_name=row.lease_name,
        sandbox_id=row.sandbox_id,
        state=row.state,
        labels=dict(row.labels or {}),
        cpu=row.cpu,
        memory=row.memory,
        disk=row.disk,
        gpu=row.gpu,
        started_at=row.started_at,
        ended_at=row.ended_at,
        id=row.id,
    )


def load_segments(session: Session, since: datetime | None, until: datetime | None) -> list[Segment]:
    from models import Usage

    query = sa.select(Usage).order_by(Usage.id)
    if since is not None:
        query = query.where(Usage.ended_at > since)
    if until is not None:
        query = query.where(Usage.started_at < until)
    return [_segment(row) for row in session.scalars(query)]


# -- the report -------------------------------------------------------------------------------------

PRICE_KEYS: Final = ("sandbox_hour", "cpu_hour", "memory_gib_hour", "disk_gib_hour", "gpu_hour")


@dataclass
class UsageLine:
    group: str
    sandbox_hours: float = 0.0
    cpu_hours: float = 0.0
    memory_gib_hours: float = 0.0
    disk_gib_hours: float = 0.0
    gpu_hours: float = 0.0
    cost: float | None = None

    def as_dict(self, digits: int = 4) -> dict[str, Any]:
        data: dict[str, Any] = {
            "group": self.group,
            "sandbox_hours": round(self.sandbox_hours, digits),
            "cpu_hours": round(self.cpu_hours, digits),
            "memory_gib_hours": round(self.memory_gib_hours, digits),
            "disk_gib_hours": round(self.disk_gib_hours, digits),
            "gpu_hours": round(self.gpu_hours, digits),
        }
        if self.cost is not None:
            data["cost"] = round(self.cost, digits)
        return data


def report(
    segments: Iterable[Segment],
    *,
    by: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    prices: Mapping[str, float] | None = None,
) -> list[UsageLine]:
    """Totals per lease (``by`` None) or per value of label ``by`` (leases without it: ``(none)``),
    ordered by group, with a ``TOTAL`` line last; ``cost`` when ``prices`` are given."""
    lines: dict[str, UsageLine] = {}
    for seg in segments:
        group = seg.lease_name if by is None else seg.labels.get(by, NONE_GROUP)
        line = lines.setdefault(group, UsageLine(group))
        hours = seg.hours(since, until)
        if runs(seg.state):
            line.sandbox_hours += hours
            line.cpu_hours += seg.cpu * hours
            line.memory_gib_hours += seg.memory * hours
            line.gpu_hours += seg.gpu * hours
        if seg.state not in NO_DISK:
            line.disk_gib_hours += seg.disk * hours
    ordered = [lines[k] for k in sorted(lines)]
    total = UsageLine("TOTAL")
    for line in ordered:
        for key in ("sandbox_hours", "cpu_hours", "memory_gib_hours", "disk_gib_hours", "gpu_hours"):
            setattr(total, key, getattr(total, key) + getattr(line, key))
    ordered.append(total)
    if prices:
        for line in ordered:
            line.cost = (
                line.sandbox_hours * prices.get("sandbox_hour", 0.0)
                + line.cpu_hours * prices.get("cpu_hour", 0.0)
                + line.memory_gib_hours * prices.get("memory_gib_hour", 0.0)
                + line.disk_gib_hours * prices.get("disk_gib_hour", 0.0)
                + line.gpu_hours * prices.get("gpu_hour", 0.0)
            )
    return ordered


def open_since(session: Session, state: str) -> dict[str, datetime]:
    """Sandbox id -> since when it has been in ``state``, for sandboxes whose open segment is in it
    (one that just changed state has an open segment in the old state until this pass records it)."""
    from models import Usage

    query = sa.select(Usage.sandbox_id, Usage.started_at).where(Usage.closed.is_(False), Usage.state == state)
    return {sandbox_id: started for sandbox_id, started in session.execute(query) if sandbox_id is not None}
