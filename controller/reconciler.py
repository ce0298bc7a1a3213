"""One reconcile pass: observe -> plan -> apply -> write status. Called by the CLI and the daemon.

A pass starts with the pool step (``controller.pool_sync``: member rows to add, retire, remove);
after planning, the volume step (``controller.volume_sync``) creates declared volumes before any
create that mounts them.

Reads every lease and status row (one read transaction), observes every sandbox of this instance
(one paginated list call), asks the pure planner for at most one action per lease and runs the
actions through the applier. Each lease whose action ran gets its ``lease_status`` row and event
written as soon as that action finishes, in a short transaction of its own (``_write_outcome``, from
the applier's worker), so a workspace realized in a pass with slow creates shows ``Ready`` at once,
not when the slowest create of the pass returns. The other leases (no action, or an action that was
not run, or whose early write failed) are written in one transaction at the end. The one write that
must come *before* an action is the create attempt: the deterministic sandbox name and the time are
committed before the create call (``before_create``), so a process killed at any instant leaves a
record that the next pass uses to look the sandbox up instead of creating a second one.

Status rows are written only when something about them changed, plus one set-based UPDATE of
``last_reconciled_at``, so a pass over a converged fleet costs a handful of statements whatever its
size. Every write is fenced by the leader elector when one is given; an early write refused by the
fence (or failing) is left to the end-of-pass write, which is fenced the same way.

Rows are read as plain Core rows of stored values. A ``Reconciler`` remembers, per lease, the stored
``leases`` row and what it made of it (validation, spec hash, create request) and the stored
``lease_status`` row and its ``StatusView``: a row stored exactly as last pass reuses them, any
change to any column (apply or SQL) is seen on the next pass. See docs/architecture.md "What a pass
costs" (issue 14).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from controller import logs, usage
from controller.applier import Applier, ApplierConfig, Outcome
from controller.config import Settings
from controller.db import Database
from controller.disk_guard import guard
from controller.errors import NotLeaderError
from controller.leader import LeaderElector
from controller.lease_rows import (
    RAW_KEYS,
    RAW_NAME_INDEX,
    InvalidLeaseRow,
    LeaseRow,
    parse_timestamp,
    raw_rows_query,
    validate_row,
)
from controller.metrics import Metrics
from controller.planner import (
    FAILED,
    WAITED_STATES,
    Action,
    LeaseView,
    Plan,
    StatusView,
    build_create_request,
    plan,
    stuck_for,
)
from controller.pool_sync import PoolSyncResult, sync_pools
from controller.pools import Headroom
from controller.providers.base import LABEL_INSTANCE, LABEL_LEASE, ObservedSandbox, SandboxProvider
from controller.quota_rows import load_quotas
from controller.quotas import QuotaView, gate
from controller.schedules import earliest, in_force, lease_schedule
from controller.specs import SPEC_COLUMNS, field_digests, legacy_spec_hash, settings_hash, spec_hash
from controller.volume_sync import sync_volumes
from models import Event, Lease, LeaseStatus, UTCDateTime, utcnow

log = logging.getLogger(__name__)

STATUS_FIELDS = (
    "sandbox_id",
    "sandbox_name",
    "observed_state",
    "observed_since",
    "phase",
    "spec_hash",
    "failed_spec_hash",
    "message",
    "last_error",
    "failures",
    "next_attempt_at",
    "ready_at",
    "workspace_path",
    "create_attempt_name",
    "create_attempt_at",
    "spec_fields",
)


@dataclass
class PassResult:
    pass_id: str
    plan: Plan
    outcomes: list[Outcome] = field(default_factory=list)
    duration_seconds: float = 0.0
    invalid: list[InvalidLeaseRow] = field(default_factory=list)  # rows left alone, phase Failed
    pools: PoolSyncResult | None = None
    next_change: datetime | None = None  # the next time a schedule (lease or pool) changes something

    @property
    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok and o.ran]


def lease_view(row: LeaseRow | Lease, instance: str, workspace_dir: str) -> LeaseView:
    """The planner's view of a validated row (or of an ORM ``Lease`` known to be valid: bench, tests)."""
    if isinstance(row, Lease):
        spec: Mapping[str, Any] = {col: getattr(row, col) for col in SPEC_COLUMNS}
        paused, expires_at = bool(row.paused), row.expires_at
        schedule = lease_schedule(row.schedule)
        created_at: datetime | None = row.created_at
    else:
        spec, paused, expires_at = row.spec, row.paused, row.expires_at
        schedule, created_at = row.schedule, row.created_at
    rollout = row.rollout_requested_at
    digest, settings = spec_hash(spec), settings_hash(spec)
    return LeaseView(
        name=row.name,
        desired_state=row.desired_state,
        spec_hash=digest,
        paused=paused,
        expires_at=expires_at,
        create=build_create_request(instance, row.name, digest, spec, settings),
        workspace_dir=workspace_dir,
        settings_hash=settings,
        legacy_spec_hash=legacy_spec_hash(spec),
        fields=_shared_fields(tuple(field_digests(spec).items())),
        rollout_requested_at=rollout,
        schedule=schedule,
        created_at=created_at,
    )


