"""The history an operator reads: the ``events`` table (``leasectl events``, ``events -f``) and the
``executions`` table (``leasectl executions``), as plain SQL through a
:class:`controller.dbapi.Reader`, values read raw and made displayable one by one.

This module owns those statements and the shape of what the two commands print (the dicts their
JSON and YAML show, in the order shown); the CLI only lays rows out as tables. Like
:mod:`controller.overview` (``get``), it imports neither SQLAlchemy, nor the ORM models, nor
pydantic: on a plain URL the command reads through the driver itself (controller/dbapi.py), so it
starts quickly (tests/unit/test_cli_imports.py counts that). The values come out as the models'
column types would give them, on both databases: timestamps as aware UTC datetimes (SQLite answers
text, PostgreSQL datetimes; a timestamp written by hand that is not one shows as its text),
booleans as booleans (SQLite answers 0/1), JSON decoded (read as text on both).
``executions logs`` reads one execution's output and state here too.
tests/integration/test_cli_history.py holds the commands' output to what the ORM printed.
``env`` and ``stdin`` of an execution are never read.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from controller.dbapi import Reader
from controller.overview import tolerant_timestamp

# models.tables.EXECUTION_STATES (the models import SQLAlchemy; a unit test keeps them equal).
EXECUTION_STATES = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "error",
    "cancelled",
    "interrupted",
    "unknown",
)
# models.tables.EXECUTION_TERMINAL_STATES (kept equal by the same test): every state but these two.
EXECUTION_TERMINAL_STATES = tuple(state for state in EXECUTION_STATES if state not in ("queued", "running"))

FOLLOW_BATCH = 1000  # events read per look in follow mode

_EVENT_COLUMNS = "id, at, lease_name, sandbox_id, action, outcome, message, pass_id"
_EXECUTION_COLUMNS = (
    "id, lease_name, state, exit_code, command, cwd, timeout_seconds, error, output, output_truncated, "
    "claimed_by, sandbox_id, created_at, started_at, finished_at, attempts, "
    "CAST(attempt_log AS TEXT) AS attempt_log, next_attempt_at, session_id, command_id, ordered"
)
_EXECUTION_TIMESTAMPS = frozenset({"created_at", "started_at", "finished_at", "next_attempt_at"})
_EXECUTION_BOOLEANS = frozenset({"output_truncated", "ordered"})


def _where(**conditions: Any) -> tuple[list[str], dict[str, Any]]:
    """``column = :column`` for each condition that is set (an empty name filters nothing, as the
    commands always read it), and their parameters."""
    params = {column: value for column, value in conditions.items() if value}
    return [f"{column} = :{column}" for column in params], params


def _clause(parts: list[str]) -> str:
    return f" WHERE {' AND '.join(parts)}" if parts else ""


def _isoformat(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


# -- events ----------------------------------------------------------------------------------------


def _event(columns: list[str], row: tuple[Any, ...]) -> dict[str, Any]:
    found = dict(zip(columns, row, strict=True))
    found["at"] = tolerant_timestamp(found["at"])
    return found


def recent_events(read: Reader, limit: int, lease: str | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` events (of ``lease`` only when given), oldest first."""
    parts, params = _where(lease_name=lease)
    sql = f"SELECT {_EVENT_COLUMNS} FROM events{_clause(parts)} ORDER BY id DESC LIMIT :limit"
    columns, rows = read(sql, {**params, "limit": limit})
    return [_event(columns, row) for row in reversed(rows)]


def events_after(read: Reader, last_id: int, lease: str | None = None) -> list[dict[str, Any]]:
    """Events written after the one with id ``last_id`` (of ``lease`` only when given), oldest
    first, at most :data:`FOLLOW_BATCH` of them."""
    parts, params = _where(lease_name=lease)
    sql = f"SELECT {_EVENT_COLUMNS} FROM events{_clause(['id > :last_id', *parts])} ORDER BY id LIMIT :limit"
    columns, rows = read(sql, {**params, "last_id": last_id, "limit": FOLLOW_BATCH})
    return [_event(columns, row) for row in rows]


def last_event_id(read: Reader) -> int:
    """The id of the newest event; 0 when there is none."""
    _, rows = read("SELECT max(id) FROM events")
    return int(rows[0][0] or 0) if rows else 0


def lease_exists(read: Reader, name: str) -> bool:
    _, rows = read("SELECT 1 FROM leases WHERE name = :name", {"name": name})
    return bool(rows)


def event_data(event: dict[str, Any]) -> dict[str, Any]:
    """An event as ``events -o json|yaml`` prints it."""
    return {
        "at": _isoformat(event["at"]),
        "lease": event["lease_name"],
        "sandbox_id": event["sandbox_id"],
        "action": event["action"],
        "outcome": event["outcome"],
        "message": event["message"],
        "pass_id": event["pass_id"],
    }


# -- executions ------------------------------------------------------------------------------------


def _json(text: Any) -> Any:
    """A JSON column read as text: decoded (SQL NULL and JSON null: None); text written by hand
    that is not JSON stays as it is."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _execution(columns: list[str], row: tuple[Any, ...]) -> dict[str, Any]:
    found = dict(zip(columns, row, strict=True))
    for key in _EXECUTION_TIMESTAMPS:
        found[key] = tolerant_timestamp(found[key])
    for key in _EXECUTION_BOOLEANS:
        if found[key] is not None:
            found[key] = bool(found[key])  # SQLite answers 0/1
    found["attempt_log"] = _json(found["attempt_log"])
    return found


def recent_executions(
    read: Reader, limit: int, *, lease: str | None = None, state: str | None = None
) -> list[dict[str, Any]]:
    """The newest ``limit`` executions (of ``lease``, in ``state``, when given), oldest first."""
    parts, params = _where(lease_name=lease, state=state)
    sql = f"SELECT {_EXECUTION_COLUMNS} FROM executions{_clause(parts)} ORDER BY id DESC LIMIT :limit"
    columns, rows = read(sql, {**params, "limit": limit})
    return [_execution(columns, row) for row in reversed(rows)]


def execution_data(r: dict[str, Any]) -> dict[str, Any]:
    """An execution as ``executions -o json|yaml`` prints it (never its env or stdin)."""
    return {
        "id": r["id"],
        "lease": r["lease_name"],
        "state": r["state"],
        "exit_code": r["exit_code"],
        "command": r["command"],
        "cwd": r["cwd"],
        "timeout_seconds": r["timeout_seconds"],
        "error": r["error"],
        "output": r["output"],
        "output_truncated": r["output_truncated"],
        "claimed_by": r["claimed_by"],
        "sandbox_id": r["sandbox_id"],
        "created_at": _isoformat(r["created_at"]),
        "started_at": _isoformat(r["started_at"]),
        "finished_at": _isoformat(r["finished_at"]),
        "attempts": r["attempts"],
        "attempt_log": r["attempt_log"] or [],
        "next_attempt_at": _isoformat(r["next_attempt_at"]),
        "session_id": r["session_id"],
        "command_id": r["command_id"],
        "ordered": r["ordered"],
    }


def execution_output(read: Reader, execution_id: int) -> dict[str, Any] | None:
    """``state``, ``output``, ``exit_code`` and ``error`` of one execution (``executions logs``);
    None when there is no such row."""
    columns, rows = read(
        "SELECT state, output, exit_code, error FROM executions WHERE id = :id", {"id": execution_id}
    )
    return dict(zip(columns, rows[0], strict=True)) if rows else None
