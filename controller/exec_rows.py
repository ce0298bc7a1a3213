"""``leasectl exec``'s rows without SQLAlchemy: the direct path's reads and writes (schema guard,
readiness, the lease's env for masking, the ``running`` row, its fenced updates, the result and its
event) as plain SQL through the driver (:func:`controller.dbapi.open_writer`).

Importing SQLAlchemy and the models cost ``exec NAME -- true`` about a third of its start-up (issue
14). :func:`open_exec_rows` answers for the plain URLs :mod:`controller.dbapi` knows, and None for
any other (the CLI then uses ``controller.execution.DatabaseRows``: the same statements through
SQLAlchemy Core). The values stored are the ones the models' column types store: on SQLite a
``UTCDateTime`` is naive UTC text with microseconds (SQLAlchemy's SQLite ``DATETIME`` format), a
boolean 0 or 1, JSON ``json.dumps`` text; on PostgreSQL an aware timestamp (``timestamptz``), a
boolean, JSON text cast to ``json``. tests/integration/test_exec_rows.py compares rows written both
ways, on both databases, column by column.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from controller.dbapi import Writer, open_writer
from controller.errors import SchemaError
from controller.execution_run import (
    Clock,
    CommandOutcome,
    ExecRows,
    LeaseNotReadyError,
    Target,
    _LeaseView,
    _not_runnable,
    _redacted,
    _StatusView,
    event_message,
    runnable_target,
    secret_values_of,
    stored_result,
    utcnow,
)
from controller.schema_guard import SchemaState

log = logging.getLogger(__name__)

# SQLAlchemy's SQLite DATETIME storage format (sqlalchemy.dialects.sqlite.DATETIME).
_SQLITE_DATETIME = "%04d-%02d-%02d %02d:%02d:%02d.%06d"

# The columns of a running row that execute_now's record() sets, and the JSON ones among them.
_RECORDABLE = frozenset({"output", "output_truncated", "session_id", "command_id", "attempts", "attempt_log"})
_JSON_COLUMNS = frozenset({"attempt_log"})

_TARGET = (
    "SELECT l.desired_state, l.expires_at, CAST(l.env AS TEXT), s.phase, s.sandbox_id, s.workspace_path "
    "FROM leases AS l LEFT OUTER JOIN lease_status AS s ON s.lease_name = l.name WHERE l.name = :name"
)
_ENV = "SELECT CAST(env AS TEXT) FROM leases WHERE name = :name"
_INSERT = (
    "INSERT INTO executions (lease_name, command, cwd, timeout_seconds, state, claimed_by, sandbox_id, "
    "created_at, started_at) VALUES (:lease_name, :command, :cwd, :timeout_seconds, 'running', "
    ":claimed_by, :sandbox_id, :created_at, :started_at)"
)
_FENCE = "WHERE id = :b_id AND state = 'running' AND claimed_by = :b_worker"
_FINISH = (
    "UPDATE executions SET state = :state, exit_code = :exit_code, output = :output, "
    "output_truncated = :output_truncated, error = :error, finished_at = :finished_at, env = NULL, "
    "stdin = NULL " + _FENCE
)
_EVENT = (
    "INSERT INTO events (lease_name, sandbox_id, action, outcome, message, controller_id) "
    "VALUES (:lease_name, :sandbox_id, 'exec', :outcome, :message, :controller_id)"
)
_CLEAR_SECRETS = "UPDATE executions SET env = NULL, stdin = NULL WHERE id = :id"
_STATE = "SELECT state FROM executions WHERE id = :id"


def read_timestamp(value: Any) -> datetime:
    """A stored ``UTCDateTime`` as the models read it back: aware, UTC (SQLite text parsed with
    ``datetime.fromisoformat`` as SQLAlchemy's SQLite dialect does; naive means UTC)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"unexpected timestamp value {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class DriverRows(ExecRows):
    """:class:`~controller.execution_run.ExecRows` as plain SQL on a :class:`~controller.dbapi.Writer`."""

    def __init__(self, writer: Writer) -> None:
        self._db = writer
        self._sqlite = writer.dialect == "sqlite"
        self._env: dict[str, str | None] = {}  # lease name -> env column as text, read with the target

    # -- values as the models' column types store them --------------------------------------------

    def _timestamp(self, value: datetime) -> Any:
        if value.tzinfo is None:
            raise ValueError("naive datetime given; leasectl stores timezone-aware UTC timestamps")
        value = value.astimezone(UTC)
        if not self._sqlite:
            return value
        return _SQLITE_DATETIME % (
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
        )

    def _placeholder(self, column: str, name: str) -> str:
        if column in _JSON_COLUMNS and not self._sqlite:
            return f"CAST(:{name} AS JSON)"
        return f":{name}"

    @staticmethod
    def _value(column: str, value: Any) -> Any:
        if column in _JSON_COLUMNS:
            return json.dumps(value)  # sa.JSON's serializer; None is JSON null, as there
        if column == "output_truncated":
            return bool(value)
        return value

    # -- ExecRows ----------------------------------------------------------------------------------

    def check_schema(self) -> None:
        """:class:`SchemaError` unless the database is at this leasectl's head revision."""
        if self._sqlite:
            exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
        else:
            exists = "SELECT 1 WHERE to_regclass('alembic_version') IS NOT NULL"
        current: str | None = None
        if self._db.execute(exists).fetchone() is not None:
            found = self._db.execute("SELECT version_num FROM alembic_version").fetchall()
            if len(found) > 1:  # a branched history, which leasectl never makes
                revisions = ", ".join(sorted(str(r[0]) for r in found))
                raise SchemaError(
                    f"the database's alembic_version holds several revisions ({revisions}); "
                    "leasectl's migrations are one chain: see `leasectl db current`"
                )
            current = str(found[0][0]) if found else None
        problem = SchemaState.of(current).problem()
        if problem is not None:
            raise SchemaError(problem)

    def ready_target(self, lease_name: str, now: datetime) -> Target:
        self.check_schema()
        row = self._db.execute(_TARGET, {"name": lease_name}).fetchone()
        lease = _LeaseView(row[0], read_timestamp(row[1]) if row[1] is not None else None) if row else None
        problem = _not_runnable(lease_name, lease, now)
        if problem is not None:
            raise LeaseNotReadyError(problem)
        assert row is not None
        self._env[lease_name] = row[2]
        status = _StatusView(row[3], row[4], row[5]) if row[3] is not None else None
        return runnable_target(lease_name, status)

    def secret_values(self, lease_name: str) -> tuple[str, ...]:
        if lease_name not in self._env:
            found = self._db.execute(_ENV, {"name": lease_name}).fetchone()
            self._env[lease_name] = found[0] if found is not None else None
        return secret_values_of(self._env[lease_name])

    def insert_running(
        self,
        *,
        lease_name: str,
        command: str,
        cwd: str | None,
        timeout_seconds: int,
        worker: str,
        sandbox_id: str,
        now: datetime,
    ) -> int:
        params = {
            "lease_name": lease_name,
            "command": command,
            "cwd": cwd,
            "timeout_seconds": timeout_seconds,
            "claimed_by": worker,
            "sandbox_id": sandbox_id,
            "created_at": self._timestamp(now),
            "started_at": self._timestamp(now),
        }
        if self._sqlite:
            return int(self._db.execute(_INSERT, params).lastrowid)
        return int(self._db.execute(_INSERT + " RETURNING id", params).fetchone()[0])

    def record(self, execution_id: int, worker: str, values: Mapping[str, Any]) -> None:
        unknown = set(values) - _RECORDABLE
        if unknown:
            raise ValueError(f"not a column execute_now records: {sorted(unknown)}")
        if not values:
            return
        sets = ", ".join(f"{column} = {self._placeholder(column, 'v_' + column)}" for column in values)
        params = {"v_" + column: self._value(column, value) for column, value in values.items()}
        self._db.execute(
            f"UPDATE executions SET {sets} {_FENCE}", params | {"b_id": execution_id, "b_worker": worker}
        )

    def finish(
        self,
        execution_id: int,
        worker: str,
        outcome: CommandOutcome,
        *,
        lease_name: str,
        sandbox_id: str | None,
        max_output_bytes: int,
        clock: Clock = utcnow,
        secrets: Sequence[str] = (),
    ) -> bool:
        values = stored_result(outcome, clock(), max_output_bytes, secrets)
        values["finished_at"] = self._timestamp(values["finished_at"])
        values["output_truncated"] = bool(values["output_truncated"])
        with self._db.transaction():
            done = self._db.execute(_FINISH, values | {"b_id": execution_id, "b_worker": worker}).rowcount
            if done == 1:
                event = {
                    "lease_name": lease_name,
                    "sandbox_id": sandbox_id,
                    "outcome": outcome.state,
                    "message": event_message(execution_id, _redacted(outcome, secrets)),
                    "controller_id": worker,
                }
                self._db.execute(_EVENT, event)
                return True
        with self._db.transaction():  # someone else ended it (interrupted, cancelled): still no secrets
            self._db.execute(_CLEAR_SECRETS, {"id": execution_id})
            found = self._db.execute(_STATE, {"id": execution_id}).fetchone()
        state = found[0] if found is not None else None
        log.warning(
            "execution %d finished as %s but is now %s: result dropped", execution_id, outcome.state, state
        )
        return False

    def close(self) -> None:
        self._db.close()


def open_exec_rows(url: str) -> DriverRows | None:
    """The direct path's rows through the driver for a plain ``url``, else None (use SQLAlchemy).
    Nothing connects before the first read (the schema guard), as with an engine; connection
    errors propagate from there as the driver raises them."""
    writer = open_writer(url)
    return DriverRows(writer) if writer is not None else None
