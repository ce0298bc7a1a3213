"""Operator-facing lease and pool operations on the database: apply (upsert and prune), read, export.

Used by the CLI (``apply``, ``get``, ``export``). Pools are applied like leases (pruning deletes the
pool row; the reconciler then retires its unclaimed members). Pool member rows (``leases.pool`` set)
belong to their pool: apply, prune and export never touch them, and a lease may not take a name of
the form ``<pool>-<id>``. ``apply`` writes only operator columns, in one
transaction: on any error nothing is written. It never deletes a row: pruning sets the desired
state to ``absent`` so the controller can still find and delete the sandbox. A prune that would
take every live lease, or more than ``max_prune_share`` of them, is refused (nothing is written, dry
run or not) unless the caller allows it explicitly (``apply --prune-all``): an empty or truncated
file must not be able to delete a fleet. The same guard applies to pools, counted on their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from controller.db import Database
from controller.errors import SpecError
from controller.lease_rows import InvalidLeaseRow, load_lease_rows
from controller.overview import overview_rows, sqlalchemy_reader
from controller.quota_rows import QuotaApplyResult, apply_quotas
from controller.specs import LeaseSpec, PoolSpec, QuotaSpec, VolumeSpec
from models import Lease, Pool, Volume, utcnow

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
    pools_created: list[str] = field(default_factory=list)
    pools_updated: list[str] = field(default_factory=list)
    pools_unchanged: list[str] = field(default_factory=list)
    pools_pruned: list[str] = field(default_factory=list)
    volumes_created: list[str] = field(default_factory=list)
    volumes_updated: list[str] = field(default_factory=list)
    volumes_unchanged: list[str] = field(default_factory=list)
    quotas: QuotaApplyResult = field(default_factory=QuotaApplyResult)

    @property
    def changed(self) -> bool:
        return bool(
            self.created
            or self.updated
            or self.pruned
            or self.pools_created
            or self.pools_updated
            or self.pools_pruned
            or self.volumes_created
            or self.volumes_updated
        )


def apply_specs(
    db: Database,
    specs: Sequence[LeaseSpec],
    *,
    pools: Sequence[PoolSpec] | None = None,
    volumes: Sequence[VolumeSpec] = (),
    quotas: Sequence[QuotaSpec] | None = None,
    prune: bool = False,
    dry_run: bool = False,
    prune_all: bool = False,
    max_prune_share: float = DEFAULT_MAX_PRUNE_SHARE,
) -> ApplyResult:
    """Upsert ``specs`` into ``leases`` (and ``pools`` into ``pools`` unless None) in one transaction
    (rolled back when ``dry_run``).

    Raises :class:`PruneRefusedError` (nothing written) when the prune guard refuses and
    ``prune_all`` is not set, and :class:`SpecError` when a lease is named like a pool's members.
    """
    result = ApplyResult()
    wanted = {s.name for s in specs}
    guard = None if prune_all else max_prune_share
    with contextlib.suppress(_RolledBack):
        _apply(
            db,
            specs,
            pools,
            wanted,
            result,
            prune=prune,
            dry_run=dry_run,
            max_prune_share=guard,
            volumes=volumes,
            quotas=quotas,
        )
    return result


class _RolledBack(Exception):
    """Raised inside the transaction to roll a dry run back."""


def _apply(
    db: Database,
    specs: Sequence[LeaseSpec],
    pools: Sequence[PoolSpec] | None,
    wanted: set[str],
    result: ApplyResult,
    *,
    prune: bool,
    dry_run: bool,
    max_prune_share: float | None,
    volumes: Sequence[VolumeSpec] = (),
    quotas: Sequence[QuotaSpec] | None = None,
) -> None:
    with db.session() as session:
        # Lock and read the rows without loading them through the ORM: a row written by hand that
        # the ORM cannot load (JSON that does not parse on SQLite) must not stop an apply that
        # replaces it. Rows that break the lease rules compare as changed, so apply repairs them.
        # Pool members belong to their pool: apply and prune see plain leases only.
        locked = (
            session.execute(sa.select(Lease.name, Lease.desired_state, Lease.pool).with_for_update())
            .tuples()
            .all()
        )
        states = {name: state for name, state, pool in locked if pool is None}
        members = {name: pool for name, _, pool in locked if pool is not None}
        valid, _ = load_lease_rows(session)
        current = {row.name: row.lease.to_row() for row in valid if row.name in states}
        now = utcnow()
        _check_names(session, specs, pools, members)
        _apply_volumes(session, specs, volumes, result, now=now)
        if pools is not None:
            _apply_pools(session, pools, result, prune=prune, max_prune_share=max_prune_share, now=now)
        if quotas is not None:  # only when a file declares `quotas:` (prune never empties them silently)
            apply_quotas(session, quotas, prune=prune, result=result.quotas)
        for spec in specs:
            values = spec.to_row()
            if spec.name not in states:
                session.execute(sa.insert(Lease).values(**values, created_at=now, updated_at=now))
                result.created.append(spec.name)
            elif current.get(spec.name) != values:
                session.execute(
                    sa.update(Lease).where(Lease.name == spec.name).values(**values, updated_at=now),
                    execution_options={"synchronize_session": False},
                )
                result.updated.append(spec.name)
            else:
                result.unchanged.append(spec.name)
        if prune:
            live = sum(1 for state in states.values() if state != "absent")
            doomed = [
                name for name, state in sorted(states.items()) if name not in wanted and state != "absent"
            ]
            refusal = (
                prune_refusal(live, len(doomed), max_prune_share) if max_prune_share is not None else None
            )
            if refusal is not None:
                raise PruneRefusedError(
                    f"{refusal}; nothing was written. Check the files (an empty or truncated file "
                    "prunes everything); if you mean it, run again with --prune-all"
                )
            for name in doomed:
                session.execute(
                    sa.update(Lease).where(Lease.name == name).values(desired_state="absent", updated_at=now),
                    execution_options={"synchronize_session": False},
                )
                result.pruned.append(name)
        if dry_run:
            raise _RolledBack


def _check_names(
    session: Session,
    specs: Sequence[LeaseSpec],
    pools: Sequence[PoolSpec] | None,
    members: Mapping[str, str | None],
) -> None:
    """A lease may not be named like a pool's members, nor take a member's name."""
    declared = {p.name: p for p in pools or ()}
    stored = {
        row.name: PoolSpec.model_construct(name=row.name)
        for row in session.scalars(sa.select(Pool))
        if row.name not in declared
    }
    problems = []
    for spec in specs:
        if spec.name in members:
            problems.append(
                f"lease {spec.name!r}: the name belongs to a member of pool {members[spec.name]!r}"
            )
            continue
        for pool in (*declared.values(), *stored.values()):
            if pool.owns_name(spec.name):
                problems.append(
                    f"lease {spec.name!r}: the name has the form of pool {pool.name!r}'s members "
                    f"({pool.name}-<8 characters>); rename the lease or the pool"
                )
    plain = {row for row in session.scalars(sa.select(Lease.name).where(Lease.pool.is_(None)))}
    for pool in declared.values():
        clashes = sorted(
            name for name in plain if pool.owns_name(name) and name not in {s.name for s in specs}
        )
        if clashes:
            problems.append(
                f"pool {pool.name!r}: existing lease(s) {', '.join(clashes)} have the form of its member "
                "names; rename the pool"
            )
    if problems:
        raise SpecError("; ".join(problems) + "; nothing was written")


def _apply_volumes(
    session: Session,
    specs: Sequence[LeaseSpec],
    volumes: Sequence[VolumeSpec],
    result: ApplyResult,
    *,
    now: Any,
) -> None:
    """Upsert the declared volumes (never pruned: a volume is deleted only by ``state: absent``) and
    refuse a lease that mounts a volume stored as absent (nothing is written then)."""
    existing = {row.name: row for row in session.scalars(sa.select(Volume).with_for_update())}
    for spec in volumes:
        row = existing.get(spec.name)
        if row is None:
            row = Volume(name=spec.name, desired_state=spec.state, created_at=now, updated_at=now)
            session.add(row)
            existing[spec.name] = row
            result.volumes_created.append(spec.name)
        elif row.desired_state != spec.state:
            row.desired_state, row.updated_at = spec.state, now
            result.volumes_updated.append(spec.name)
        else:
            result.volumes_unchanged.append(spec.name)
    problems = [
        f"lease {spec.name!r}: volumes.{index}.volume: {mount.volume!r} is stored with state absent "
        "(to be deleted); declare it present or mount another volume"
        for spec in specs
        if spec.state != "absent"
        for index, mount in enumerate(spec.volumes or ())
        if mount.volume in existing and existing[mount.volume].desired_state == "absent"
    ]
    if problems:
        raise SpecError("; ".join(problems) + "; nothing was written")


def read_volumes(session: Session) -> list[VolumeSpec]:
    return [
        VolumeSpec(name=row.name, state=row.desired_state)
        for row in session.scalars(sa.select(Volume).order_by(Volume.name))
    ]


def _apply_pools(
    session: Session,
    pools: Sequence[PoolSpec],
    result: ApplyResult,
    *,
    prune: bool,
    max_prune_share: float | None,
    now: Any,
) -> None:
    existing = {pool.name: pool for pool in session.scalars(sa.select(Pool).with_for_update())}
    for spec in pools:
        values = spec.to_row()
        row = existing.get(spec.name)
        if row is None:
            session.add(Pool(**values, created_at=now, updated_at=now))
            result.pools_created.append(spec.name)
        elif _pool_values(row) != values:
            for col, value in values.items():
                setattr(row, col, value)
            row.updated_at = now
            result.pools_updated.append(spec.name)
        else:
            result.pools_unchanged.append(spec.name)
    if not prune:
        return
    wanted = {p.name for p in pools}
    doomed = sorted(name for name in existing if name not in wanted)
    refusal = (
        prune_refusal(len(existing), len(doomed), max_prune_share) if max_prune_share is not None else None
    )
    if refusal is not None:
        raise PruneRefusedError(
            f"{refusal.replace('lease', 'pool')}; nothing was written. Check the files (an empty or "
            "truncated file prunes everything); if you mean it, run again with --prune-all"
        )
    for name in doomed:
        session.delete(existing[name])
        result.pools_pruned.append(name)


def _pool_values(row: Pool) -> dict[str, Any]:
    return {
        "name": row.name,
        "template": dict(row.template or {}),
        "min_ready": row.min_ready,
        "max_size": row.max_size,
        "claim_ttl_seconds": row.claim_ttl_seconds,
        "schedule": row.schedule,
    }


def read_pools(session: Session, names: Sequence[str] = ()) -> list[PoolSpec]:
    query = sa.select(Pool).order_by(Pool.name)
    if names:
        query = query.where(Pool.name.in_(names))
    return [PoolSpec.from_row(_pool_values(row)) for row in session.scalars(query)]


def read_specs(
    session: Session, names: Sequence[str] = (), *, invalid: list[InvalidLeaseRow] | None = None
) -> list[LeaseSpec]:
    """The valid plain leases (or those named) as specs; rows that break the rules go to ``invalid``.

    Pool members belong to their pool and are not exported."""
    members = set(session.scalars(sa.select(Lease.name).where(Lease.pool.is_not(None))))
    rows, bad = load_lease_rows(session, names)
    if invalid is not None:
        invalid.extend(row for row in bad if row.name not in members)
    return [row.lease for row in rows if row.name not in members]


def overview(
    session: Session, names: Sequence[str] = (), *, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Rows of the ``lease_overview`` view, as dicts, ordered by name (see controller/overview.py),
    with what each lease's schedule says at ``now``."""
    return overview_rows(sqlalchemy_reader(session.connection()), names, now=now)


