"""The status page's reads: the fleet summary, one page of the lease table, one lease in detail.

Every function takes an open (read-only) session and returns plain frozen dataclasses the templates
render; nothing here writes. The lease table is filtered, sorted and paginated in SQL (``LIMIT`` /
``OFFSET`` with a ``COUNT``), so a page costs the same few statements at 10 rows or 10,000.
:func:`parse_query` turns the request's query string into a :class:`LeaseQuery` and is pure.

What the page must never show: env values (only the variable names), an execution's ``env`` and
``stdin`` (never selected), and anything from settings. :class:`Fleet` carries the warm pools'
members by standing (one more SELECT of the pool names; the members only when there are pools).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import sqlalchemy as sa
from sqlalchemy.orm import Session

from controller.pool_sync import load_members
from controller.pools import count
from models import DESIRED_STATES, PHASES, Event, Execution, LeaderElection, Lease, LeaseStatus, Pool

DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 200
RECENT_EVENTS = 25
RECENT_EXECUTIONS = 10
OUTPUT_SHOWN_CHARS = 16_384

_PHASE = sa.func.coalesce(LeaseStatus.phase, "Pending")

SORT_COLUMNS: dict[str, Any] = {
    "name": Lease.name,
    "phase": _PHASE,
    "desired": Lease.desired_state,
    "observed": LeaseStatus.observed_state,
    "updated": LeaseStatus.updated_at,
    "reconciled": LeaseStatus.last_reconciled_at,
}


@dataclass(frozen=True)
class LeaseQuery:
    """Filters, order and page of the lease table, as the query string gives them (validated)."""

    phase: str = ""
    desired: str = ""
    label: str = ""  # "key=value" or "key" (has the label)
    q: str = ""  # substring of the name
    sort: str = "name"
    order: str = "asc"
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE

    def params(self, **changes: Any) -> str:
        """The query string of this query with ``changes`` (defaults left out), for links."""
        other = replace(self, **changes)
        defaults = LeaseQuery()
        pairs = [
            (name, getattr(other, name))
            for name in ("phase", "desired", "label", "q", "sort", "order", "page", "per_page")
            if getattr(other, name) != getattr(defaults, name)
        ]
        return "?" + urlencode(pairs) if pairs else "?"

    def sort_link(self, column: str) -> str:
        """Link that sorts by ``column``: ascending first, flips the order when already sorted by it."""
        order = "desc" if self.sort == column and self.order == "asc" else "asc"
        return self.params(sort=column, order=order, page=1)

    @property
    def filtered(self) -> bool:
        return bool(self.phase or self.desired or self.label or self.q)


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        number = int(value) if value is not None else default
    except ValueError:
        return default
    return max(low, min(high, number))


def parse_query(params: Mapping[str, str]) -> LeaseQuery:
    """A LeaseQuery from request parameters; unknown values fall back to the defaults (never an error)."""
    phase = params.get("phase", "")
    desired = params.get("desired", "")
    sort = params.get("sort", "name")
    order = params.get("order", "asc")
    return LeaseQuery(
        phase=phase if phase in PHASES else "",
        desired=desired if desired in DESIRED_STATES else "",
        label=params.get("label", "").strip()[:200],
        q=params.get("q", "").strip()[:63],
        sort=sort if sort in SORT_COLUMNS else "name",
        order=order if order in ("asc", "desc") else "asc",
        page=_int(params.get("page"), 1, 1, 1_000_000),
        per_page=_int(params.get("per_page"), DEFAULT_PER_PAGE, 1, MAX_PER_PAGE),
    )


@dataclass(frozen=True)
class LeaseRow:
    name: str
    desired_state: str
    phase: str
    observed_state: str | None
    sandbox_id: str | None
    message: str | None
    paused: bool
    labels: dict[str, str]
    updated_at: datetime | None
    last_reconciled_at: datetime | None


@dataclass(frozen=True)
class LeasePage:
    query: LeaseQuery
    rows: list[LeaseRow]
    total: int  # rows matching the filters

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.query.per_page))

    @property
    def first_index(self) -> int:
        return 0 if not self.rows else (self.query.page - 1) * self.query.per_page + 1

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.rows) - 1 if self.rows else 0


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _filters(query: LeaseQuery) -> list[sa.ColumnElement[bool]]:
    where: list[sa.ColumnElement[bool]] = []
    if query.phase:
        where.append(_PHASE == query.phase)  # noqa: SIM300 (a column, not a constant)
    if query.desired:
        where.append(Lease.desired_state == query.desired)
    if query.q:
        where.append(Lease.name.like(f"%{_escape_like(query.q.lower())}%", escape="\\"))
    if query.label:
        key, sep, value = query.label.partition("=")
        item = Lease.labels[key.strip()].as_string()
        where.append(item == value.strip() if sep else item.is_not(None))
    return where


def list_leases(session: Session, query: LeaseQuery) -> LeasePage:
    """One page of leases joined with their status: two statements (count, page), whatever the fleet."""
    joined = sa.select(Lease).outerjoin(LeaseStatus, LeaseStatus.lease_name == Lease.name)
    where = _filters(query)
    total = int(session.scalar(joined.with_only_columns(sa.func.count()).where(*where)) or 0)
    column = SORT_COLUMNS[query.sort]
    ordering = column.desc() if query.order == "desc" else column.asc()
    if query.sort in ("observed", "updated", "reconciled"):
        ordering = ordering.nulls_last()
    page = min(query.page, max(1, -(-total // query.per_page)))
    query = replace(query, page=page)
    stmt = (
        joined.with_only_columns(
            Lease.name,
            Lease.desired_state,
            _PHASE.label("phase"),
            LeaseStatus.observed_state,
            LeaseStatus.sandbox_id,
            LeaseStatus.message,
            Lease.paused,
            Lease.labels,
            LeaseStatus.updated_at,
            LeaseStatus.last_reconciled_at,
        )
        .where(*where)
        .order_by(ordering, Lease.name.asc())
        .limit(query.per_page)
        .offset((page - 1) * query.per_page)
    )
    rows = [
        LeaseRow(
            name=r.name,
            desired_state=r.desired_state,
            phase=r.phase,
            observed_state=r.observed_state,
            sandbox_id=r.sandbox_id,
            message=r.message,
            paused=bool(r.paused),
            labels=dict(r.labels or {}),
            updated_at=r.updated_at,
            last_reconciled_at=r.last_reconciled_at,
        )
        for r in session.execute(stmt)
    ]
    return LeasePage(query=query, rows=rows, total=total)


@dataclass(frozen=True)
class Leader:
    holder: str | None
    term: int
    renewed_at: datetime | None
    expires_at: datetime | None
    current: bool  # the lease on leadership has not expired


@dataclass(frozen=True)
class PoolCounts:
    """One pool's members by standing (controller.pools.count), and its sizes."""

    name: str
    ready: int
    claimed: int
    provisioning: int
    failing: int = 0
    min_ready: int = 0
    max_size: int | None = None


