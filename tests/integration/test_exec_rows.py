"""``leasectl exec`` writes its row through the driver on a plain URL (controller/exec_rows.py): what
it stores must be exactly what the SQLAlchemy path (``controller.execution.DatabaseRows``, the
models' column types) stores, on SQLite and PostgreSQL, raw value for raw value, and read back the
same through the ORM and through ``leasectl executions``.

Each case runs the same command twice with the same clock and worker id, once per path, and
compares the two rows and their events column by column (the id apart).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from controller import db as dbmod
from controller.config import ExecSettings
from controller.errors import RateLimitedError, SchemaError
from controller.exec_rows import DriverRows, open_exec_rows
from controller.execution import DatabaseRows
from controller.execution_run import ExecRows, LeaseNotReadyError, execute_now
from controller.providers.base import ExecResult
from controller.providers.memory import MemoryProvider
from models import Event, Execution, Lease, LeaseStatus

SECRET = "s3cr3t-exec-rows-value"
T0 = datetime(2026, 11, 27, 13, 45, 12, 345678, tzinfo=UTC)
WORKER = "host:123:cli-rows"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(microseconds=250_001)  # every read a different time, the same per path
        return self.now


@pytest.fixture
def driver_rows(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[DriverRows]:
    # A session time zone other than UTC: a timestamp given to PostgreSQL without its zone would
    # be read in it, and be off by an hour.
    monkeypatch.setenv("PGTZ", "Europe/Berlin")
    rows = open_exec_rows(database_url)
    assert rows is not None, f"{database_url} is a plain URL: exec must not need SQLAlchemy for it"
    yield rows
    rows.close()


@pytest.fixture
def fleet(db: dbmod.Database, monkeypatch: pytest.MonkeyPatch) -> MemoryProvider:
    """Lease ``box`` Ready on a started sandbox of the in-memory provider, with a secret in its env."""
    monkeypatch.setenv("LEASECTL_TEST_ROWS_TOKEN", SECRET)
    provider = MemoryProvider()
    provider.exec_hook = lambda *_a: ExecResult(exit_code=0, output="")
    sandbox = provider.add_sandbox("box-sandbox", {"leasectl-instance": "test"})
    with db.session() as session:
        session.add(
            Lease(
                name="box",
                desired_state="running",
                env={"TOKEN": {"from_env": "LEASECTL_TEST_ROWS_TOKEN"}, "PLAIN": "visible"},
            )
        )
        session.add(LeaseStatus(lease_name="box", phase="Ready", sandbox_id=sandbox.id, workspace_path="/w"))
    return provider


def exec_settings(**overrides: object) -> ExecSettings:
    values: dict[str, object] = {"max_output_bytes": 1024, "session_min_timeout_seconds": 100_000}
    return ExecSettings.model_validate(values | overrides)


def raw_row(db: dbmod.Database, table: str, row_id: int) -> dict[str, Any]:
    """The row as the database holds it: no type processing (JSON as its text)."""
    casts = {
        "executions": ("env", "attempt_log"),
        "events": (),
    }[table]
    with db.engine.connect() as conn:
        columns = [c["name"] for c in sa.inspect(conn).get_columns(table)]
        select = ", ".join(f"CAST({c} AS TEXT) AS {c}" if c in casts else c for c in columns)
        found = conn.exec_driver_sql(f"SELECT {select} FROM {table} WHERE id = {int(row_id)}").one()
    return dict(zip(columns, found, strict=True))


def event_of(db: dbmod.Database, execution_id: int) -> dict[str, Any] | None:
    with db.engine.connect() as conn:
        found = conn.execute(
            sa.select(Event.id).where(
                Event.message.like(f"execution {execution_id}%"), Event.action == "exec"
            )
        ).scalar_one_or_none()
    return raw_row(db, "events", found) if found is not None else None


def both_ways(
    db: dbmod.Database, driver: DriverRows, run: Callable[[ExecRows], tuple[int, Any]]
) -> tuple[int, int]:
    """Run ``run`` through SQLAlchemy, then the driver; the two row ids, after checking that the
    rows and their events hold the same raw values (id, and the id in the event message, apart)."""
    ours, _ = run(DatabaseRows(db))
    theirs, _ = run(driver)
    a, b = raw_row(db, "executions", ours), raw_row(db, "executions", theirs)
    assert (a["session_id"] is None) == (b["session_id"] is None)  # ids made per attempt
    assert (a["command_id"] is None) == (b["command_id"] is None)
    per_attempt = {"id": None, "session_id": None, "command_id": None}
    assert a | per_attempt == b | per_attempt
    ea, eb = event_of(db, ours), event_of(db, theirs)
    assert (ea is None) == (eb is None)
    if ea is not None and eb is not None:
        ea["message"] = ea["message"].replace(f"execution {ours}", "execution N")
        eb["message"] = eb["message"].replace(f"execution {theirs}", "execution N")
        # `at` is the database's clock (its server default): written at two moments
        assert {**ea, "id": None, "at": None} == {**eb, "id": None, "at": None}
    return ours, theirs


def orm_view(db: dbmod.Database, execution_id: int) -> dict[str, Any]:
    with db.session(readonly=True) as session:
        r = session.get(Execution, execution_id)
        assert r is not None
        return {c.key: getattr(r, c.key) for c in sa.inspect(Execution).column_attrs if c.key != "id"}


def cli_view(database_url: str, execution_id: int) -> dict[str, Any]:
    from controller.cli import app

    result = CliRunner().invoke(app, ["--database-url", database_url, "executions", "-o", "json"])
    assert result.exit_code == 0, result.output
    [found] = [r for r in json.loads(result.stdout) if r["id"] == execution_id]
    return {**found, "id": None}


def check_reads_the_same(db: dbmod.Database, database_url: str, ours: int, theirs: int) -> None:
    assert orm_view(db, ours) == orm_view(db, theirs)
    assert cli_view(database_url, ours) == cli_view(database_url, theirs)


def test_a_one_request_command_is_stored_the_same_way(
    db: dbmod.Database, database_url: str, driver_rows: DriverRows, fleet: MemoryProvider
) -> None:
    """Output over the cap (cut), a NUL, a secret masked, stdin, a cwd: every result column."""
    fleet.exec_hook = lambda *_a: ExecResult(exit_code=7, output=f"token={SECRET}\x00 é " + "x" * 2000)

    def run(rows: ExecRows) -> tuple[int, Any]:
        return execute_now(
            rows,
            fleet,
            exec_settings(),
            lease_name="box",
            command="echo $TOKEN",
            cwd="/tmp/here",
            env={"NAME": "value"},
            stdin=b"input",
            timeout_seconds=30,
            worker_id=WORKER,
            clock=Clock(),
        )

    ours, theirs = both_ways(db, driver_rows, run)
    stored = orm_view(db, theirs)
    assert (stored["state"], stored["exit_code"], stored["output_truncated"]) == ("failed", 7, True)
    assert SECRET not in stored["output"] and stored["output"].startswith("token=***\ufffd é x")
    assert stored["created_at"] == stored["started_at"] == T0 + timedelta(microseconds=250_001)
    assert stored["env"] is None and stored["stdin"] is None and stored["cwd"] == "/tmp/here"
    check_reads_the_same(db, database_url, ours, theirs)


def test_a_session_command_records_its_session_command_and_output_the_same_way(
    db: dbmod.Database, database_url: str, driver_rows: DriverRows, fleet: MemoryProvider
) -> None:
    fleet.exec_hook = lambda *_a: ExecResult(exit_code=0, output=f"hello {SECRET}\n")

    def run(rows: ExecRows) -> tuple[int, Any]:
        return execute_now(
            rows,
            fleet,
            exec_settings(session_min_timeout_seconds=10),
            lease_name="box",
            command="echo hello",
            timeout_seconds=60,
            worker_id=WORKER,
            clock=Clock(),
            sleep=lambda _s: None,
        )

    ours, theirs = both_ways(db, driver_rows, run)
    a, b = orm_view(db, ours), orm_view(db, theirs)
    assert a["session_id"] and b["session_id"] and a["command_id"] and b["command_id"]
    assert b["output"] == "hello ***\n" and b["state"] == "succeeded"
    # session and command ids are per attempt: everything else reads the same
    for view in (a, b):
        view["session_id"] = view["command_id"] = None
    assert a == b


def test_retries_of_a_command_that_never_started_store_the_same_attempt_log(
    db: dbmod.Database, database_url: str, driver_rows: DriverRows, fleet: MemoryProvider
) -> None:
    def run(rows: ExecRows) -> tuple[int, Any]:
        fleet.fail_next("exec", RateLimitedError("slow down é", retry_after=0.5), times=2)
        return execute_now(
            rows,
            fleet,
            exec_settings(),
            lease_name="box",
            command="true",
            worker_id=WORKER,
            clock=Clock(),
            sleep=lambda _s: None,
        )

    ours, theirs = both_ways(db, driver_rows, run)
    stored = orm_view(db, theirs)
    assert stored["attempts"] == 2 and len(stored["attempt_log"]) == 2 and stored["state"] == "succeeded"
    check_reads_the_same(db, database_url, ours, theirs)


@pytest.mark.parametrize(
    "taken", [{"state": "cancelled"}, {"claimed_by": "other:1:worker"}], ids=["cancelled", "taken-over"]
)
def test_a_row_someone_else_ended_or_took_keeps_their_values_and_loses_its_secrets(
    db: dbmod.Database,
    database_url: str,
    driver_rows: DriverRows,
    fleet: MemoryProvider,
    taken: dict[str, str],
) -> None:
    """The fence (``state = 'running' AND claimed_by = me``): the result of a row cancelled, or
    taken over by another worker, while it ran is dropped, and no event is written."""

    def cancel_it(execution_id: int, *_a: Any) -> None:
        with db.engine.begin() as conn:
            conn.execute(
                sa.update(Execution).where(Execution.id == execution_id).values(env={"K": "v"}, **taken)
            )

    def run(rows: ExecRows) -> tuple[int, Any]:
        return execute_now(
            rows,
            fleet,
            exec_settings(),
            lease_name="box",
            command="true",
            worker_id=WORKER,
            clock=Clock(),
            on_start=cancel_it,
        )

    ours, theirs = both_ways(db, driver_rows, run)
    stored = orm_view(db, theirs)
    assert stored | taken == stored and stored["env"] is None and stored["finished_at"] is None
    assert event_of(db, theirs) is None
    check_reads_the_same(db, database_url, ours, theirs)


@pytest.mark.parametrize(
    ("desired", "phase", "expires", "message"),
    [
        ("stopped", "Stopped", None, "is not desired running (desired state stopped)"),
        ("running", "Provisioning", None, "is not Ready (phase Provisioning)"),
        ("running", "Ready", T0 - timedelta(days=1), "expired at 2026-11-26T13:45:12.345678+00:00"),
    ],
)
def test_both_paths_refuse_a_lease_that_is_not_ready_with_the_same_words(
    db: dbmod.Database,
    driver_rows: DriverRows,
    fleet: MemoryProvider,
    desired: str,
    phase: str,
    expires: datetime | None,
    message: str,
) -> None:
    with db.engine.begin() as conn:
        conn.execute(sa.update(Lease).values(desired_state=desired, expires_at=expires))
        conn.execute(sa.update(LeaseStatus).values(phase=phase))
    said = []
    for rows in (DatabaseRows(db), driver_rows):
        for name in ("box", "nope"):
            with pytest.raises(LeaseNotReadyError) as refused:
                execute_now(rows, fleet, exec_settings(), lease_name=name, command="true", clock=lambda: T0)
            said.append(str(refused.value))
    assert said[0] == said[2] and said[1] == said[3] == "no such lease: 'nope'"
    assert message in said[0]
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(Execution)).scalar_one() == 0
    assert not [c for c in fleet.calls if c[0] == "exec"]


def test_both_paths_refuse_a_schema_this_leasectl_was_not_built_for(
    db: dbmod.Database, driver_rows: DriverRows, fleet: MemoryProvider
) -> None:
    with db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    try:
        said = []
        for rows in (DatabaseRows(dbmod.connect(str(db.engine.url.render_as_string(False)))), driver_rows):
            with pytest.raises(SchemaError) as refused:
                execute_now(rows, fleet, exec_settings(), lease_name="box", command="true")
            said.append(str(refused.value))
        assert said[0] == said[1] and "newer than leasectl" in said[0]
        assert not [c for c in fleet.calls if c[0] == "exec"]
    finally:
        with db.engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": dbmod.head_revision()})
