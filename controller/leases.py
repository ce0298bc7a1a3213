"""Operator-facing lease operations on the database: apply (upsert and prune), read, export.

Used by the CLI (``apply``, ``get``, ``export``). ``apply`` writes only operator columns, in one
transaction: on any error nothing is written. It never deletes a row: pruning sets the desired
state to ``absent`` so the controller can still find and delete the sandbox. A prune that would
take every live lease, or more than ``max_prune_share`` of them, is refused (nothing is written, dry
run or not) unless the caller allows it explicitly (``apply --prune-all``): an empty or truncated
file must not be able to delete a fleet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from controller.db import Database
from controller.errors import SpecError
from controller.specs import LeaseSpec
from models import Lease, lease_overview, utcnow

OPERATOR_COLUMNS = tuple(LeaseSpec(name="x").to_row().keys())
DEFAULT_MAX_PRUNE_SHARE = 0.5


class PruneRefusedError(SpecError):
    """A prune would remove all, or too large a share, of the live leases; nothing was written."""


def prune_refusal(live: int, pruned: int, max_share: float) -> str | None:
    """Why a prune of ``pruned`` of ``live`` leases (desired state not absent) is refused, or None.

    Pure. Refused: every live lease (when there is at least one), or a share above ``max_share``.
    """
    if pruned == 0 or live == 0:
        return None
    if pruned >= live:
        return f"refusing to prune all {live} live lease(s): the files name none of them"
    if pruned / live > max_share:
        return (
            f"refusing to prune {pruned} of {live} live leases ({pruned / live:.0%}, more than the "
            f"{max_share:.0%} that controller.max_prune_share allows)"
        )
    return None


@dataclass
class ApplyResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.pruned)


def _row_values(lease: Lease) -> dict[str, Any]:
    return {col: getattr(lease, col) for col in OPERATOR_COLUMNS}


def apply_specs(
    db: Database,
    specs: Sequence[LeaseSpec],
    *,
    prune: bool = False,
    dry_run: bool = False,
    prune_all: bool = False,
    max_prune_share: float = DEFAULT_MAX_PRUNE_SHARE,
) -> ApplyResult:
    """Upsert ``specs`` into ``leases`` in one transaction (rolled back when ``dry_run``).

    Raises :class:`PruneRefusedError` (nothing written) when the prune guard refuses and
    ``prune_all`` is not set.
    """
    result = ApplyResult()
    wanted = {s.name for s in specs}
    guard = None if prune_all else max_prune_share
    with contextlib.suppress(_RolledBack):
        _apply(db, specs, wanted, result, prune=prune, dry_run=dry_run, max_prune_share=guard)
    return result


class _RolledBack(Exception):
    """Raised inside the transaction to roll a dry run back."""


def _apply(
    db: Database,
    specs: Sequence[LeaseSpec],
    wanted: set[str],
    result: ApplyResult,
    *,
    prune: bool,
    dry_run: bool,
    max_prune_share: float | None,
) -> None:
    with db.session() as session:
        existing = {lease.name: lease for lease in session.scalars(sa.select(Lease).with_for_update())}
        now = utcnow()
        for spec in specs:
            values = spec.to_row()
            lease = existing.get(spec.name)
            if lease is None:
                session.add(Lease(**values, created_at=now, updated_at=now))
                result.created.append(spec.name)
            elif _row_values(lease) != values:
                for col, value in values.items():
                    setattr(lease, col, value)
                lease.updated_at = now
                result.updated.append(spec.name)
            else:
                result.unchanged.append(spec.name)
        if prune:
            live = sum(1 for lease in existing.values() if lease.desired_state != "absent")
            for name, lease in sorted(existing.items()):
                if name not in wanted and lease.desired_state != "absent":
                    lease.desired_state = "absent"
                    lease.updated_at = now
                    result.pruned.append(name)
            refusal = (
                prune_refusal(live, len(result.pruned), max_prune_share)
                if max_prune_share is not None
                else None
            )
            if refusal is not None:
                raise PruneRefusedError(
                    f"{refusal}; nothing was written. Check the files (an empty or truncated file "
                    "prunes everything); if you mean it, run again with --prune-all"
                )
        session.flush()  # let the database's own constraints speak before we report success
        if dry_run:
            raise _RolledBack


def read_specs(session: Session, names: Sequence[str] = ()) -> list[LeaseSpec]:
    query = sa.select(Lease).order_by(Lease.name)
    if names:
        query = query.where(Lease.name.in_(names))
    return [LeaseSpec.from_row(_row_values(lease)) for lease in session.scalars(query)]


def overview(session: Session, names: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of the ``lease_overview`` view, as dicts, ordered by name."""
    query = sa.select(lease_overview).order_by(lease_overview.c.name)
    if names:
        query = query.where(lease_overview.c.name.in_(names))
    return [dict(row._mapping) for row in session.execute(query)]
