"""The ``quotas`` table: apply from lease files, read for the reconciler, export and ``leasectl quotas``.

Called by ``controller.leases`` (apply, inside its transaction), ``controller.reconciler`` (one
SELECT per pass) and the CLI. The decisions themselves are pure and live in ``controller.quotas``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.orm import Session

from controller.quotas import DIMENSIONS, QuotaView, Resources, lease_resources, runs
from controller.specs import QuotaSpec
from models import Quota, utcnow

log = logging.getLogger(__name__)


@dataclass
class QuotaApplyResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)


def _values(row: Quota) -> dict[str, Any]:
    return {"label": row.label, "value": row.value, **{d: getattr(row, d) for d in DIMENSIONS}}


def read_quota_specs(session: Session) -> list[QuotaSpec]:
    """Every valid quota row as a spec, in scope order (a row written with SQL that breaks the rules
    is logged and left out)."""
    specs = []
    for row in session.scalars(sa.select(Quota).order_by(Quota.label, Quota.value)):
        try:
            specs.append(QuotaSpec.from_row(_values(row)))
        except (ValidationError, TypeError, ValueError) as exc:
            log.warning("quota row %s=%s ignored: %s", row.label, row.value, exc)
    return specs


def load_quotas(session: Session) -> list[QuotaView]:
    """The quotas as the gate needs them (one SELECT)."""
    return [QuotaView(**spec.to_row()) for spec in read_quota_specs(session)]


def apply_quotas(
    session: Session, quotas: Sequence[QuotaSpec], *, prune: bool, result: QuotaApplyResult
) -> None:
    """Upsert the declared quotas by scope; with ``prune``, delete the others."""
    now = utcnow()
    existing = {(row.label, row.value): row for row in session.scalars(sa.select(Quota).with_for_update())}
    for spec in quotas:
        values = spec.to_row()
        row = existing.get((values["label"], values["value"]))
        if row is None:
            session.add(Quota(**values, created_at=now, updated_at=now))
            result.created.append(spec.scope)
        elif _values(row) != values:
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = now
            result.updated.append(spec.scope)
        else:
            result.unchanged.append(spec.scope)
    if prune:
        wanted = {(q.to_row()["label"], q.to_row()["value"]) for q in quotas}
        for scope_key, row in sorted(existing.items()):
            if scope_key not in wanted:
                result.pruned.append(QuotaView(label=row.label, value=row.value).name)
                session.delete(row)


@dataclass(frozen=True)
class QuotaUse:
    """One line of ``leasectl quotas``: a scope, its limits and its use."""

    quota: str  # the quota (``team=*``)
    scope: str  # the scope used (``team=ml``); for a quota that matches nothing, the quota itself
    limits: dict[str, int | None]
    use: dict[str, int]
    leases: int  # leases the quota applies to
    blocked: int  # of them, phase Blocked now

    @property
    def note(self) -> str:
        if self.leases == 0:
            return "matches no lease"
        full = [d for d in DIMENSIONS if self.limits[d] is not None and self.use[d] >= (self.limits[d] or 0)]
        return f"full: {', '.join(full)}" if full else ""


def quota_report(session: Session) -> list[QuotaUse]:
    """Use against limits from the database (what the last pass observed), per quota scope."""
    from controller.lease_rows import load_lease_rows
    from controller.planner import LeaseView, build_create_request
    from models import LeaseStatus

    quotas = load_quotas(session)
    rows, _ = load_lease_rows(session)
    statuses = {s.lease_name: s for s in session.scalars(sa.select(LeaseStatus))}
    report: dict[tuple[str, str], dict[str, Any]] = {}
    for quota in quotas:
        report[(quota.name, quota.name)] = {"quota": quota, "use": Resources(), "leases": 0, "blocked": 0}
    for row in rows:
        labels = dict(row.spec.get("labels") or {})
        view = LeaseView(row.name, row.desired_state, "", build_create_request("", row.name, "", row.spec))
        status = statuses.get(row.name)
        state = status.observed_state if status is not None else None
        held = (
            lease_resources(view) if runs(state) or (status and status.create_attempt_name) else Resources()
        )
        for quota in quotas:
            scope = quota.scope(labels)
            if scope is None:
                continue
            entry = report.setdefault(
                (quota.name, scope), {"quota": quota, "use": Resources(), "leases": 0, "blocked": 0}
            )
            entry["use"] = entry["use"] + held
            entry["leases"] += 1
            entry["blocked"] += 1 if status is not None and status.phase == "Blocked" else 0
    lines = []
    for (name, scope), entry in sorted(report.items()):
        this: QuotaView = entry["quota"]
        if scope == name and entry["leases"] == 0 and any(k[0] == name and k[1] != name for k in report):
            continue  # a per-value quota with values in use: the values are listed
        lines.append(
            QuotaUse(
                quota=name,
                scope=scope,
                limits={d: this.limit(d) for d in DIMENSIONS},
                use={d: entry["use"].get(d) for d in DIMENSIONS},
                leases=entry["leases"],
                blocked=entry["blocked"],
            )
        )
    return lines