@dataclass(frozen=True)
class Fleet:
    by_phase: dict[str, int]  # every phase, zero included, in PHASES order
    total: int
    leader: Leader | None
    last_reconciled_at: datetime | None  # the latest pass that wrote status, by any replica
    pools: list[PoolCounts] = field(default_factory=list)

    def share(self, phase: str) -> float:
        """The phase's share of the fleet in percent, for the bar."""
        return 100.0 * self.by_phase.get(phase, 0) / self.total if self.total else 0.0


def fleet(session: Session, instance: str, now: datetime) -> Fleet:
    """Counts by phase, the leader of ``instance``, the latest pass and the pools: four statements
    (five with pools: their members)."""
    counts = dict.fromkeys(PHASES, 0)
    stmt = (
        sa.select(_PHASE, sa.func.count())
        .select_from(Lease)
        .outerjoin(LeaseStatus, LeaseStatus.lease_name == Lease.name)
        .group_by(_PHASE)
    )
    for phase, n in session.execute(stmt):
        counts[str(phase)] = counts.get(str(phase), 0) + int(n)
    row = session.get(LeaderElection, instance)
    leader = None
    if row is not None and row.holder:
        leader = Leader(
            holder=row.holder,
            term=int(row.term),
            renewed_at=row.renewed_at,
            expires_at=row.expires_at,
            current=row.expires_at is not None and row.expires_at > now,
        )
    last = session.scalar(sa.select(sa.func.max(LeaseStatus.last_reconciled_at)))
    return Fleet(
        by_phase=counts,
        total=sum(counts.values()),
        leader=leader,
        last_reconciled_at=last,
        pools=pool_counts(session),
    )


def pool_counts(session: Session) -> list[PoolCounts]:
    """Every pool with its members by standing, as ``leasectl pools`` counts them."""
    pools = session.execute(sa.select(Pool.name, Pool.min_ready, Pool.max_size).order_by(Pool.name)).all()
    if not pools:
        return []
    by_pool: dict[str, list[Any]] = {}
    for member in load_members(session):
        by_pool.setdefault(member.pool, []).append(member)
    result = []
    for name, min_ready, max_size in pools:
        c = count(by_pool.get(name, []))
        result.append(
            PoolCounts(name, c.ready, c.claimed, c.provisioning, c.failing, int(min_ready or 0), max_size)
        )
    return result


