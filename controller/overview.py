"""The ``lease_overview`` view as an operator reads it (``leasectl get``, ``get -w``): one Core
``SELECT``, values read raw and made displayable one by one.

It imports only SQLAlchemy Core: neither the ORM models nor pydantic, so ``get`` starts quickly
(tests/unit/test_cli_imports.py counts that). A timestamp written by hand that is not one shows as
its text instead of failing the whole listing. :func:`parse_timestamp` and
:func:`tolerant_timestamp` are also what :mod:`controller.lease_rows` reads operator rows with.
Called by ``controller.cli.leases`` and ``controller.leases.overview``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

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

_ALL = sa.text("SELECT * FROM lease_overview ORDER BY name")
_NAMED = sa.text("SELECT * FROM lease_overview WHERE name IN :names ORDER BY name").bindparams(
    sa.bindparam("names", expanding=True)
)


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


def overview_rows(conn: sa.Connection, names: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of ``lease_overview`` as dicts, ordered by name (only ``names`` when given)."""
    result = conn.execute(_NAMED, {"names": list(names)}) if names else conn.execute(_ALL)
    # str(): the keys are SQLAlchemy quoted_name, which yaml.safe_dump cannot represent
    return [{str(k): _value(k, v) for k, v in row._mapping.items()} for row in result]
