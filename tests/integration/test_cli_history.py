"""``leasectl events`` and ``leasectl executions`` print exactly what they printed when they read
through the ORM: the same bytes for the table, JSON and YAML, on SQLite and PostgreSQL.

The expected outputs (history_cli_golden.json beside this file) were captured from the ORM
implementation on the history below; both databases must print them. The history has what the
values differ in between the two databases: timestamps (SQLite text, with and without
microseconds, one written by hand), booleans (SQLite 0/1), JSON (SQLite text), NULLs, an event of
a lease whose row is gone, a lease without events, a command longer than the table shows.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from controller import db as dbmod
from controller import exitcodes
from controller.cli import app
from models import Event, Execution, Lease
from tests.conftest import create_pg_database, drop_pg_database, truncate_all

GOLDEN = Path(__file__).with_name("history_cli_golden.json")
T0 = datetime(2026, 11, 27, 9, 30, 0, 123456, tzinfo=UTC)

CASES: list[list[str]] = [
    ["events"],
    ["events", "-o", "json"],
    ["events", "-o", "yaml"],
    ["events", "-n", "3"],
    ["events", "box-b"],
    ["events", "box-b", "-n", "2", "-o", "yaml"],
    ["events", "gone", "-o", "json"],  # no lease row, but events name it
    ["events", "box-c"],  # a lease without events
    ["events", "box-c", "-o", "json"],
    ["events", "nosuch"],
    ["executions"],
    ["executions", "-o", "json"],
    ["executions", "-o", "yaml"],
    ["executions", "--lease", "box-a"],
    ["executions", "--state", "failed", "-o", "json"],
    ["executions", "--lease", "box-b", "--state", "queued"],
    ["executions", "-n", "2"],
    ["executions", "--lease", "nosuch", "-o", "yaml"],
    ["executions", "--state", "bogus"],
]
FOLLOWED = [
    ["events", "-f"],
    ["events", "box-a", "-f", "-o", "json"],
    ["events", "-n", "2", "-f", "-o", "yaml"],
]


def populate(db: dbmod.Database) -> None:
    with db.session() as session:
        for name in ("box-a", "box-b", "box-c"):
            session.add(Lease(name=name, desired_state="running"))
        session.flush()
        for i, (lease, sandbox, message) in enumerate(
            [
                ("box-a", "sb-1", "created sandbox sb-1"),
                ("box-b", None, None),
                (None, None, "pass finished: 2 actions"),
                ("gone", "sb-9", "deleted: lease row removed"),
                ("box-b", "sb-2", "started ✓ ünïcode"),
                ("box-a", "sb-1", "a\nsecond line"),
            ]
        ):
            session.add(
                Event(
                    at=T0 + timedelta(seconds=i, microseconds=0 if i == 2 else i),
                    lease_name=lease,
                    sandbox_id=sandbox,
                    action="create" if i % 2 else "start",
                    outcome="ok" if i != 3 else "error",
                    message=message,
                    pass_id=None if i == 1 else f"pass-{i}",
                    controller_id="ctl",
                )
            )
        session.add(
            Execution(
                lease_name="box-a",
                command="echo hello",
                cwd="/work",
                state="succeeded",
                exit_code=0,
                output="hello\n",
                claimed_by="w1",
                sandbox_id="sb-1",
                created_at=T0,
                started_at=T0 + timedelta(seconds=1),
                finished_at=T0 + timedelta(seconds=3, microseconds=250000),
                attempts=0,
                session_id="sess-1",
                command_id="cmd-1",
            )
        )
        session.add(
            Execution(
                lease_name="box-b",
                command="python -c 'print(1)' && " + "x" * 80,
                state="failed",
                exit_code=3,
                output="y" * 10,
                output_truncated=True,
                timeout_seconds=30,
                created_at=T0 + timedelta(minutes=1),
                started_at=T0 + timedelta(minutes=1, seconds=2),
                finished_at=T0 + timedelta(minutes=2),
                attempts=2,
                attempt_log=[
                    {"at": "2026-11-27T09:31:00+00:00", "reason": "sandbox not started"},
                    {"at": "2026-11-27T09:31:01+00:00", "reason": "toolbox unreachable"},
                ],
                ordered=False,
            )
        )
        session.add(
            Execution(
                lease_name="box-b",
                command="sleep 100",
                state="queued",
                created_at=T0 + timedelta(minutes=3),
                next_attempt_at=T0 + timedelta(minutes=4),
                attempts=0,
            )
        )
    # Written by hand, as an operator would with SQL: a timestamp without microseconds.
    at = "2026-11-27 10:00:00" if db.is_sqlite else "2026-11-27 10:00:00+00"
    cast = ":at" if db.is_sqlite else "CAST(:at AS timestamptz)"
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO events (at, lease_name, action, outcome, message) "
                f"VALUES ({cast}, 'box-a', 'stop', 'ok', 'by hand')"
            ),
            {"at": at},
        )
        conn.execute(
            sa.text(
                f"INSERT INTO executions (lease_name, command, state, created_at, started_at, attempts, "
                f"output_truncated, ordered) VALUES ('box-a', 'true', 'running', {cast}, {cast}, 0, "
                f"{'0' if db.is_sqlite else 'false'}, {'1' if db.is_sqlite else 'true'})"
            ),
            {"at": at},
        )


def run(database_url: str, args: list[str]) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["--database-url", database_url, *args])
    return {"code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}


def outputs(database_url: str) -> dict[str, dict[str, Any]]:
    return {" ".join(args): run(database_url, args) for args in CASES}


@pytest.fixture(params=["sqlite", "postgres", "sqlite-through-sqlalchemy"])
def history_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[dbmod.Database, str]]:
    """A migrated, empty database and the URL the commands get: a plain URL (read through the
    driver) on both databases; and a SQLite URL with a query string, which the driver does not
    open, so the commands read through SQLAlchemy (the driver opens every PostgreSQL URL of these
    tests: that path has no PostgreSQL case)."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        db = dbmod.connect(url)
        truncate_all(db)
    else:
        url = f"sqlite:///{tmp_path / 'leasectl.db'}"
        db = dbmod.connect(url)
        dbmod.upgrade(db)
    try:
        yield db, url + ("?timeout=30" if request.param == "sqlite-through-sqlalchemy" else "")
    finally:
        db.dispose()