def shown_specs(session: Session, names: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Per valid lease, its spec as ``get -o json|yaml`` shows it: the YAML form without name and
    state (those are columns of the view), env values left out (only the variable names, and for a
    reference where it is read from, never a value)."""
    rows, _ = load_lease_rows(session, names)
    shown: dict[str, dict[str, Any]] = {}
    for row in rows:
        data = row.lease.to_yaml_dict()
        data.pop("name", None)
        data.pop("state", None)
        if "env" in data:
            data["env"] = {k: (v if isinstance(v, dict) else "(set)") for k, v in data["env"].items()}
        shown[row.name] = data
    return shown


def request_rollout(db: Database, names: Sequence[str]) -> list[str]:
    """Set ``rollout_requested_at`` to now on the named leases (one transaction; all or nothing).

    The reconciler replaces each lease's sandbox created before that time, delete-then-create like a
    spec change. Returns the names that do not exist (then nothing is written)."""
    now = utcnow()
    with db.session() as session:
        found = set(session.scalars(sa.select(Lease.name).where(Lease.name.in_(list(names)))))
        missing = sorted(set(names) - found)
        if missing:
            return missing
        session.execute(
            sa.update(Lease)
            .where(Lease.name.in_(list(names)))
            .values(rollout_requested_at=now, updated_at=now),
            execution_options={"synchronize_session": False},
        )
    return []
