"""Reading operator-written ``leases`` rows without trusting them.

Operators may write anything the database accepts into ``leases`` with plain SQL: JSON that is not an
object, a name that breaks the slug rules, a 300 KB env value, text in an integer column (SQLite),
a timestamp without a zone. One such row must never stop the fleet, so the reconciler (and ``plan``,
``get`` and the execution queue) read rows through :func:`load_lease_rows`: every column comes back
raw (no ORM result processing that could raise for the whole query), and each row is validated on
its own by the rules of :class:`controller.specs.LeaseSpec` (not a copy of them). A valid row becomes
a :class:`LeaseRow` with the spec values exactly as the ORM would have produced them (so the spec
hash, and with it the sandbox, is unchanged); an invalid one an :class:`InvalidLeaseRow` whose
``message`` says what is wrong ("invalid lease row: env must be a JSON object of strings").

Called by ``controller.reconciler`` (one read per pass), ``controller.leases`` (``get``/``export``)
and ``controller.execution``. Pure apart from the one SELECT in :func:`load_lease_rows`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.orm import Session

from controller.overview import parse_timestamp as parse_timestamp  # re-exported (the reconciler)
from controller.schedules import Schedule, lease_schedule
from controller.secrets import is_ref
from controller.specs import JSON_COLUMNS, SPEC_COLUMNS, LeaseSpec
from models import Lease

INVALID_PREFIX = "invalid lease row: "
_JSON_COLUMNS = JSON_COLUMNS
_LIST_COLUMNS = ("network_allow_list", "domain_allow_list")
# Nullable booleans of the spec: SQLite hands them back raw as 0/1, the ORM as False/True (and the
# spec hash must not tell the two apart).
_BOOL_COLUMNS = ("public", "network_block_all", "spot", "ephemeral")
_OTHER_JSON_COLUMNS = ("schedule",)  # shape checked by LeaseSpec (controller.schedules)
_TIME_COLUMNS = (
    "expires_at",
    "rollout_requested_at",
)  # created_at/updated_at are not read by anyone who acts on a row
_MAX_MESSAGE = 500


@dataclass(frozen=True)
class LeaseRow:
    """A valid row: the operator columns as the planner needs them."""

    name: str
    desired_state: str
    paused: bool
    expires_at: datetime | None
    spec: Mapping[str, Any]  # SPEC_COLUMNS -> value, as the ORM would load them
    lease: LeaseSpec  # the validated spec (export)
    rollout_requested_at: datetime | None = None
    created_at: datetime | None = None  # queue order behind a quota (controller.quotas)

    @property
    def schedule(self) -> Schedule | None:
        return lease_schedule(self.lease.schedule)


@dataclass(frozen=True)
class InvalidLeaseRow:
    """A row that breaks the lease rules; ``name`` is the row's name as text (the status key)."""

    name: str
    message: str


def _raw_columns() -> list[sa.ColumnElement[Any]]:
    columns: list[sa.ColumnElement[Any]] = []
    for column in Lease.__table__.columns:
        if column.key in _JSON_COLUMNS or column.key in _OTHER_JSON_COLUMNS:
            # JSON as text on both backends, so '"oops"' is seen as the JSON string it is.
            columns.append(sa.cast(column, sa.Text).label(column.key))
        else:
            columns.append(sa.type_coerce(column, sa.types.NullType()).label(column.key))
    return columns


def _json(value: Any, column: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise _Problem(f"{column} is not valid JSON") from exc


class _Problem(Exception):
    pass


def _shape(column: str, value: Any) -> None:
    """The one rule the pydantic model cannot word for a row: what the JSON column must hold."""
    if value is None:
        return
    if column == "build":
        if not isinstance(value, dict):
            raise _Problem("build must be a JSON object")
        return
    if column == "volumes":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise _Problem("volumes must be a JSON array of objects")
        return
    if column in _LIST_COLUMNS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Problem(f"{column} must be a JSON array of strings")
        return
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and (isinstance(v, str) or (column == "env" and is_ref(v)))
        for k, v in value.items()
    ):
        what = "strings or secret references" if column == "env" else "strings"
        raise _Problem(f"{column} must be a JSON object of {what}")


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "row"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def validate_row(raw: Mapping[str, Any]) -> LeaseRow | InvalidLeaseRow:
    """Validate one raw ``leases`` row (column -> value as stored)."""
    raw_name = raw.get("name")
    name = raw_name if isinstance(raw_name, str) else str(raw_name)
    try:
        values = dict(raw)
        for column in _JSON_COLUMNS:
            values[column] = _json(values.get(column), column)
            _shape(column, values[column])
        for column in _OTHER_JSON_COLUMNS:
            values[column] = _json(values.get(column), column)
        for column in _TIME_COLUMNS:
            if values.get(column) is not None:
                try:
                    values[column] = parse_timestamp(values[column])
                except ValueError as exc:
                    raise _Problem(f"{column}: {exc}") from exc
        if not isinstance(raw_name, str):
            raise _Problem("name must be text")
        paused = values.get("paused")
        if paused is not None and paused not in (True, False, 0, 1):
            raise _Problem(f"paused must be a boolean, not {paused!r}")
        values["paused"] = bool(paused)
        for column in _BOOL_COLUMNS:
            flag = values.get(column)
            if flag is not None:
                if flag not in (True, False, 0, 1):
                    raise _Problem(f"{column} must be a boolean, not {flag!r}")
                values[column] = bool(flag)
        try:
            spec = LeaseSpec.from_row(values)
        except ValidationError as exc:
            raise _Problem(_describe(exc)) from exc
    except _Problem as exc:
        return InvalidLeaseRow(name=name, message=_clip(INVALID_PREFIX + str(exc)))
    except (TypeError, ValueError, OverflowError) as exc:  # anything else the row can throw at us
        return InvalidLeaseRow(name=name, message=_clip(f"{INVALID_PREFIX}{type(exc).__name__}: {exc}"))
    return LeaseRow(
        name=spec.name,
        desired_state=spec.state,
        paused=spec.paused,
        expires_at=spec.expires_at,
        spec={col: values.get(col) for col in SPEC_COLUMNS},
        lease=spec,
        rollout_requested_at=values.get("rollout_requested_at"),
        created_at=_created(values.get("created_at")),
    )


def _created(value: Any) -> datetime | None:
    try:
        return parse_timestamp(value) if value is not None else None
    except (ValueError, TypeError):
        return None


def raw_rows_query(names: Sequence[str] = ()) -> sa.Select[Any]:
    """The SELECT of every ``leases`` row (or those named) as stored, ordered by name; the columns
    are :data:`RAW_KEYS`. Equal raw rows validate to equal results, so a caller that remembers
    the raw tuple of a row may reuse what it made of it (the reconciler does, per pass)."""
    query = sa.select(*_raw_columns()).order_by(Lease.name)
    if names:
        query = query.where(Lease.name.in_(list(names)))
    return query


RAW_KEYS: tuple[str, ...] = tuple(column.key for column in Lease.__table__.columns)
RAW_NAME_INDEX = RAW_KEYS.index("name")


def load_lease_rows(
    session: Session, names: Sequence[str] = ()
) -> tuple[list[LeaseRow], list[InvalidLeaseRow]]:
    """Every ``leases`` row (or those named), valid ones and invalid ones apart, ordered by name."""
    valid: list[LeaseRow] = []
    invalid: list[InvalidLeaseRow] = []
    for row in session.execute(raw_rows_query(names)):
        result = validate_row(dict(row._mapping))
        if isinstance(result, LeaseRow):
            valid.append(result)
        else:
            invalid.append(result)
    return valid, invalid
