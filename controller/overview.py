"""The ``lease_overview`` view as an operator reads it (``leasectl get``, ``get -w``): one plain
``SELECT``, values read raw and made displayable one by one.

It reads through a :class:`controller.dbapi.Reader`: the driver itself for ``get`` (no SQLAlchemy
imported at all when the URL is a plain one, see controller/dbapi.py), or a SQLAlchemy connection
wrapped by :func:`sqlalchemy_reader` (the status page, other URLs). Neither the ORM models nor
pydantic are imported, so ``get`` starts quickly (tests/unit/test_cli_imports.py counts that). A
timestamp written by hand that is not one shows as its text instead of failing the whole listing.
:func:`parse_timestamp` and :func:`tolerant_timestamp` are also what :mod:`controller.lease_rows`
reads operator rows with. Called by ``controller.cli.leases`` and ``controller.leases.overview``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from controller.dbapi import Reader, Rows, in_list

if TYPE_CHECKING:
    import sqlalchemy as sa

# The view's timestamp columns (UTCDateTime in models/views.py; a unit test keeps them equal).
TIMESTAMP_COLUMNS = frozenset(
    {
        "expires_at",
        "next_attempt_at",
        "ready_at",
        "last_reconciled_at",
        "created_at",
        "updated_at",
        "status_updated_at",
    }
)
BOOLEAN_COLUMNS = frozenset({"paused"})

_ALL = "SELECT * FROM lease_overview ORDER BY name"
_NAMED = "SELECT * FROM lease_overview WHERE name IN {names} ORDER BY name"


def parse_timestamp(value: Any) -> datetime:
    """A stored timestamp as an aware UTC datetime; naive values are UTC (how SQLite stores them).

    Raises ValueError for anything that is not a timestamp.
    """
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip())
    if not isinstance(value, datetime):
        raise ValueError(f"not a timestamp ({type(value).__name__})")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def tolerant_timestamp(value: Any) -> datetime | str | None:
    """For display: a timestamp, or the stored text when it is not one (never raises)."""
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except (ValueError, TypeError):
        return str(value)


def _value(key: str, value: Any) -> Any:
    if key in TIMESTAMP_COLUMNS:
        return tolerant_timestamp(value)
    if key in BOOLEAN_COLUMNS and value is not None:
        return bool(value)  # SQLite answers 0/1
    return value


def sqlalchemy_reader(conn: sa.Connection) -> Reader:
    """A :class:`~controller.dbapi.Reader` over a SQLAlchemy connection (the same raw values)."""
    import sqlalchemy as sa

    def read(sql: str, params: Mapping[str, Any] | None = None) -> Rows:
        result = conn.execute(sa.text(sql), dict(params or {}))
        # str(): the keys are SQLAlchemy quoted_name, which yaml.safe_dump cannot represent
        columns = result.keys()
        return [str(k) for k in columns], [tuple(row) for row in result]

    return read


def overview_rows(
    read: Reader, names: Sequence[str] = (), *, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Rows of ``lease_overview`` as dicts, ordered by name (only ``names`` when given), with what
    each lease's schedule says at ``now`` (see :func:`_with_schedules`)."""
    if names:
        placeholders, params = in_list("name", list(names))
        columns, found = read(_NAMED.format(names=placeholders), params)
    else:
        columns, found = read(_ALL)
    rows = [{k: _value(k, v) for k, v in zip(columns, row, strict=True)} for row in found]
    return _with_schedules(read, rows, now or datetime.now(UTC))


_SCHEDULES = "SELECT name, CAST(schedule AS TEXT) FROM leases WHERE schedule IS NOT NULL"


def _with_schedules(read: Reader, rows: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """Add what a lease's schedule says at ``now``: ``scheduled_state`` (the state in force),
    ``next_change``, ``next_state`` and ``schedule_timezone`` (None for leases without a schedule).
    A schedule written with SQL that does not parse is left out here (the reconciler marks the row
    Failed). The cron arithmetic (APScheduler) is imported only when some lease has a schedule."""
    for row in rows:
        row["scheduled_state"] = row["next_change"] = row["next_state"] = row["schedule_timezone"] = None
    stored = [(name, text) for name, text in read(_SCHEDULES)[1] if text not in (None, "null")]
    if not stored:
        return rows
    from controller.schedules import in_force, lease_schedule

    found: dict[str, Any] = {}
    for name, text in stored:
        try:
            schedule = lease_schedule(json.loads(text))
        except (ValueError, TypeError):
            continue
        if schedule is not None:
            found[name] = schedule
    for row in rows:
        schedule = found.get(row["name"])
        if schedule is None or row["desired_state"] == "absent":
            continue
        result = in_force(schedule, now, row["desired_state"])
        row["scheduled_state"] = result.value
        row["next_change"] = result.next_change
        row["next_state"] = result.next_value
        row["schedule_timezone"] = schedule.timezone
    return rows
