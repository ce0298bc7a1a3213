"""One reconcile pass: observe -> plan -> apply -> write status. Called by the CLI and the daemon.

A pass starts with the pool step (``controller.pool_sync``: member rows to add, retire, remove).

Reads every lease and status row (one read transaction), observes every sandbox of this instance
(one paginated list call), asks the pure planner for at most one action per lease, runs the
actions through the applier and writes ``lease_status`` and ``events`` in one transaction at the
end. The one write that cannot wait for the end is the create attempt: the deterministic sandbox
name and the time are committed *before* the create call (``before_create``), so a process killed
at any instant leaves a record that the next pass uses to look the sandbox up instead of creating
a second one.

Status rows are written only when something about them changed, plus one set-based UPDATE of
``last_reconciled_at``, so a pass over a converged fleet costs a handful of statements whatever its
size. Every write is fenced by the leader elector when one is given.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
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
from controller.lease_rows import InvalidLeaseRow, LeaseRow, load_lease_rows
from controller.metrics import Metrics
from controller.planner import FAILED, Action, LeaseView, Plan, StatusView, build_create_request, plan
from controller.pool_sync import PoolSyncResult, sync_pools
from controller.providers.base import LABEL_INSTANCE, LABEL_LEASE, ObservedSandbox, SandboxProvider
from controller.quota_rows import load_quotas
from controller.quotas import QuotaView, gate
from controller.schedules import earliest, in_force, lease_schedule
from controller.specs import SPEC_COLUMNS, spec_hash
from models import Event, Lease, LeaseStatus, utcnow

log = logging.getLogger(__name__)

STATUS_FIELDS = (
    "sandbox_id",
    "sandbox_name",
    "observed_state",
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
    digest = spec_hash(spec)
    return LeaseView(
        name=row.name,
        desired_state=row.desired_state,
        spec_hash=digest,
        paused=paused,
        expires_at=expires_at,
        create=build_create_request(instance, row.name, digest, spec),
        workspace_dir=workspace_dir,
        schedule=schedule,
        created_at=created_at,
    )


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

    # -- reading -------------------------------------------------------------------------------

    def _load(self) -> tuple[list[LeaseView], dict[str, StatusView], list[InvalidLeaseRow]]:
        workspace = self.settings.controller.workspace_dir
        with self.db.session(readonly=True) as session:
            rows, invalid = load_lease_rows(session)
            statuses = {row.lease_name: status_view(row) for row in session.scalars(sa.select(LeaseStatus))}
            self._quotas = load_quotas(session)
            if self.settings.policy.disk_guard_gib is not None:
                self._since = usage.open_since(session, "stopped")
        leases = [lease_view(row, self.instance, workspace) for row in rows]
        return leases, statuses, invalid

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
        the_plan = plan(leases, statuses, observed, at or self.clock(), instance=self.instance)
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
        with self._lock, logs.bound(pass_id=pass_id):
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
        pools = sync_pools(
            self.db,
            now=self.clock(),
            create_budget=self.settings.controller.pool_creates_per_pass,
            controller_id=self.controller_id,
            pass_id=pass_id,
            fence=self._fence,
            metrics=self.metrics,
        )
        the_plan, leases, statuses, invalid = self.observe_and_plan()
        views = {lease.name: lease for lease in leases}
        self._check_leader()
        fence = self._fence_for_term()

        def before_create(action: Action) -> None:
            self._record_create_attempt(action)

        # Plain leases first: filling a pool never delays them (the sort is stable).
        actions = sorted(the_plan.actions, key=lambda a: a.lease_name in pools.members)
        outcomes = self.applier.apply(actions, before_create=before_create, fence=fence) if actions else []
        self._write(pass_id, the_plan, outcomes, views, statuses)
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
    ) -> None:
        now = self.clock()
        by_lease = {o.action.lease_name: o for o in outcomes}
        with self.db.session() as session:
            self._fence(session)
            rows = {row.lease_name: row for row in session.scalars(sa.select(LeaseStatus).with_for_update())}
            phases: dict[str, int] = {}
            for name, decision in the_plan.decisions.items():
                values = decision.status_values()
                outcome = by_lease.get(name)
                if outcome is not None and outcome.reobserved and name in views:
                    values = self._replan(views[name], before.get(name), outcome, now)
                    session.add(self._event(outcome, pass_id, now))
                elif outcome is not None:
                    values.update(outcome.status_values(views.get(name)))
                    session.add(self._event(outcome, pass_id, now))
                phases[values.get("phase", "Pending")] = phases.get(values.get("phase", "Pending"), 0) + 1
                row = rows.get(name)
                if row is None:
                    row = LeaseStatus(lease_name=name, failures=0)
                    session.add(row)
                    changed = True
                else:
                    changed = any(getattr(row, k) != v for k, v in values.items() if hasattr(row, k))
                if changed:
                    for key, value in values.items():
                        if hasattr(row, key):
                            setattr(row, key, value)
                    row.updated_at = now
                    row.last_reconciled_at = now
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

    def _record_usage(self, views: dict[str, LeaseView]) -> None:
        """Append what this pass observed to ``usage`` (controller.usage), in its own transaction."""
        gap = timedelta(seconds=self.settings.policy.usage_max_gap_seconds)
        with self.db.session() as session:
            self._fence(session)
            usage.record(session, self._observed, views, self.clock(), gap)

    def _replan(
        self, lease: LeaseView, status: StatusView | None, outcome: Outcome, now: datetime
    ) -> dict[str, Any]:
        """Status values for a lease whose action was refused by a state the list did not show yet:
        the planner decides again from the fresh ``get`` (its action, if any, runs next pass)."""
        fresh = [] if outcome.observed_gone or outcome.sandbox is None else [outcome.sandbox]
        again = plan([lease], {lease.name: status or StatusView()}, fresh, now, instance=self.instance)
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