@dataclass(frozen=True)
class SpecView:
    """The operator's spec as the page shows it: env values are never part of it."""

    desired_state: str
    snapshot: str | None
    image: str | None
    target: str | None
    language: str | None
    resources: dict[str, int]
    env_names: list[str]
    labels: dict[str, str]
    auto_stop_interval: int | None
    auto_archive_interval: int | None
    auto_delete_interval: int | None
    expires_at: datetime | None
    paused: bool
    created_at: datetime | None
    updated_at: datetime | None


@dataclass(frozen=True)
class StatusDetail:
    phase: str
    message: str | None
    last_error: str | None
    failures: int
    next_attempt_at: datetime | None
    sandbox_id: str | None
    sandbox_name: str | None
    observed_state: str | None
    ready_at: datetime | None
    workspace_path: str | None
    last_reconciled_at: datetime | None


@dataclass(frozen=True)
class EventRow:
    at: datetime
    action: str
    outcome: str
    message: str | None
    sandbox_id: str | None


@dataclass(frozen=True)
class ExecutionRow:
    id: int
    command: str
    state: str
    exit_code: int | None
    error: str | None
    output: str | None  # the last OUTPUT_SHOWN_CHARS characters
    output_length: int
    output_truncated: bool  # the controller cut it at exec.max_output_bytes
    created_at: datetime | None
    finished_at: datetime | None

    @property
    def output_clipped(self) -> bool:
        return self.output is not None and len(self.output) < self.output_length


@dataclass(frozen=True)
class LeaseDetail:
    name: str
    spec: SpecView | None  # None: the lease row is gone but its status is still there
    status: StatusDetail | None
    events: list[EventRow]
    executions: list[ExecutionRow]


def lease_detail(session: Session, name: str) -> LeaseDetail | None:
    """One lease with its status, recent events and executions; None when neither row exists."""
    lease = session.scalar(sa.select(Lease).where(Lease.name == name))
    status = session.get(LeaseStatus, name)
    if lease is None and status is None:
        return None
    spec = None
    if lease is not None:
        resources = {k: v for k in ("cpu", "memory", "disk", "gpu") if (v := getattr(lease, k)) is not None}
        spec = SpecView(
            desired_state=lease.desired_state,
            snapshot=lease.snapshot,
            image=lease.image,
            target=lease.target,
            language=lease.language,
            resources=resources,
            env_names=sorted((lease.env or {}).keys()),
            labels=dict(lease.labels or {}),
            auto_stop_interval=lease.auto_stop_interval,
            auto_archive_interval=lease.auto_archive_interval,
            auto_delete_interval=lease.auto_delete_interval,
            expires_at=lease.expires_at,
            paused=bool(lease.paused),
            created_at=lease.created_at,
            updated_at=lease.updated_at,
        )
    detail = None
    if status is not None:
        detail = StatusDetail(
            phase=status.phase,
            message=status.message,
            last_error=status.last_error,
            failures=int(status.failures or 0),
            next_attempt_at=status.next_attempt_at,
            sandbox_id=status.sandbox_id,
            sandbox_name=status.sandbox_name,
            observed_state=status.observed_state,
            ready_at=status.ready_at,
            workspace_path=status.workspace_path,
            last_reconciled_at=status.last_reconciled_at,
        )
    events = [
        EventRow(at=e.at, action=e.action, outcome=e.outcome, message=e.message, sandbox_id=e.sandbox_id)
        for e in session.execute(
            sa.select(Event.at, Event.action, Event.outcome, Event.message, Event.sandbox_id)
            .where(Event.lease_name == name)
            .order_by(Event.id.desc())
            .limit(RECENT_EVENTS)
        )
    ]
    # env and stdin are never selected: a queued row may still carry them.
    output_length = sa.func.length(Execution.output)
    output_tail = sa.func.substr(
        Execution.output,
        sa.case((output_length > OUTPUT_SHOWN_CHARS, output_length - OUTPUT_SHOWN_CHARS + 1), else_=1),
    )
    executions = [
        ExecutionRow(
            id=int(x.id),
            command=x.command,
            state=x.state,
            exit_code=x.exit_code,
            error=x.error,
            output=x.output,
            output_length=int(x.output_length or 0),
            output_truncated=bool(x.output_truncated),
            created_at=x.created_at,
            finished_at=x.finished_at,
        )
        for x in session.execute(
            sa.select(
                Execution.id,
                Execution.command,
                Execution.state,
                Execution.exit_code,
                Execution.error,
                output_tail.label("output"),
                output_length.label("output_length"),
                Execution.output_truncated,
                Execution.created_at,
                Execution.finished_at,
            )
            .where(Execution.lease_name == name)
            .order_by(Execution.id.desc())
            .limit(RECENT_EXECUTIONS)
        )
    ]
    return LeaseDetail(name=name, spec=spec, status=detail, events=events, executions=executions)