def test_events_and_executions_print_what_they_printed(history_db: tuple[dbmod.Database, str]) -> None:
    """On a plain URL through the driver; on SQLite with a query string through SQLAlchemy."""
    db, database_url = history_db
    populate(db)
    found = outputs(database_url)
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert found.keys() == {" ".join(args) for args in CASES}
    for case, got in found.items():
        assert got == expected[case], case


def test_events_follow_prints_new_events_as_before(
    history_db: tuple[dbmod.Database, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``events -f`` (table and JSON): the history, then each event written after it; Ctrl-C ends
    it with exit 0. The sleep between looks writes the next event instead of waiting. A URL the
    driver does not open (a query string on SQLite) is read through SQLAlchemy: each look must
    still see what was written since the last."""
    import controller.cli.leases as leases_cli

    db, database_url = history_db
    populate(db)
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for args in FOLLOWED:
        looks = iter(range(3))

        def sleep(_seconds: float, looks: Iterator[int] = looks) -> None:
            look = next(looks, None)
            if look is None:
                raise KeyboardInterrupt
            with db.session() as session:
                session.add(
                    Event(
                        at=T0 + timedelta(hours=1, seconds=look),
                        lease_name="box-a" if look != 1 else "box-b",
                        action="follow",
                        outcome="ok",
                        message=f"look {look}",
                    )
                )

        monkeypatch.setattr(leases_cli.time, "sleep", sleep)
        found = run(database_url, args)
        assert found == expected[" ".join(args)], args
        with db.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM events WHERE action = 'follow'"))


@pytest.fixture(params=["sqlite", "postgres"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database that exists but holds no leasectl schema."""
    if request.param == "sqlite":
        path = tmp_path / "empty.db"
        sqlite3.connect(path).close()
        yield f"sqlite:///{path}"
    else:
        url = create_pg_database("leasectl_unmigrated")
        yield url
        drop_pg_database(url)


def test_an_unmigrated_database_is_refused_as_get_refuses_it(unmigrated_url: str) -> None:
    """No schema: one line naming `leasectl db upgrade` and the NO_DATABASE exit code, as ``get``."""
    refused = run(unmigrated_url, ["get"])
    assert refused["code"] == exitcodes.NO_DATABASE and "run `leasectl db upgrade`" in refused["stderr"]
    for args in (["events"], ["events", "box-a"], ["executions"], ["executions", "-o", "json"]):
        found = run(unmigrated_url, args)
        assert found["code"] == exitcodes.NO_DATABASE, (args, found)
        assert "has no leasectl schema" in found["stderr"] and "run `leasectl db upgrade`" in found["stderr"]
        assert len(found["stderr"].strip().splitlines()) == 1 and found["stdout"] == "", (args, found)