@functools.lru_cache(maxsize=4096)
def _shared_fields(items: tuple[tuple[str, str], ...]) -> Mapping[str, str]:
    """One dict per distinct set of field digests, shared by every lease view that has it (read
    only): a fleet of leases made from a few specs would otherwise keep a dict of ~15 digests per
    lease (about 115 MiB at 100,000 leases)."""
    return dict(items)


def next_schedule_change(leases: Sequence[LeaseView], now: datetime) -> datetime | None:
    """The next time a lease's schedule changes its desired state (the daemon wakes then)."""
    return earliest(
        *(
            in_force(lease.schedule, now, lease.desired_state).next_change
            for lease in leases
            if lease.schedule is not None and lease.desired_state != "absent"
        )
    )


def status_view(row: LeaseStatus) -> StatusView:
    return StatusView(**{name: getattr(row, name) for name in STATUS_FIELDS})


_STATUS: sa.Table = LeaseStatus.__table__  # type: ignore[assignment]
# lease_status as stored (no per-value type processing), without the two columns every pass moves:
# a row that reads the same as last pass is the same status. STATUS_FIELDS come first, in StatusView's
# field order (a unit test checks it), then any other column, so that every column a decision may
# write is compared.
_STATUS_KEYS: tuple[str, ...] = (
    "lease_name",
    *STATUS_FIELDS,
    *(
        column.key
        for column in _STATUS.columns
        if column.key not in ("lease_name", "updated_at", "last_reconciled_at", *STATUS_FIELDS)
    ),
)


def _raw(column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    """A column as stored: JSON as its text on both backends, anything else without processing."""
    if isinstance(column.type, sa.JSON):
        return sa.cast(column, sa.Text).label(column.key)
    return sa.type_coerce(column, sa.types.NullType()).label(column.key)


_STATUS_SELECT = sa.select(*(_raw(_STATUS.c[key]) for key in _STATUS_KEYS))
_STATUS_INDEX = {key: index for index, key in enumerate(_STATUS_KEYS)}
_STATUS_TIMES = tuple(
    index for index, key in enumerate(_STATUS_KEYS) if isinstance(_STATUS.c[key].type, UTCDateTime)
)
_STATUS_JSON = tuple(i for i, key in enumerate(_STATUS_KEYS) if isinstance(_STATUS.c[key].type, sa.JSON))
_STATUS_VIEW = slice(1, 1 + len(STATUS_FIELDS))
_STATUS_COLUMNS = frozenset(column.key for column in _STATUS.columns)
StatusRow = tuple[Any, ...]


def _fetch_plain(connection: sa.Connection, query: sa.Select[Any]) -> list[tuple[Any, ...]]:
    """Every row of a query whose columns need no result processing (``_raw``, ``raw_rows_query``),
    as the driver's own tuples: executed (and counted, and fenced) through SQLAlchemy like any
    statement, fetched from its DBAPI cursor without making a ``Row`` per row."""
    result = connection.execute(query)
    try:
        return [tuple(row) for row in result.cursor.fetchall()] if result.cursor is not None else []
    finally:
        result.close()


def _status_row(raw: Sequence[Any]) -> StatusRow:
    """A raw ``lease_status`` row (``_STATUS_SELECT``) with its timestamps as aware UTC datetimes,
    as the model's ``UTCDateTime`` reads them, and its JSON decoded."""
    row = list(raw)
    for index in _STATUS_TIMES:
        if row[index] is not None:
            row[index] = parse_timestamp(row[index])
    for index in _STATUS_JSON:
        if row[index] is not None:
            row[index] = json.loads(row[index])
    return tuple(row)


_Getter = Callable[[StatusRow], tuple[Any, ...]]
_GETTERS: dict[tuple[str, ...], _Getter | None] = {}


def _unknown_getter(row: StatusRow) -> tuple[Any, ...]:  # a marker for keys not seen yet; never called
    raise AssertionError("not a getter")


def _getter(keys: tuple[str, ...]) -> _Getter | None:
    """``row -> the stored values of keys, in order`` as one C call, when every key is a compared
    column; None otherwise (a key that is no column is ignored, ``updated_at`` always differs)."""
    if not keys or any(key not in _STATUS_INDEX for key in keys):
        return None
    positions = [_STATUS_INDEX[key] for key in keys]
    if len(positions) == 1:
        only = positions[0]
        return lambda row: (row[only],)
    return itemgetter(*positions)


def _unchanged(row: StatusRow, values: Mapping[str, Any]) -> bool:
    """Whether writing ``values`` would change nothing in ``row``: one tuple comparison."""
    keys = tuple(values)
    getter = _GETTERS.get(keys, _unknown_getter)
    if getter is _unknown_getter:
        getter = _GETTERS[keys] = _getter(keys)
    if getter is not None:
        return getter(row) == tuple(values.values())
    index = _STATUS_INDEX
    return all(k in index and row[index[k]] == v for k, v in values.items() if k in _STATUS_COLUMNS)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection during a pass. A pass holds tens of thousands of objects at once
    (one per lease for the list, the plan, the rows), and the collector, counting them, would scan
    the whole heap (every module, every cached lease) about once per pass of 10,000 leases: 30-40 %
    of a no-op pass's CPU. Nothing a pass makes needs the collector to be freed; the collection
    that follows the pass finds the pass's objects already gone. Re-enabled only if it was enabled."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Reconciler:
    """Runs passes; safe to call from one thread at a time (the daemon uses max_instances=1)."""

    def __init__(
        self,
        db: Database,
        provider: SandboxProvider,
        settings: Settings,
        *,
        applier: Applier,
        elector: LeaderElector | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
        controller_id: str | None = None,
    ) -> None:
        self.db = db
        self.provider = provider
        self.settings = settings
        self.applier = applier
        self.elector = elector
        self.metrics = metrics
        self.clock = clock
        self.instance = settings.controller.instance
        self.controller_id = controller_id or (elector.holder if elector else f"cli-{uuid.uuid4().hex[:8]}")
        self._lock = threading.Lock()
        self._quotas: list[QuotaView] = []
        self._since: dict[str, datetime] = {}  # sandbox id -> start of its open usage segment
        self._observed: list[ObservedSandbox] = []  # what the last observe_and_plan saw
        self.last_success: datetime | None = None
        # name -> (raw leases row, what it made): see _views_of
        self._views: dict[Any, tuple[tuple[Any, ...], LeaseView | InvalidLeaseRow]] = {}
        # name -> (raw lease_status row, the row converted, its StatusView), as the last _load read it
        self._statuses: dict[str, tuple[tuple[Any, ...], StatusRow, StatusView]] = {}

    # -- reading -------------------------------------------------------------------------------

    def _load(self) -> tuple[list[LeaseView], dict[str, StatusView], list[InvalidLeaseRow]]:
        """Leases and statuses as plain rows (two SELECTs, no ORM objects); a lease row whose stored
        values are those of the previous pass reuses its validation, spec hash and create request.
        Policy adds a bounded number of reads, none per lease: the quotas (one SELECT of a small
        table) and, with the disk guard on, the open ``stopped`` usage segments (one SELECT)."""
        with self.db.session(readonly=True) as session:
            connection = session.connection()  # Core rows: no ORM result layer
            raw_rows = _fetch_plain(connection, raw_rows_query())
            status_rows = _fetch_plain(connection, _STATUS_SELECT)
            self._quotas = load_quotas(session)
            if self.settings.policy.disk_guard_gib is not None:
                self._since = usage.open_since(session, "stopped")
        leases, invalid = self._views_of(raw_rows)
        return leases, self._status_views(status_rows), invalid

    def _status_views(self, raw_rows: Sequence[Any]) -> dict[str, StatusView]:
        """StatusViews of raw ``lease_status`` rows; a row read exactly as last time keeps its view."""
        cache = self._statuses
        fresh: dict[str, tuple[tuple[Any, ...], StatusRow, StatusView]] = {}
        views: dict[str, StatusView] = {}
        for key in raw_rows:
            name = key[0]
            hit = cache.get(name)
            if hit is None or hit[0] != key:
                row = _status_row(key)
                hit = (key, row, StatusView(*row[_STATUS_VIEW]))
            fresh[name] = hit
            views[name] = hit[2]
        self._statuses = fresh
        return views

    def _views_of(self, raw_rows: Sequence[Any]) -> tuple[list[LeaseView], list[InvalidLeaseRow]]:
        """The planner's view of every raw ``leases`` row. A row is validated (and hashed) again only
        when one of its stored values changed, whoever changed it (apply, SQL): the cache is keyed by
        the whole raw row, never by ``updated_at``. Rows gone from the table are forgotten."""
        workspace = self.settings.controller.workspace_dir
        cache = self._views
        fresh: dict[Any, tuple[tuple[Any, ...], LeaseView | InvalidLeaseRow]] = {}
        leases: list[LeaseView] = []
        invalid: list[InvalidLeaseRow] = []
        for key in raw_rows:
            name = key[RAW_NAME_INDEX]
            hit = cache.get(name)
            if hit is None or hit[0] != key:
                result = validate_row(dict(zip(RAW_KEYS, key, strict=True)))
                made: LeaseView | InvalidLeaseRow = (
                    lease_view(result, self.instance, workspace) if isinstance(result, LeaseRow) else result
                )
                hit = (key, made)
            fresh[name] = hit
            made = hit[1]
            if isinstance(made, LeaseView):
                leases.append(made)
            else:
                invalid.append(made)
        self._views = fresh
        return leases, invalid

    def plan_pass(self) -> tuple[Plan, list[LeaseView], dict[str, StatusView]]:
        """Observe and plan without acting (``leasectl plan``)."""
        the_plan, leases, statuses, _ = self.observe_and_plan()
        return the_plan, leases, statuses

    def observe_and_plan(
        self, at: datetime | None = None
    ) -> tuple[Plan, list[LeaseView], dict[str, StatusView], list[InvalidLeaseRow]]:
        """Observe and plan (as of ``at``, default now: ``leasectl plan --at``); also the rows left
        out because they break the lease rules."""
        leases, statuses, invalid = self._load()
        observed = self.provider.list_sandboxes({LABEL_INSTANCE: self.instance})
        the_plan = plan(
            leases,
            statuses,
            observed,
            at or self.clock(),
            instance=self.instance,
            stuck_after_seconds=self.settings.controller.stuck_after_seconds,
        )
        the_plan = gate(the_plan, leases, statuses, observed, self._quotas, lease_label=LABEL_LEASE)
        cap = self.settings.policy.disk_guard_gib
        if cap is not None:
            the_plan = guard(
                the_plan, leases, observed, cap_gib=cap, since=self._since, instance=self.instance
            )
        self._observed = observed
        return the_plan, leases, statuses, invalid

    # -- one pass --------------------------------------------------------------------------------

    def run_pass(self) -> PassResult:
        pass_id = uuid.uuid4().hex[:12]
        started = time.monotonic()
        with self._lock, logs.bound(pass_id=pass_id), _collector_paused():
            try:
                result = self._run(pass_id)
            except Exception:
                if self.metrics:
                    self.metrics.passes.labels(result="error").inc()
                raise
            result.duration_seconds = time.monotonic() - started
            if self.metrics:
                self.metrics.passes.labels(result="ok").inc()
                self.metrics.pass_duration.observe(result.duration_seconds)
            self.last_success = self.clock()
            log.info(
                "pass done: %d leases, %d actions, %d failed, %.2fs",
                len(result.plan.decisions),
                len(result.outcomes),
                len(result.errors),
                result.duration_seconds,
            )
            return result

    def _run(self, pass_id: str) -> PassResult:
        self._check_leader()
        c = self.settings.controller
        pools = sync_pools(
            self.db,
            now=self.clock(),
            create_budget=c.pool_creates_per_pass,
            controller_id=self.controller_id,
            pass_id=pass_id,
            fence=self._fence,
            metrics=self.metrics,
            headroom=Headroom(c.pool_headroom_factor, c.pool_claim_window_seconds),
        )
        the_plan, leases, statuses, invalid = self.observe_and_plan()
        views = {lease.name: lease for lease in leases}
        self._check_leader()
        fence = self._fence_for_term()
        # Declared volumes before the leases that mount them (each create looks its volumes up).
        sync_volumes(
            self.db,
            self.provider,
            leases,
            statuses,
            controller_id=self.controller_id,
            pass_id=pass_id,
            fence=fence,
        )

        def before_create(action: Action) -> None:
            self._record_create_attempt(action)

        written: set[str] = set()  # leases whose status and event are committed already

        def on_done(outcome: Outcome) -> None:
            if self._write_outcome(pass_id, the_plan, outcome, views, statuses):
                written.add(outcome.action.lease_name)  # set.add is atomic; read after apply returns

        # Plain leases first: filling a pool never delays them (the sort is stable).
        actions = sorted(the_plan.actions, key=lambda a: a.lease_name in pools.members)
        outcomes = (
            self.applier.apply(actions, before_create=before_create, fence=fence, on_done=on_done)
            if actions
            else []
        )
        self._write(pass_id, the_plan, outcomes, views, statuses, written)
        self._record_usage(views)
        if invalid:
            self._write_invalid(pass_id, invalid)
            if self.metrics:
                self.metrics.leases.labels(phase=FAILED).inc(len(invalid))  # set afresh by _write
        if self.metrics:
            for outcome in outcomes:
                result = "reobserved" if outcome.reobserved else "ok" if outcome.ok else "error"
                self.metrics.actions.labels(kind=outcome.action.kind, result=result).inc()
        return PassResult(
            pass_id=pass_id,
            plan=the_plan,
            outcomes=outcomes,
            invalid=invalid,
            pools=pools,
            next_change=earliest(pools.next_change, next_schedule_change(leases, self.clock())),
        )

    def _check_leader(self) -> None:
        if self.elector is not None and not self.elector.is_leader():
            raise NotLeaderError(f"not the leader of instance {self.instance}; pass skipped")

    def _fence_for_term(self) -> Callable[[], None] | None:
        """The applier's fence: every mutating provider call of this pass re-checks that we still
        lead in the term the pass was planned under (a deposed, then re-elected, replica's old plan
        is refused too)."""
        elector = self.elector
        if elector is None:
            return None
        term = elector.term

        def fence() -> None:
            elector.fence_term(term)

        return fence

    def _fence(self, session: Session) -> None:
        if self.elector is not None:
            self.elector.fence(session)

    # -- writing ---------------------------------------------------------------------------------

    def _record_create_attempt(self, action: Action) -> None:
        """Commit the deterministic name and time BEFORE the create call (crash safety)."""
        now = self.clock()
        with self.db.session() as session:
            self._fence(session)
            row = session.get(LeaseStatus, action.lease_name, with_for_update=True)
            if row is None:
                row = LeaseStatus(lease_name=action.lease_name, failures=0, phase="Provisioning")
                session.add(row)
            row.create_attempt_name = action.sandbox_name
            row.create_attempt_at = now
            row.phase = "Provisioning"
            row.message = f"creating sandbox {action.sandbox_name}"
            row.updated_at = now
            session.add(
                Event(
                    at=now,
                    lease_name=action.lease_name,
                    sandbox_id=None,
                    action="create",
                    outcome="attempt",
                    message=f"create attempt recorded for {action.sandbox_name}",
                    controller_id=self.controller_id,
                    pass_id=logs.pass_id_var.get(),
                )
            )

    def _write(
        self,
        pass_id: str,
        the_plan: Plan,
        outcomes: Sequence[Outcome],
        views: dict[str, LeaseView],
        before: dict[str, StatusView],
        written: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        """The end-of-pass write; leases in ``written`` were recorded by ``_write_outcome`` already
        (they only count in the phase gauge)."""
        now = self.clock()
        by_lease = {o.action.lease_name: o for o in outcomes}
        columns = _STATUS_COLUMNS
        updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        inserts: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        with self.db.session() as session:
            self._fence(session)
            # Compared with the rows as they are now (locked), not as the pass read them: a status
            # written meanwhile (a create attempt) is seen. Plain tuples, no ORM objects.
            locked = _fetch_plain(session.connection(), _STATUS_SELECT.with_for_update())
            current = {row[0]: row for row in locked}
            loaded = self._statuses
            phases: dict[str, int] = {}
            stuck = 0
            limit = self.settings.controller.stuck_after_seconds
            for name, decision in the_plan.decisions.items():
                outcome = by_lease.get(name) if by_lease else None
                values = decision.status_values()
                if outcome is not None:
                    values = self._status_values(values, outcome, views, before, now)
                phase = values.get("phase", "Pending")
                phases[phase] = phases.get(phase, 0) + 1
                state = values.get("observed_state")
                if state in WAITED_STATES:  # the planner's rule, as the lease's message says
                    stuck += stuck_for(state, values.get("observed_since"), now, limit) is not None
                if name in written:
                    continue
                if outcome is not None:
                    session.add(self._event(outcome, pass_id, now))
                raw = current.get(name)
                if raw is not None:
                    hit = loaded.get(name)
                    row = hit[1] if hit is not None and hit[0] == raw else _status_row(raw)
                    if _unchanged(row, values):
                        continue
                changed = {k: v for k, v in values.items() if k in columns}
                changed["updated_at"] = now
                changed["last_reconciled_at"] = now
                if raw is None:
                    changed.setdefault("failures", 0)
                    changed["lease_name"] = name
                    inserts.setdefault(tuple(sorted(changed)), []).append(changed)
                else:
                    changed["key_lease_name"] = name
                    updates.setdefault(tuple(sorted(changed)), []).append(changed)
            # One executemany per set of columns written (normally one or two sets).
            for params in inserts.values():
                session.execute(sa.insert(_STATUS), params)
            by_name = sa.update(_STATUS).where(_STATUS.c.lease_name == sa.bindparam("key_lease_name"))
            for params in updates.values():
                session.execute(by_name, params)  # SET: the columns named in the parameters
            session.execute(
                sa.update(LeaseStatus)
                .where(LeaseStatus.lease_name.in_(sa.select(Lease.name)))
                .values(last_reconciled_at=now),
                execution_options={"synchronize_session": False},
            )
        if self.metrics:
            for phase in list(self.metrics.leases._metrics):  # reset stale phases
                self.metrics.leases.labels(*phase).set(0)
            for phase, count in phases.items():
                self.metrics.leases.labels(phase=phase).set(count)
            self.metrics.stuck.set(stuck)

    def _record_usage(self, views: dict[str, LeaseView]) -> None:
        """Append what this pass observed to ``usage`` (controller.usage), in its own transaction."""
        gap = timedelta(seconds=self.settings.policy.usage_max_gap_seconds)
        with self.db.session() as session:
            self._fence(session)
            usage.record(session, self._observed, views, self.clock(), gap)

    def _status_values(
        self,
        values: dict[str, Any],
        outcome: Outcome | None,
        views: dict[str, LeaseView],
        before: dict[str, StatusView],
        now: datetime,
    ) -> dict[str, Any]:
        """A lease's new ``lease_status`` values: its decision's, with its action's outcome laid over."""
        if outcome is None:
            return values
        name = outcome.action.lease_name
        if outcome.reobserved and name in views:
            return self._replan(views[name], before.get(name), outcome, now)
        planned = values.get("sandbox_id"), values.get("observed_state")
        values.update(outcome.status_values(views.get(name)))
        if (values.get("sandbox_id"), values.get("observed_state")) != planned:
            # the action changed the sandbox or its state (a create, a lookup, a deletion)
            values["observed_since"] = now if values.get("observed_state") is not None else None
        return values

    def _write_outcome(
        self,
        pass_id: str,
        the_plan: Plan,
        outcome: Outcome,
        views: dict[str, LeaseView],
        before: dict[str, StatusView],
    ) -> bool:
        """Record one finished action (status row and event) in its own short, fenced transaction, from
        the applier's worker. False (nothing written) for an action that never ran or when the write
        fails: the end-of-pass ``_write`` records it then."""
        name = outcome.action.lease_name
        decision = the_plan.decisions.get(name)
        if decision is None or not outcome.ran:
            return False
        now = self.clock()
        values = self._status_values(decision.status_values(), outcome, views, before, now)
        try:
            with self.db.session() as session:
                self._fence(session)
                row = session.get(LeaseStatus, name, with_for_update=True)
                if row is None:
                    row = LeaseStatus(lease_name=name, failures=0)
                    session.add(row)
                for key, value in values.items():
                    if hasattr(row, key):
                        setattr(row, key, value)
                row.updated_at = now
                row.last_reconciled_at = now
                session.add(self._event(outcome, pass_id, now))
        except Exception as exc:  # NotLeaderError, a database error: the end of the pass tries again
            log.warning("lease %s: status not recorded yet (%s); recorded at the end of the pass", name, exc)
            return False
        return True

    def _replan(
        self, lease: LeaseView, status: StatusView | None, outcome: Outcome, now: datetime
    ) -> dict[str, Any]:
        """Status values for a lease whose action was refused by a state the list did not show yet:
        the planner decides again from the fresh ``get`` (its action, if any, runs next pass)."""
        fresh = [] if outcome.observed_gone or outcome.sandbox is None else [outcome.sandbox]
        again = plan(
            [lease],
            {lease.name: status or StatusView()},
            fresh,
            now,
            instance=self.instance,
            stuck_after_seconds=self.settings.controller.stuck_after_seconds,
        )
        decision = again.decisions[lease.name]
        values = decision.status_values()
        values["message"] = f"{outcome.message}: {decision.message}"
        return values

    def _write_invalid(self, pass_id: str, invalid: Sequence[InvalidLeaseRow]) -> None:
        """Phase ``Failed`` and the reason for rows that break the lease rules; nothing else is touched
        (no provider call is made for them, their sandbox and its record stay as they are). An event and a
        warning only when the verdict changes, so a bad row does not flood the history every pass."""
        now = self.clock()
        with self.db.session() as session:
            self._fence(session)
            names = [bad.name for bad in invalid]
            rows = {
                row.lease_name: row
                for row in session.scalars(
                    sa.select(LeaseStatus).where(LeaseStatus.lease_name.in_(names)).with_for_update()
                )
            }
            for bad in invalid:
                row = rows.get(bad.name)
                if row is None:
                    row = LeaseStatus(lease_name=bad.name, failures=0)
                    session.add(row)
                elif row.phase == FAILED and row.message == bad.message:
                    continue
                row.phase = FAILED
                row.message = bad.message
                row.last_error = bad.message
                row.next_attempt_at = None
                row.updated_at = now
                row.last_reconciled_at = now
                session.add(
                    Event(
                        at=now,
                        lease_name=bad.name,
                        sandbox_id=row.sandbox_id,
                        action="validate",
                        outcome="invalid",
                        message=bad.message,
                        controller_id=self.controller_id,
                        pass_id=pass_id,
                    )
                )
                with logs.bound(lease=bad.name):
                    log.warning("lease %s: %s; left alone until the row changes", bad.name, bad.message)

    def _event(self, outcome: Outcome, pass_id: str, now: datetime) -> Event:
        action = outcome.action
        return Event(
            at=now,
            lease_name=action.lease_name,
            sandbox_id=outcome.sandbox_id or action.sandbox_id,
            action=action.kind,
            outcome=_outcome_word(outcome),
            message=(f"{action.reason}: {outcome.message}" if action.policy and outcome.message else None)
            or outcome.message
            or action.reason,
            controller_id=self.controller_id,
            pass_id=pass_id,
        )


def _outcome_word(outcome: Outcome) -> str:
    """The ``events.outcome`` of an action: ok, reobserved (a stale list; not a failure) or the error."""
    if outcome.reobserved:
        return "reobserved"
    return "ok" if outcome.ok else (outcome.error_kind or "error")


def build_reconciler(
    db: Database,
    provider: SandboxProvider,
    settings: Settings,
    *,
    elector: LeaderElector | None = None,
    metrics: Metrics | None = None,
) -> Reconciler:
    """A Reconciler with an Applier configured from ``settings.controller`` (CLI, daemon, bench)."""
    c = settings.controller
    applier = Applier(
        provider,
        ApplierConfig(
            max_concurrent_actions=c.max_concurrent_actions,
            backoff_base_seconds=c.backoff_base_seconds,
            backoff_max_seconds=c.backoff_max_seconds,
            blocked_backoff_max_seconds=c.blocked_backoff_max_seconds,
            api_rate_per_second=c.api_rate_per_second,
            create_rate_per_minute=c.create_rate_per_minute,
            action_timeout_seconds=c.action_timeout_seconds,
        ),
    )
    return Reconciler(db, provider, settings, applier=applier, elector=elector, metrics=metrics)


def summarize(result: PassResult) -> dict[str, Any]:
    phases: dict[str, int] = {}
    for decision in result.plan.decisions.values():
        phases[decision.phase] = phases.get(decision.phase, 0) + 1
    if result.invalid:
        phases[FAILED] = phases.get(FAILED, 0) + len(result.invalid)
    return {
        "pass_id": result.pass_id,
        "leases": len(result.plan.decisions) + len(result.invalid),
        "invalid": len(result.invalid),
        "actions": len(result.outcomes),
        "failed": len(result.errors),
        "phases": phases,
        "seconds": round(result.duration_seconds, 3),
    }
